"""``covid-cxr explain``: Grad-CAM heatmaps of where the model looks.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a feature map by the spatial mean
of the class score's gradient and keeps the positive part of the weighted sum; the map is
upsampled bilinearly and scaled to [0, 1] per image.

Which feature map: the deepest DenseNet stage whose map is at least :data:`MIN_CAM_SIDE`
cells on a side. At the usual 224 px that is the last block (7 x 7), taken *after* the ReLU
that torchvision's DenseNet applies to ``model.features`` (the tensor the classifier pools),
where Grad-CAM equals the class activation map ``relu(sum_k W[c, k] * A_k)`` of Zhou et al.
(2016). At small inputs the last map is too coarse to show anything (2 x 2 at 64 px: every
cell sees the whole image and the heatmap comes out flat), so an earlier block is used
(``denseblock2``, 8 x 8, at 64 px).

The heatmap shows where evidence for a class was found, not why. It is scaled per image, so
a faint map on a confident "normal" image looks as bright as a strong one. Research use only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from covid_cxr import DISCLAIMER
from covid_cxr.config import ConfigError
from covid_cxr.images import load_image
from covid_cxr.manifest import atomic_write_text
from covid_cxr.metrics import predicted_labels
from covid_cxr.plots import _save
from covid_cxr.transforms import preprocess

log = logging.getLogger(__name__)

POSITIVE_CLASS = "covid"
"""Default Grad-CAM target when the model has this class; otherwise the predicted class."""

HEATMAP_SUFFIX = "_gradcam.png"


CAM_LAYERS = ("features", "denseblock3", "denseblock2", "denseblock1")
"""Candidate Grad-CAM layers, deepest first: the ReLU'd output of ``model.features`` (stride 32),
then the outputs of ``model.features.denseblock3`` (16), ``denseblock2`` (8), ``denseblock1`` (4)."""

MIN_CAM_SIDE = 7
"""The automatic layer is the deepest whose map has at least this many cells on a side (7 x 7 is the
last block's map at 224 px, the resolution Grad-CAM is usually shown at)."""


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module) or not all(hasattr(features, n) for n in CAM_LAYERS[1:]):
        raise TypeError(f"grad_cam needs a torchvision DenseNet (model.features with dense blocks); "
                        f"got {type(model).__name__}")
    return {"features": features, **{n: getattr(features, n) for n in CAM_LAYERS[1:]}}


