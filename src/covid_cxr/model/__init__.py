"""The model: networks and pretrained weights (``networks``), the one checkpoint writer and reader
(``checkpoint``), the exported formats read back (``formats``), typed metadata (``meta``), the out-of-scope gate
(``gate``), the device (``runtime``), the one inference path for both backends (``inference``, with ONNX Runtime in ``onnx_model``), Grad-CAM
(``gradcam``) and what the API returns (``results``). Imports the shared ground and :mod:`covid_cxr.imaging`;
never a dataset.
"""
