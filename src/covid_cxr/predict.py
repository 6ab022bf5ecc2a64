"""``covid-cxr predict``: class probabilities for image files and folders.

:func:`predict_images` is the one prediction function that the CLI (and later the web
app and export checks) use: decode with :func:`covid_cxr.images.load_image`,
:func:`covid_cxr.transforms.preprocess`, model, softmax, threshold.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from covid_cxr import DISCLAIMER
from covid_cxr.config import PredictConfig
from covid_cxr.errors import CovidCxrError, ImageReadError
from covid_cxr.images import is_image_file, load_image
from covid_cxr.manifest import atomic_write_text
from covid_cxr.metrics import predicted_labels
from covid_cxr.model import load_checkpoint, resolve_checkpoint
from covid_cxr.runtime import setup_runtime
from covid_cxr.transforms import PreprocessSpec, preprocess

log = logging.getLogger(__name__)


def list_images(inputs: list[str] | tuple[str, ...]) -> list[Path]:
    """Expand files and folders (recursively) into image paths, in a stable order.

    Raises:
        CovidCxrError: a path does not exist, or a folder holds no PNG/JPEG file.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not files:
                raise CovidCxrError(f"folder {p} holds no .png, .jpg or .jpeg files")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise CovidCxrError(f"{p} does not exist; pass image files or folders")
    return found


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities from logits, with the checkpoint's temperature (1.0 = uncalibrated)."""
    return torch.softmax(logits.float() / float(temperature), dim=-1)


@torch.inference_mode()
def predict_arrays(model: nn.Module, images: list[np.ndarray], spec: PreprocessSpec,
                   device: torch.device | str = "cpu", temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, K) for decoded uint8 grayscale images."""
    model.eval()
    batch = torch.stack([preprocess(img, spec) for img in images]).to(device)
    return probabilities(model(batch), temperature).cpu().numpy()


def predict_images(model: nn.Module, meta: dict, paths: list[Path], batch_size: int = 16,
                   device: torch.device | str = "cpu", skip_unreadable: bool = False) -> list[dict]:
    """One result dict per path: ``path``, ``prob_<label>``..., ``predicted_label``, ``threshold``, ``error``.

    Raises:
        ImageReadError: an unreadable file, unless ``skip_unreadable`` (then its row carries the reason).
    """
    labels, spec, threshold = list(meta["labels"]), meta["preprocess_spec"], float(meta["threshold"])
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        decoded, ok = [], []
        for p in chunk:
            try:
                decoded.append(load_image(p))
                ok.append(p)
            except ImageReadError as exc:
                if not skip_unreadable:
                    raise
                results.append({"path": str(p), **{f"prob_{lab}": None for lab in labels},
                                "predicted_label": None, "threshold": threshold, "error": exc.reason})
        if decoded:
            probs = predict_arrays(model, decoded, spec, device, float(meta.get("temperature", 1.0)))
            for p, pr, k in zip(ok, probs, predicted_labels(probs, threshold)):
                results.append({"path": str(p), **{f"prob_{lab}": float(v) for lab, v in zip(labels, pr)},
                                "predicted_label": labels[int(k)], "threshold": threshold, "error": ""})
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])


def load_predictor(run: str | Path, backend: str = "torch", checkpoint: str = "best",
                   device: torch.device | str = "cpu"):
    """(model, meta) for a backend: the torch checkpoint, or its ONNX export run by onnxruntime."""
    if backend == "onnx":
        from covid_cxr.export import load_onnx

        p = Path(run)
        onnx_path = p if p.suffix == ".onnx" else p / "model.onnx"
        if not onnx_path.is_file():
            raise CovidCxrError(f"{onnx_path} not found; export the model first: covid-cxr export --run {run} "
                                "--format onnx")
        model = load_onnx(onnx_path)
        return model, model.meta
    return load_checkpoint(resolve_checkpoint(run, checkpoint), device)


def run(cfg: PredictConfig) -> dict:
    """Predict every image in ``cfg.inputs``; write CSV/JSON to ``cfg.out`` or return it as text."""
    rt = setup_runtime(cfg.device)
    model, meta = load_predictor(cfg.run, cfg.backend, cfg.checkpoint, rt.device)
    paths = list_images(cfg.inputs)
    device = rt.device if cfg.backend == "torch" else "cpu"
    results = predict_images(model, meta, paths, cfg.batch_size, device, cfg.skip_unreadable)
    if cfg.heatmaps:
        from covid_cxr.explain import explain_images

        torch_model, torch_meta = (model, meta) if cfg.backend == "torch" else load_checkpoint(
            resolve_checkpoint(Path(cfg.run).parent if Path(cfg.run).suffix == ".onnx" else cfg.run,
                               cfg.checkpoint), rt.device)
        readable = [Path(r["path"]) for r in results if not r["error"]]
        rows = explain_images(torch_model, torch_meta, readable, Path(cfg.heatmaps))
        by_path = {r["path"]: r["heatmap_png"] for r in rows}
        for r in results:
            r["heatmap_png"] = by_path.get(r["path"], "")
    if cfg.format == "json":
        text = json.dumps({"disclaimer": DISCLAIMER, "model": meta["path"], "backend": cfg.backend,
                           "labels": meta["labels"],
                           "threshold": meta["threshold"], "predictions": results}, indent=2) + "\n"
    else:
        buf = io.StringIO()
        pd.DataFrame(results).to_csv(buf, index=False)
        text = buf.getvalue()
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    errors = sum(1 for r in results if r["error"])
    return {"images": len(results), "unreadable": errors, "out": cfg.out, "text": None if cfg.out else text}
