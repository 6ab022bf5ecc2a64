"""Which optional install (``pip install 'covid-cxr[EXTRA]'``) provides a missing package.

The base install runs ONNX inference only; a command that needs more says which extra to install
instead of failing with a traceback (:func:`missing_extra_hint`, used by the CLI).
"""

from __future__ import annotations

EXTRA_OF = {
    "torch": "train", "torchvision": "train", "sklearn": "train", "matplotlib": "train", "pandas": "train",
    "scipy": "train", "imagehash": "train", "onnx": "train", "onnxscript": "train", "safetensors": "train",
    "pydicom": "dicom", "pylibjpeg": "dicom", "libjpeg": "dicom", "openjpeg": "dicom", "rle": "dicom",
    "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve", "starlette": "serve",
    "pydantic": "serve", "tensorboard": "track", "highdicom": "pacs", "pynetdicom": "pacs",
}
"""Top-level import name -> the extra of pyproject.toml that installs it."""


def missing_extra_hint(exc: BaseException, command: str = "this command") -> str | None:
    """A one-line fix for a ``ModuleNotFoundError`` of an optional package, or None for anything else."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    hint = f"`covid-cxr {command}` needs the {top} package, which is not installed: pip install 'covid-cxr[{extra}]'"
    if extra == "train":
        hint += " (prediction and serving work without it: --backend onnx with an exported model.onnx)"
    return hint
