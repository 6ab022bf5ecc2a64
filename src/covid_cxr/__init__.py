"""covid-cxr: a leak-aware COVID-19 chest X-ray classification pipeline.

Research use only, not a diagnostic device.
"""

__version__ = "0.1.0"

DISCLAIMER = "covid-cxr output is for research use only; it is not a diagnostic device."

__all__ = ["__version__", "DISCLAIMER"]
