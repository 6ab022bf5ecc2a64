"""Grad-CAM heatmaps of where the model looks (the library behind ``covid-cxr explain`` and ``Predictor.explain``).

Grad-CAM (Selvaraju et al., 2017) weights each channel of a feature map by the spatial mean of the
class score's gradient and keeps the positive part of the weighted sum; the map is upsampled
bilinearly and scaled to [0, 1] per image.

Which feature map: the deepest candidate layer of the architecture (``model.ARCHS[arch].cam_layers``)
whose map is at least :data:`MIN_CAM_SIDE` cells on a side. For DenseNet-121 at 224 px that is the
last block (7 x 7), taken *after* the ReLU that torchvision's DenseNet applies to ``features`` (the
tensor the head pools), where Grad-CAM equals the class activation map of Zhou et al. (2016). At
small inputs the last map is too coarse (2 x 2 at 64 px: every cell sees the whole image), so an
earlier block is used.

The heatmap shows where evidence for a class was found, not why, and not a localisation of disease.
It is scaled per image, so a faint map on a confident "normal" image looks as bright as a strong one.
Overlays are drawn at a bounded resolution (:data:`MAX_OVERLAY_SIDE`), and images with an absurd
aspect ratio (:data:`MAX_ASPECT`) are refused. Research use only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from covid_cxr.errors import ConfigError, ImageReadError
from covid_cxr.figures import save_figure
from covid_cxr.files import printable
from covid_cxr.imaging.pixels import preprocess
from covid_cxr.model.meta import ModelMeta, format_probability
from covid_cxr.model.networks import ARCHS, CxrNet

log = logging.getLogger(__name__)

HEATMAP_SUFFIX = "_gradcam.png"
MIN_CAM_SIDE = 7
"""The automatic layer is the deepest whose map has at least this many cells on a side (7 x 7 is DenseNet's
last map at 224 px, the resolution Grad-CAM is usually shown at)."""
MAX_OVERLAY_SIDE = 768
"""Overlays are drawn with the image's longer side at most this many pixels (bounded time, memory and size)."""
MAX_ASPECT = 8.0
"""Images more elongated than this (e.g. 10 x 5000 px) are no chest radiograph; no heatmap is drawn for them."""
COLORMAP = "inferno"
"""A perceptually uniform colour map (equal steps look equal, and it reads in grey), unlike jet."""
CAVEAT = "Grad-CAM: where evidence for the class was found, not why; not a localisation of disease. Research use only."


def check_aspect(image: np.ndarray, path: str | Path = "image") -> None:
    """Refuse an image whose aspect ratio exceeds :data:`MAX_ASPECT` (raises :class:`ImageReadError`)."""
    h, w = image.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ImageReadError(path, f"{w}x{h} pixels is an aspect ratio over {MAX_ASPECT:g}: not a chest radiograph, "
                                   "so no heatmap is drawn; crop the image to the chest")


def display_image(image: np.ndarray) -> np.ndarray:
    """The image shrunk (aspect kept) so its longer side is at most :data:`MAX_OVERLAY_SIDE`."""
    h, w = image.shape
    scale = MAX_OVERLAY_SIDE / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def cam_layers(model: CxrNet) -> tuple[str, ...]:
    """The architecture's Grad-CAM candidate layers, deepest first."""
    if not isinstance(model, CxrNet):
        raise TypeError(f"grad_cam needs a covid-cxr model (CxrNet), got {type(model).__name__}")
    return ARCHS[model.arch].cam_layers


