"""The lung-field segmenter: a small U-Net (about 0.5 M parameters, CPU-friendly at 256 px), saved and read with the
classifier's checkpoint writer and reader (same meta, same checksum), and applied to decoded images.

:func:`load_segmenter` also reads a torchxrayvision ChestX-Det PSPNet state dict (:mod:`covid_cxr.model.pspnet`,
the union of its two lung classes at 512 px; about 260 MB and several seconds per image on a CPU): for
``lungs predict`` and ``audit --lungs``, not for a classifier to carry (``train --lungs`` refuses it).

The U-Net's input and the clean-up are :mod:`covid_cxr.imaging.lung_masks` (no PyTorch), shared with everything that
uses the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.lung_masks import (LUNG_INPUT_SIZE, MASK_THRESHOLD, LungCheck, check_lungs, clean_mask,
                                          cleaned_masks, lung_input, resize_mask)
from covid_cxr.imaging.pixels import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.networks import LungNet, _torch_load
from covid_cxr.model.pspnet import (LUNG_TARGETS, PSPNET_ARCH, PSPNET_BATCH, PSPNET_SIZE, PSPNET_SOURCE,
                                    ChestXDetLungs, chestx_det_input, chestx_det_lungs, pspnet_state)

LUNG_ARCH = "lung-unet"
"""The ``arch`` a lung segmenter's checkpoint records (a classifier's is a backbone name)."""
LUNG_LABELS = ("background", "lung")
MAX_WIDTH = 64
"""Widest first level a checkpoint may ask for (16 is the default; 64 is already ~8 M parameters)."""
MAX_SEGMENTER_BYTES = 512 * 2**20
"""Largest segmenter file read (checked from its size before anything is loaded): covid-cxr's own ``lungs.pt`` is a
few MB (32 MB at width 64), a ChestX-Det PSPNet state dict 260 MB."""


def lung_spec(size: int = LUNG_INPUT_SIZE) -> PreprocessSpec:
    """The checkpoint's record of the input: ``size`` px, one channel (standardised per image, see
    :func:`~covid_cxr.imaging.lung_masks.lung_input`)."""
    return PreprocessSpec(size=size, base_short_side=max(size, 512), mean=(0.0,), std=(1.0,), channels=1)


@torch.no_grad()
def lung_probabilities(net: nn.Module, images, size: int, device, batch_size: int = 16) -> np.ndarray:
    """P(lung) per pixel at ``size``: float32 (N, size, size) for decoded grayscale images (or model pixels).

    The U-Net reads standardised pixels (:func:`~covid_cxr.imaging.lung_masks.lung_input`); a ChestX-Det PSPNet
    reads absolute brightness (:func:`~covid_cxr.model.pspnet.chestx_det_input`: 8-bit images only), a few at a
    time."""
    prepare = lung_input
    if isinstance(net, ChestXDetLungs):
        prepare, batch_size = chestx_det_input, min(batch_size, PSPNET_BATCH)
    was_training = net.training
    net.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = np.stack([prepare(g, size) for g in images[start:start + batch_size]])[:, None]
            out.append(torch.sigmoid(net(torch.from_numpy(x).to(device))).float().cpu().numpy())
    finally:
        net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


@dataclass(frozen=True)
class LungMask:
    """One image's predicted lung fields, at the image's own size, cleaned, with the plausibility verdict."""

    mask: np.ndarray
    check: LungCheck


class LungSegmenter:
    """A trained segmenter in eval mode: :meth:`masks` for decoded grayscale images."""

    def __init__(self, model: LungNet | ChestXDetLungs, meta: ModelMeta, device: str | torch.device = "cpu",
                 checksum: str = "", description: str = "") -> None:
        self.model, self.meta, self.device = model.to(device).eval(), meta, torch.device(device)
        self.checksum = checksum
        """The checkpoint's checksum (provenance, recorded by a classifier that carries this segmenter); for a
        ChestX-Det PSPNet the file's sha256."""
        self.description = description
        """What it is and where it came from, in words."""

    @property
    def model_width(self) -> int:
        """The U-Net's first-level channels: what a classifier that carries it records (``train --lungs``).

        Raises:
            CheckpointError: a ChestX-Det PSPNet, which no classifier carries.
        """
        if isinstance(self.model, ChestXDetLungs):
            raise CheckpointError(f"{self.description}: a classifier cannot carry it (260 MB and several seconds per "
                                  "image on a CPU in every checkpoint, prediction and ONNX export); use it with "
                                  "`covid-cxr lungs predict` or `covid-cxr audit --lungs`, and for `train --lungs` "
                                  "train covid-cxr's own segmenter with `covid-cxr lungs train`")
        return int(self.model.head.in_channels)

    @property
    def size(self) -> int:
        return self.meta.preprocess.size

    def probabilities(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """P(lung) per pixel at the segmenter's size: float32 (N, size, size)."""
        return lung_probabilities(self.model, images, self.size, self.device, batch_size)

    def masks(self, images: list[np.ndarray], batch_size: int = 16) -> list[LungMask]:
        """Each image's lung fields at its own size (two largest parts kept, holes filled) and their verdict."""
        return lung_masks_of(self.model, images, self.device, batch_size)


def lung_masks_of(net: LungNet, images, device, batch_size: int = 16) -> list[LungMask]:
    """Each image's lung fields, by ``net`` (a segmenter, or the one a classifier carries), at the image's own size
    (two largest parts kept, holes filled), with their verdict."""
    result = []
    for gray, prob in zip(images, lung_probabilities(net, images, net.input_size, device, batch_size)):
        mask = resize_mask(clean_mask(prob >= MASK_THRESHOLD), np.asarray(gray).shape[:2])
        result.append(LungMask(mask, check_lungs(mask)))
    return result


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> LungSegmenter:
    """A segmenter from its file: ``covid-cxr lungs train``'s ``lungs.pt`` (or the folder holding it), or a
    torchxrayvision ChestX-Det PSPNet state dict (``pspnet_chestxray_best_model_4.pth``; keys with or without
    ``module.``, or under ``model_state``). Loaded with ``weights_only=True`` and ``strict=True``.

    Raises:
        CheckpointError: missing, larger than :data:`MAX_SEGMENTER_BYTES`, neither of the two, damaged, or a
            classifier rather than a lung segmenter.
    """
    from covid_cxr.model.checkpoint import read_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / "lungs.pt"
    expected = ("expected lungs.pt from `covid-cxr lungs train` or a torchxrayvision ChestX-Det PSPNet state dict "
                "(pspnet_chestxray_best_model_4.pth)")
    if not path.is_file():
        raise CheckpointError(f"lung segmenter {path} not found; {expected}")
    if path.stat().st_size > MAX_SEGMENTER_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size / 2**20:,.0f} MiB, more than any lung segmenter "
                              f"({MAX_SEGMENTER_BYTES // 2**20} MiB); {expected}")
    try:
        raw = _torch_load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} ({expected})") from None
    state = pspnet_state(raw)
    if state is not None:
        return _chestx_det_segmenter(path, state, device)
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise CheckpointError(f"{path} is not a lung segmenter: {expected}")
    del raw  # a classifier checkpoint passed by mistake may be large: not twice in memory
    ckpt = read_checkpoint(path)  # read again, checked as every checkpoint is (lungs.pt is a few MB)
    if ckpt.meta.arch != LUNG_ARCH:
        raise CheckpointError(f"{path} is a {ckpt.meta.arch} classifier, not a lung segmenter; pass the lungs.pt "
                              "written by `covid-cxr lungs train`")
    width = ckpt.meta.training.get("width", 16)
    if not isinstance(width, int) or isinstance(width, bool) or not 4 <= width <= MAX_WIDTH:
        raise CheckpointError(f"{path}: width must be a whole number from 4 to {MAX_WIDTH}, got {str(width)[:40]}; the "
                              "file was edited or damaged")
    model = LungNet(width=width, input_size=ckpt.meta.preprocess.size)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the lung segmenter: {str(exc)[:300]}") from None
    return LungSegmenter(model, ckpt.meta, device, ckpt.checksum,
                         f"covid-cxr lung U-Net {path} (width {width}, {model.input_size} px)")


