"""Using a trained model: the Python API (``api``), ``predict`` and ``explain`` on images, ``export`` (ONNX),
``quantize`` (int8), ``hub`` (safetensors and hf folders, with their ``modelcard``) and the web app (``serve``).
"""