def _cam(model: CxrNet, x: torch.Tensor, target: int, layer: str | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Low-resolution Grad-CAM (h, w), not normalised; the logits (1, K) of the same forward pass; the layer."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam expects one preprocessed image of shape (1, C, S, S), got {tuple(x.shape)}")
    names = cam_layers(model)
    if layer is not None and layer not in names:
        raise ValueError(f"unknown Grad-CAM layer {layer!r}; choose one of {names} or None (automatic)")
    store: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            # Hand the rest of the network a clone: DenseNet next runs an in-place ReLU on `features`, and
            # the clone keeps the block's own output (saved for backward) untouched while holding exactly
            # the map the head pools, so its gradient is the head's (CAM equivalence).
            store[name] = output.clone()
            return store[name]
        return hook

    handles = [model.cam_module(n).register_forward_hook(keep(n)) for n in names]
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
                layer = next((n for n in names if min(store[n].shape[-2:]) >= MIN_CAM_SIDE), names[-1])
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


def grad_cam(model: CxrNet, x: torch.Tensor, target: int, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of class ``target`` for one preprocessed image.

    Args:
        model: a :class:`~covid_cxr.model.networks.CxrNet` (any mode; restored after).
        x: (1, C, S, S) network input (:func:`covid_cxr.imaging.pixels.preprocess`), on the model's device.
        target: class index.
        layer: one of the architecture's candidate layers; default: the deepest with at least
            :data:`MIN_CAM_SIDE` cells on a side.

    Returns:
        (S, S) float32 heatmap in [0, 1] (all zeros when no location supports the class).

    Forward hooks are attached to ``model`` for the duration of the call, so do not run other forward
    passes of the same model object concurrently (e.g. from several server threads).
    """
    cam, _, _ = _cam(model, x, target, layer)
    return _upsample(cam, tuple(x.shape[-2:]))


def resolve_target(meta: ModelMeta, target: str | int | None, predicted: int | None = None) -> int:
    """Class index of a Grad-CAM target: a label name or index; ``None`` -> the positive class (covid), or the
    predicted class for a model without one.

    Raises:
        ConfigError: an unknown label name or index.
    """
    labels = list(meta.labels)
    if target is None:
        if meta.positive_index is not None:
            return meta.positive_index
        if predicted is None:
            raise ValueError("a model without a positive class needs the predicted class to explain")
        return int(predicted)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(labels):
            return int(target)
    elif target in labels:
        return labels.index(target)
    raise ConfigError(f"--target {target!r} is not a class of this model; choose one of {', '.join(labels)}")


def explain_array(model: CxrNet, meta: ModelMeta, image: np.ndarray, target: str | int | None = None,
                  layer: str | None = None, path: str | Path = "image") -> dict:
    """Grad-CAM of one decoded image.

    Returns:
        ``{"heatmap": (h, w) float32 in [0, 1] at the display resolution, "display": the (h, w) uint8 image it
        goes with, "log_probs": (K,), "target": class index, "layer": name, "predicted": class index}``.

    Raises:
        ImageReadError: an absurd aspect ratio (see :func:`check_aspect`).
    """
    check_aspect(image, path)
    device = next(model.parameters()).device
    spec = meta.preprocess
    if spec.needs_lungs:  # the lung view the model sees; the heatmap is shown on the same view of the image
        from covid_cxr.imaging.lung_masks import view_lungs
        from covid_cxr.imaging.pixels import finish, shrink_short_side, stage2
        from covid_cxr.model.lungs import TorchLungMasker

        stage1 = shrink_short_side(np.ascontiguousarray(image), spec.base_short_side)
        mask = TorchLungMasker(model.lungs, device).masks([stage1])[0]
        x = torch.from_numpy(finish(stage2(stage1, spec, mask)[0], spec)).unsqueeze(0).to(device)
        image = view_lungs(image, mask, spec.lung_view, spec.lung_margin)[0]
    else:
        x = torch.from_numpy(preprocess(image, spec)).unsqueeze(0).to(device)
    first = resolve_target(meta, target, 0 if meta.positive_index is None and target is None else None)
    cam, logits, used = _cam(model, x, first, layer)
    lp = meta.log_probs(logits.cpu().numpy())
    predicted = int(meta.decide(lp)[0])
    k = resolve_target(meta, target, predicted)
    if k != first:  # target=None on a model without a positive class: explain the predicted class
        cam, _, used = _cam(model, x, k, layer)
    shown = display_image(image)
    return {"heatmap": _upsample(cam, shown.shape), "display": shown, "log_probs": lp[0], "target": k, "layer": used,
            "predicted": predicted}


def heatmap_for_image(model: CxrNet, meta: ModelMeta, image: np.ndarray, target: str | int | None = None,
                      layer: str | None = None) -> np.ndarray:
    """Grad-CAM of a decoded image at its display resolution (the image itself when it is small enough).

    Preprocessing squashes the whole image (or, for a model with a lung view, the lung fields' box) to the model's
    square input (no padding), so the low-resolution map is stretched straight back onto that image (or box).
    """
    return explain_array(model, meta, image, target, layer)["heatmap"]


def overlay_png(image: np.ndarray, heatmap: np.ndarray, path_or_buffer: str | Path | BinaryIO, caption: str = "",
                alpha: float = 0.5, synthetic: bool = False) -> None:
    """Write a PNG of ``image`` (grey) with ``heatmap`` blended on top (perceptually uniform colours, transparent
    where there is no heat) and the Grad-CAM caveat.

    Args:
        image: (H, W) uint8 at the display resolution (:func:`display_image`).
        heatmap: (H, W) in [0, 1] of the same shape.
        path_or_buffer: file path or binary buffer.
        caption: title text (file, prediction, target).
    """
    if image.ndim != 2 or heatmap.shape != image.shape:
        raise ValueError(f"overlay needs a (H, W) image and a heatmap of the same shape, got {image.shape} "
                         f"and {heatmap.shape}")
    h, w = image.shape
    if max(h, w) > MAX_OVERLAY_SIDE:
        raise ValueError(f"overlay images are at most {MAX_OVERLAY_SIDE} px; pass display_image(image)")
    fig_w = 6.0
    fig = Figure(figsize=(fig_w, fig_w * 0.82 * h / w + 1.3))
    ax = fig.add_subplot()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    # Per-pixel alpha: no heat leaves the radiograph untouched.
    shown = ax.imshow(heat, cmap=COLORMAP, vmin=0.0, vmax=1.0, alpha=alpha * heat, interpolation="bilinear")
    ax.axis("off")
    cbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    cbar.solids.set_alpha(1.0)
    cbar.set_label("Grad-CAM, scaled per image", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if caption:
        ax.set_title(caption, fontsize=9)
    fig.text(0.5, 0.035, CAVEAT, fontsize=7, ha="center", va="bottom", color="0.25", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path_or_buffer, synthetic)


def unique_names(paths: list[Path]) -> list[str]:
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


def caption_for(name: str, meta: ModelMeta, log_probs: np.ndarray, target: int, in_scope: bool | None = None) -> str:
    """File name; prediction with P(positive class) and the threshold; the Grad-CAM target."""
    labels = list(meta.labels)
    k = int(meta.decide(np.asarray(log_probs)[None])[0])
    probs = np.exp(log_probs)
    name = printable(name)  # a file name that is not UTF-8 cannot be drawn as it is
    if len(name) > 60:
        name = name[:28] + "..." + name[-29:]
    pos = meta.positive_index
    head = (f"predicted {labels[k]}: P({labels[pos]}) {format_probability(probs[pos])}, decision at "
            f"{meta.threshold_text()}" if pos is not None else f"predicted {labels[k]} (P {format_probability(probs[k])})")
    weak = probs[target] < 0.5
    lines = [name, head, f"heatmap of the evidence for '{labels[target]}'"
             + (f" (P {format_probability(probs[target])}: little evidence; colours are relative)" if weak else "")]
    if in_scope is False:
        lines.insert(1, "OUT OF SCOPE: unlike the chest X-rays the model was trained on")
    return "\n".join(lines)
