"""The lung-field segmenter: a small U-Net (about 0.5 M parameters, CPU-friendly at 256 px), saved and read with the
classifier's checkpoint writer and reader (same meta, same checksum), and applied to decoded images.

The input and the clean-up are :mod:`covid_cxr.imaging.lung_masks` (no PyTorch), shared with everything that uses
the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.lung_masks import (LUNG_INPUT_SIZE, MASK_THRESHOLD, LungCheck, check_lungs, clean_mask,
                                          lung_input, resize_mask)
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.networks import LungNet

LUNG_ARCH = "lung-unet"
"""The ``arch`` a lung segmenter's checkpoint records (a classifier's is a backbone name)."""
LUNG_LABELS = ("background", "lung")
MAX_WIDTH = 64
"""Widest first level a checkpoint may ask for (16 is the default; 64 is already ~8 M parameters)."""


def lung_spec(size: int = LUNG_INPUT_SIZE) -> PreprocessSpec:
    """The checkpoint's record of the input: ``size`` px, one channel (standardised per image, see
    :func:`~covid_cxr.imaging.lung_masks.lung_input`)."""
    return PreprocessSpec(size=size, base_short_side=max(size, 512), mean=(0.0,), std=(1.0,), channels=1)


@torch.no_grad()
def lung_probabilities(net: nn.Module, images, size: int, device, batch_size: int = 16) -> np.ndarray:
    """P(lung) per pixel at ``size``: float32 (N, size, size) for decoded grayscale images (or model pixels)."""
    was_training = net.training
    net.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = np.stack([lung_input(g, size) for g in images[start:start + batch_size]])[:, None]
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

    def __init__(self, model: LungNet, meta: ModelMeta, device: str | torch.device = "cpu", checksum: str = "") -> None:
        self.model, self.meta, self.device = model.to(device).eval(), meta, torch.device(device)
        self.checksum = checksum
        """The checkpoint's checksum (provenance, recorded by a classifier that carries this segmenter)."""

    @property
    def model_width(self) -> int:
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
    """A segmenter from its checkpoint (``covid-cxr lungs train``'s ``lungs.pt``, or the folder holding it).

    Raises:
        CheckpointError: not a covid-cxr checkpoint, damaged, or a classifier rather than a lung segmenter.
    """
    from covid_cxr.model.checkpoint import read_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / "lungs.pt"
    ckpt = read_checkpoint(path)
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
    return LungSegmenter(model, ckpt.meta, device, ckpt.checksum)