def _chestx_det_segmenter(path: Path, state: dict[str, torch.Tensor], device: str | torch.device) -> LungSegmenter:
    """The segmenter on a ChestX-Det PSPNet state dict: its Left Lung and Right Lung classes at 512 px."""
    from covid_cxr.imaging.images import sha256_file
    from covid_cxr.model.checkpoint import versions

    model = chestx_det_lungs(state, str(path))
    digest = sha256_file(path)
    source = f"{PSPNET_SOURCE} {path}"
    spec = PreprocessSpec(size=PSPNET_SIZE, base_short_side=PSPNET_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    meta = ModelMeta(arch=PSPNET_ARCH, labels=LUNG_LABELS, positive=None, preprocess=spec,
                     training={"source": source, "sha256": digest, "classes": list(LUNG_TARGETS)}, versions=versions())
    return LungSegmenter(model, meta, device, digest,
                         f"{source} (sha256 {digest[:12]}, {' + '.join(LUNG_TARGETS)} at {PSPNET_SIZE} px)")


class TorchLungMasker:
    """A PyTorch segmenter as a :class:`~covid_cxr.imaging.pixels.LungMasker`: the cleaned lung mask of each stage-1
    image, at the segmenter's square (what a lung view crops by)."""

    def __init__(self, net: LungNet, device, key: str = "") -> None:
        self.net, self.device, self.key = net, torch.device(device), key
        self.size = int(net.input_size)

    def masks(self, images) -> np.ndarray:
        return cleaned_masks(lung_probabilities(self.net, list(images), self.size, self.device))
