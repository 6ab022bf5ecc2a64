"""The model behind the web app: loaded once, shared by concurrent requests.

:class:`Engine` predicts with the same functions as ``covid-cxr predict`` (PyTorch:
:func:`covid_cxr.predict.predict_arrays`; ONNX: :meth:`covid_cxr.export.OnnxModel.predict_arrays`,
which calls the same function) and explains with :func:`covid_cxr.explain.heatmap_for_image`.

Thread safety: a forward pass in eval/inference mode does not change the module, so several
threads may predict with one model at once. Grad-CAM does change it while it runs (it attaches
forward hooks and needs gradients), so heatmaps use their own copy of the PyTorch model, one at
a time under a lock. With the ONNX backend the heatmap comes from the PyTorch checkpoint the
graph was exported from (checked by sha256): a graph has no gradients to take.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.errors import CheckpointError
from covid_cxr.explain import caption_for, heatmap_for_image, overlay_png, resolve_target
from covid_cxr.images import load_image, sha256_file
from covid_cxr.metrics import predicted_labels
from covid_cxr.model import load_checkpoint, resolve_checkpoint
from covid_cxr.predict import predict_arrays

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


def _torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use device 'cpu'")
    return torch.device(device)


def _onnx_source_sha(onnx_file: Path) -> str | None:
    from covid_cxr.export import metadata_path

    try:
        doc = json.loads(metadata_path(onnx_file).read_text(encoding="utf-8"))
        return doc["source_checkpoint"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_onnx(checkpoint: Path, checkpoint_sha: str, onnx_path: str | Path | None,
                scratch: list[tempfile.TemporaryDirectory]) -> Path:
    """The ONNX file to serve for ``checkpoint``, exporting it when there is none.

    ``onnx_path`` given: exported there if missing; an existing file must come from ``checkpoint``.
    Not given: ``<checkpoint folder>/model.onnx``, exported there if missing; if that file comes from
    another checkpoint (or the folder is read-only), a fresh export goes to a temporary folder kept
    for the life of the app (appended to ``scratch``), and the run folder is left alone.

    Raises:
        CheckpointError: an explicit ``onnx_path`` was exported from a different checkpoint.
        ExportError: the export failed.
    """
    from covid_cxr.export import export_onnx

    explicit = onnx_path is not None
    target = Path(onnx_path) if explicit else checkpoint.parent / "model.onnx"
    if target.is_file():
        source = _onnx_source_sha(target)
        if source == checkpoint_sha:
            return target
        if explicit:
            raise CheckpointError(f"{target} was exported from another checkpoint (sha256 {source}, not "
                                  f"{checkpoint_sha} of {checkpoint}); export {checkpoint} again with "
                                  "`covid-cxr export` or pass the matching --run/--checkpoint")
        log.warning("%s was exported from another checkpoint than %s; exporting to a temporary folder instead",
                    target, checkpoint)
    else:
        try:
            log.info("no ONNX model at %s: exporting %s (once)", target, checkpoint)
            export_onnx(checkpoint, target)
            return target
        except OSError as exc:
            if explicit:
                raise
            log.warning("cannot write %s (%s); exporting to a temporary folder instead", target, exc)
    scratch.append(tempfile.TemporaryDirectory(prefix="covid-cxr-onnx-"))
    target = Path(scratch[-1].name) / "model.onnx"
    export_onnx(checkpoint, target)
    return target


def _caption_name(filename: str) -> str:
    """A client's file name made safe for a Matplotlib title ('$' starts math mode there)."""
    return re.sub(r"[^\w.\- ()]+", "_", filename)[:80] or "upload"


