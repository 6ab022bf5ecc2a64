"""The Python API: load a trained model from anything covid-cxr writes, predict and explain.

.. code-block:: python

    import covid_cxr

    model = covid_cxr.load_run("runs/densenet")             # or best.pt, model.onnx, an `export --format hf` folder
    for r in model.predict(["a.png", "b.dcm"]):             # paths, PIL images or NumPy arrays
        print(r.source, r.label, r.probabilities, r.in_scope)
    heat = model.explain("a.png")[0].heatmap                 # Grad-CAM (needs PyTorch)

The command line is built on the same calls (``covid-cxr predict`` and ``explain`` use :func:`load_run`).
Importing ``covid_cxr`` does not import PyTorch; the ONNX backend never does.
"""

from __future__ import annotations

from pathlib import Path

from covid_cxr.errors import CheckpointError, CovidCxrError
from covid_cxr.model import formats
from covid_cxr.model.inference import BACKENDS, Predictor, load_predictor
from covid_cxr.model.results import Explanation, Prediction

__all__ = ["load_run", "Predictor", "Prediction", "Explanation"]


def load_run(path: str | Path, backend: str = "torch", device: str = "auto", checkpoint: str = "best",
             threads: int | None = None) -> Predictor:
    """Load a trained model for inference.

    Args:
        path: a run folder (``covid-cxr train --out``), a checkpoint (``best.pt``), an ``.onnx`` file (with
            its ``.json`` beside it), a ``.safetensors`` file or a folder written by ``covid-cxr export --format
            hf`` (``model.safetensors`` + ``config.json``).
        backend: ``torch`` (needs PyTorch) or ``onnx`` (ONNX Runtime only: a run folder's ``model.onnx``, an
            ``.onnx`` file, or the ``model.onnx`` of an hf folder).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        checkpoint: ``best`` or ``last``, for a run folder.
        threads: ONNX Runtime intra-op threads on CPU (default: all usable CPUs).

    Returns:
        A :class:`~covid_cxr.model.inference.Predictor`: ``predict(...)``, ``explain(...)``, ``meta``, ``labels``.

    Raises:
        CheckpointError, RunError: nothing loadable at ``path`` (the message says what to do).
    """
    if backend not in BACKENDS:
        raise CovidCxrError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    p = Path(path)
    if formats.is_hf_folder(p):
        if backend == "onnx":
            if not (p / "model.onnx").is_file():
                raise CheckpointError(f"{p} has no model.onnx (it was exported with --no-hf-onnx); use the torch "
                                      "backend or export it again with `covid-cxr export --format hf`")
            return load_predictor(p / "model.onnx", "onnx", device, threads=threads)
        return _torch_predictor(p / formats.WEIGHTS_NAME, device, lambda dev: formats.load_hf_model(p, dev))
    if p.suffix == ".safetensors":
        if backend == "onnx":
            raise CheckpointError(f"{p} holds PyTorch weights; for the onnx backend export an .onnx file with "
                                  "`covid-cxr export --format onnx`")
        return _torch_predictor(p, device, lambda dev: formats.load_safetensors_model(p, dev))
    return load_predictor(p, backend, device, checkpoint, threads=threads)


def _torch_predictor(source: Path, device: str, load) -> Predictor:
    from covid_cxr.model.runtime import resolve_device

    dev = resolve_device(device)
    model, meta = load(dev)
    return Predictor(meta, "torch", source, None, model=model, device=dev)
