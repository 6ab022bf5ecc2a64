"""covid-cxr: a leak-aware COVID-19 chest X-ray classification pipeline.

Research use only, not a diagnostic device.

The Python API (:mod:`covid_cxr.deploy.api`) is imported on first use, so ``import covid_cxr`` stays light
(no PyTorch): ``covid_cxr.load_run(path, backend="torch"|"onnx")`` returns a
:class:`~covid_cxr.model.inference.Predictor` (``predict``, ``explain``); ``covid_cxr.ManifestDataset`` is a
manifest split as a PyTorch dataset.
"""

__version__ = "0.1.0"

DISCLAIMER = "covid-cxr output is for research use only; it is not a diagnostic device."

_LAZY = {
    "load_run": "covid_cxr.deploy.api",
    "Predictor": "covid_cxr.model.inference",
    "Prediction": "covid_cxr.model.results",
    "Explanation": "covid_cxr.model.results",
    "ManifestDataset": "covid_cxr.training.loaders",
}
"""Public names and the module that defines each; imported when first used."""

__all__ = ["__version__", "DISCLAIMER", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'covid_cxr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
