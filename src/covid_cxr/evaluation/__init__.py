"""Measuring a model: metrics with patient-bootstrap CIs (``metrics``), temperature and operating point
(``calibration``), a run's model with one split's pixels (``split``), ``evaluate``, the shortcut ``audit``, the
pictures (``plots``) and the one-page ``report``.
"""