class Engine:
    """A loaded model plus everything a response reports about it.

    Args:
        run: run folder or checkpoint file.
        backend: ``torch`` or ``onnx``.
        checkpoint: ``best`` or ``last`` (for a run folder).
        onnx_path: ONNX file for the ``onnx`` backend (see :func:`ensure_onnx`).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        onnx_threads: intra-op threads for ONNX Runtime on CPU (None: all CPUs this process may use).

    Raises:
        CheckpointError, ExportError, ValueError: the model cannot be loaded.
    """

    def __init__(self, run: str | Path, backend: str = "torch", checkpoint: str = "best",
                 onnx_path: str | Path | None = None, device: str = "auto", onnx_threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.checkpoint = resolve_checkpoint(run, checkpoint)
        self.device = _torch_device(device)
        model, meta = load_checkpoint(self.checkpoint, self.device)
        self.checkpoint_sha256 = sha256_file(self.checkpoint)
        self._scratch: list[tempfile.TemporaryDirectory] = []
        self.onnx_file: Path | None = None
        if backend == "torch":
            self._predictor = model
            self._cam_model = copy.deepcopy(model)
        else:
            from covid_cxr.export import load_onnx

            self.onnx_file = ensure_onnx(self.checkpoint, self.checkpoint_sha256, onnx_path, self._scratch)
            self._predictor = load_onnx(self.onnx_file, device="cpu" if self.device.type == "cpu" else "auto",
                                        threads=onnx_threads)
            if list(self._predictor.meta["labels"]) != list(meta["labels"]):
                raise CheckpointError(f"{self.onnx_file} has labels {self._predictor.meta['labels']}, "
                                      f"{self.checkpoint} has {meta['labels']}; export the checkpoint again")
            self._cam_model = model  # only heatmaps use the PyTorch model
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta.get("temperature", 1.0))
        self._cam_lock = threading.Lock()

    @property
    def positive_class(self) -> str | None:
        """The class the threshold applies to (class 1 of a two-class model); None: argmax over K classes."""
        return self.labels[1] if len(self.labels) == 2 else None

    def model_info(self) -> dict:
        """What a response says about the model."""
        info = {"version": __version__, "checkpoint": self.checkpoint.name,
                "checkpoint_sha256": self.checkpoint_sha256, "backend": self.backend, "labels": self.labels,
                "temperature": self.temperature, "image_size": self.meta["preprocess_spec"].size,
                "trained_with": self.meta.get("version")}
        if self.onnx_file is not None:
            info["onnx_file"] = self.onnx_file.name
        return info

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(K,) class probabilities for one decoded (H, W) uint8 image, with the configured backend."""
        if self.backend == "onnx":
            return self._predictor.predict_arrays([image])[0]
        return predict_arrays(self._predictor, [image], self.meta["preprocess_spec"], self.device,
                              self.temperature)[0]

    def heatmap(self, image: np.ndarray, probs: np.ndarray, filename: str = "") -> dict:
        """Grad-CAM overlay PNG (base64) and what it shows, from the PyTorch checkpoint."""
        target = resolve_target(self.labels, None, probs, self.threshold)
        with self._cam_lock:
            heat = heatmap_for_image(self._cam_model, self.meta, image, target)
        buf = io.BytesIO()
        overlay_png(image, heat, buf, caption_for(_caption_name(filename), self.labels, probs, self.threshold,
                                                  target))
        source = "the PyTorch checkpoint" + (" the ONNX graph was exported from (a graph has no gradients)"
                                             if self.backend == "onnx" else "")
        return {"heatmap_png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
                "heatmap": {"method": "Grad-CAM", "target": self.labels[target], "computed_with": source,
                            "note": "Where the model found evidence for the target class, scaled per image; "
                                    "not why, and not a localisation of disease"}}

    def analyse(self, path: Path, heatmap: bool = False, filename: str = "") -> dict:
        """Decode an image file and answer as ``POST /v1/predict`` does.

        Raises:
            ImageReadError: the file cannot be decoded.
        """
        image = load_image(path)
        probs = self.probabilities(image)
        k = int(predicted_labels(probs[None], self.threshold)[0])
        result = {"probabilities": {lab: float(p) for lab, p in zip(self.labels, probs)},
                  "label": self.labels[k], "threshold": self.threshold, "positive_class": self.positive_class,
                  "model": self.model_info(), "disclaimer": DISCLAIMER,
                  "image": {"width": int(image.shape[1]), "height": int(image.shape[0])}}
        if heatmap:
            result.update(self.heatmap(image, probs, filename))
        return result