def _cam(model: nn.Module, x: torch.Tensor, target: int,
         layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Low-resolution Grad-CAM (h, w), not normalised; the logits (1, K) of the same forward pass; the layer."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam expects one preprocessed image of shape (1, 3, S, S), got {tuple(x.shape)}")
    if layer is not None and layer not in CAM_LAYERS:
        raise ValueError(f"unknown Grad-CAM layer {layer!r}; choose one of {CAM_LAYERS} or None (automatic)")
    store: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            if name != "features":
                store[name] = output
                return None
            # DenseNet.forward next runs F.relu(features, inplace=True) on what this hook returns.
            # Handing it a clone keeps the block's own output (saved for backward) untouched; after
            # the forward the clone holds exactly the ReLU'd map the classifier pools, and its
            # gradient is the classifier's (CAM equivalence).
            store[name] = output.clone()
            return store[name]
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in _layer_modules(model).items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # An input that needs a gradient keeps the graph alive even if the weights are frozen.
            logits = model(x.detach().requires_grad_(True))
            k = logits.shape[1]
            if not 0 <= int(target) < k:
                raise ValueError(f"target class {target} out of range for a {k}-class model")
            if layer is None:
                layer = next((n for n in CAM_LAYERS if min(store[n].shape[-2:]) >= MIN_CAM_SIDE), CAM_LAYERS[-1])
            act = store[layer]
            (grad,) = torch.autograd.grad(logits[0, int(target)], act)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = grad[0].mean(dim=(1, 2))  # (C,)
    cam = F.relu(torch.einsum("c,chw->hw", weights, act[0].detach()))
    return cam.detach(), logits.detach(), layer


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a non-negative (h, w) map to ``size``, scaled to [0, 1] by its maximum."""
    up = F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up.clamp_(min=0).cpu().numpy()
    peak = float(up.max())
    return (up / peak if peak > 0 else up).astype(np.float32)


def grad_cam(model: nn.Module, x: torch.Tensor, target: int, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of class ``target`` for one preprocessed image.

    Args:
        model: a DenseNet from :func:`covid_cxr.model.build_model` (any mode; restored after).
        x: (1, 3, S, S) tensor from :func:`covid_cxr.transforms.preprocess`, on the model's device.
        target: class index.
        layer: one of :data:`CAM_LAYERS`; default: the deepest with at least :data:`MIN_CAM_SIDE`
            cells on a side.

    Returns:
        (S, S) float32 heatmap in [0, 1] (all zeros when no location supports the class).

    Forward hooks are attached to ``model`` for the duration of the call, so do not run other
    forward passes of the same model object concurrently (e.g. from several server threads).
    """
    cam, _, _ = _cam(model, x, target, layer)
    return _upsample(cam, tuple(x.shape[-2:]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_target(labels: list[str], target: str | int | None, probs: np.ndarray | None = None,
                   threshold: float = 0.5) -> int:
    """Class index of a Grad-CAM target: a label name or index; ``None`` -> :data:`POSITIVE_CLASS` if the
    model has it, else the predicted class (needs ``probs``).

    Raises:
        ValueError: an unknown label name or index.
    """
    if target is None:
        if POSITIVE_CLASS in labels:
            return labels.index(POSITIVE_CLASS)
        if probs is None:
            raise ValueError("target=None without a 'covid' class needs the probabilities to pick the prediction")
        return int(predicted_labels(np.asarray(probs)[None], threshold)[0])
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(labels):
            return int(target)
    elif target in labels:
        return labels.index(target)
    raise ValueError(f"unknown target class {target!r}; the model's classes are {labels}")


def _explain_array(model: nn.Module, meta: dict, image: np.ndarray, target: str | int | None,
                   layer: str | None = None) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(heatmap at the image's resolution, probabilities, target index, layer used)."""
    labels, spec = list(meta["labels"]), meta["preprocess_spec"]
    x = preprocess(image, spec).unsqueeze(0).to(_device(model))
    first = resolve_target(labels, target) if target is not None or POSITIVE_CLASS in labels else 0
    cam, logits, used = _cam(model, x, first, layer)
    from covid_cxr.predict import probabilities  # not at the top: predict may import this module

    probs = probabilities(logits, float(meta.get("temperature", 1.0)))[0].cpu().numpy()
    k = resolve_target(labels, target, probs, float(meta["threshold"]))
    if k != first:  # target=None on a model without a 'covid' class: explain the predicted class
        cam, _, used = _cam(model, x, k, layer)
    return _upsample(cam, image.shape), probs, k, used


def heatmap_for_image(model: nn.Module, meta: dict, image: np.ndarray,
                      target: str | int | None = None, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of a decoded image, at the image's own (H, W) resolution.

    Preprocessing squashes the whole image to the model's square input (no crop or padding),
    so the low-resolution map is stretched straight back onto the image.

    Args:
        model, meta: from :func:`covid_cxr.model.load_checkpoint`.
        image: (H, W) uint8 from :func:`covid_cxr.images.load_image`.
        target: class name or index; default :data:`POSITIVE_CLASS` (else the predicted class).
        layer: see :func:`grad_cam`.

    Returns:
        (H, W) float32 heatmap in [0, 1].
    """
    heat, _, _, _ = _explain_array(model, meta, image, target, layer)
    return heat


def overlay_png(image: np.ndarray, heatmap: np.ndarray, path_or_buffer: str | Path | BinaryIO,
                caption: str = "", alpha: float = 0.45) -> None:
    """Write a PNG of ``image`` (gray) with ``heatmap`` blended on top in colour (jet, transparent where 0).

    Args:
        image: (H, W) uint8.
        heatmap: (H, W) in [0, 1], e.g. from :func:`heatmap_for_image`.
        path_or_buffer: file path or binary buffer.
        caption: title text (label, probability, target); the research-use line is always added.
    """
    if image.ndim != 2 or heatmap.shape != image.shape:
        raise ValueError(f"overlay needs a (H, W) image and a heatmap of the same shape, got {image.shape} "
                         f"and {heatmap.shape}")
    h, w = image.shape
    fig_w = 4.6
    fig = Figure(figsize=(fig_w, fig_w * 0.85 * h / w + 0.9))
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    # Per-pixel alpha: no heat leaves the radiograph untouched instead of tinting it blue.
    shown = ax.imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha * heat, interpolation="bilinear")
    ax.axis("off")
    cbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    cbar.solids.set_alpha(1.0)
    cbar.set_label("Grad-CAM (scaled per image)", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    if caption:
        ax.set_title(caption, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, Path(path_or_buffer) if isinstance(path_or_buffer, str) else path_or_buffer)


def _unique_names(paths: list[Path]) -> list[str]:
    """``<stem>_gradcam.png`` per path; colliding stems get ``-2``, ``-3``... in input order."""
    used: set[str] = set()
    names = []
    for p in paths:
        stem, n = p.stem, 1
        name = f"{stem}{HEATMAP_SUFFIX}"
        while name.lower() in used:  # case-insensitive: macOS and Windows file systems
            n += 1
            name = f"{stem}-{n}{HEATMAP_SUFFIX}"
        used.add(name.lower())
        names.append(name)
    return names


def caption_for(name: str, labels: list[str], probs: np.ndarray, threshold: float, target: int) -> str:
    """Three lines: file name, prediction with P(positive class) and threshold, Grad-CAM target."""
    k = int(predicted_labels(np.asarray(probs)[None], threshold)[0])
    pos = labels.index(POSITIVE_CLASS) if POSITIVE_CLASS in labels else k
    if len(name) > 60:
        name = name[:28] + "..." + name[-29:]
    weak = probs[target] < 0.5
    return (f"{name}\npredicted {labels[k]}: P({labels[pos]}) {probs[pos]:.2f} (threshold {threshold:.2f})\n"
            f"Grad-CAM for '{labels[target]}'"
            + (f" (P {probs[target]:.2f}: little evidence, colours are relative)" if weak else ""))


def explain_images(model: nn.Module, meta: dict, paths: list[Path], out_dir: Path,
                   target: str | None = None) -> list[dict]:
    """Write ``<out_dir>/<stem>_gradcam.png`` for every image and return one row per image.

    Rows hold ``path``, ``heatmap_png``, ``target``, ``layer`` (Grad-CAM layer), ``prob_<label>``...,
    ``predicted_label`` and ``threshold`` (the same probabilities as ``covid-cxr predict``).

    Raises:
        ImageReadError: an unreadable file (named in the message); nothing is skipped.
        ValueError: an unknown target class.
    """
    labels, threshold = list(meta["labels"]), float(meta["threshold"])
    if target is not None:
        resolve_target(labels, target)  # fail before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, name in zip(map(Path, paths), _unique_names([Path(p) for p in paths])):
        image = load_image(p)
        heat, probs, k, layer = _explain_array(model, meta, image, target)
        png = out_dir / name
        overlay_png(image, heat, png, caption_for(p.name, labels, probs, threshold, k))
        pred = int(predicted_labels(probs[None], threshold)[0])
        rows.append({"path": str(p), "heatmap_png": str(png), "target": labels[k], "layer": layer,
                     **{f"prob_{lab}": float(v) for lab, v in zip(labels, probs)},
                     "predicted_label": labels[pred], "threshold": threshold})
    return rows


@dataclass(frozen=True)
class ExplainConfig:
    """Options of ``covid-cxr explain``."""

    run: str
    """Run folder (or a checkpoint file)."""
    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively for PNG and JPEG files)."""
    out: str
    """Folder for the heatmap PNGs and explanations.json."""
    target: str | None = None
    """Class to explain; default 'covid' (or the predicted class for a model without one)."""
    checkpoint: str = "best"
    """'best' or 'last'."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("explain needs at least one image file or folder")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError("--checkpoint must be best or last")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run(cfg: ExplainConfig) -> dict:
    """Explain every image in ``cfg.inputs``; writes the PNGs and ``explanations.json`` to ``cfg.out``.

    Returns:
        {"images", "out", "target", "results": rows of :func:`explain_images`, "disclaimer"}.
    """
    # predict may import this module for `predict --heatmaps`; import it here to avoid a cycle.
    from covid_cxr.model import load_checkpoint, resolve_checkpoint
    from covid_cxr.predict import list_images
    from covid_cxr.runtime import setup_runtime

    rt = setup_runtime(cfg.device)
    model, meta = load_checkpoint(resolve_checkpoint(cfg.run, cfg.checkpoint), rt.device)
    labels = list(meta["labels"])
    if cfg.target is not None and cfg.target not in labels:
        raise ConfigError(f"--target {cfg.target!r} is not a class of this model; choose one of {labels}")
    paths = list_images(cfg.inputs)
    out = Path(cfg.out)
    rows = explain_images(model, meta, paths, out, cfg.target)
    result = {"disclaimer": DISCLAIMER, "model": meta["path"], "labels": labels,
              "target": cfg.target or ("covid (positive class)" if POSITIVE_CLASS in labels else "predicted class"),
              "method": f"Grad-CAM on the deepest DenseNet block with at least {MIN_CAM_SIDE}x{MIN_CAM_SIDE} cells "
                        f"({rows[0]['layer'] if rows else 'none'} at {meta['preprocess_spec'].size} px), bilinear "
                        "upsampling, scaled to [0, 1] per image",
              "images": len(rows), "out": str(out), "results": rows}
    atomic_write_text(out / "explanations.json", json.dumps(result, indent=2) + "\n")
    return result
