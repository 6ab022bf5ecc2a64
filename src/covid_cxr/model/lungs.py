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

LUNG_ARCH = "lung-unet"
"""The ``arch`` a lung segmenter's checkpoint records (a classifier's is a backbone name)."""
LUNG_LABELS = ("background", "lung")
MAX_WIDTH = 64
"""Widest first level a checkpoint may ask for (16 is the default; 64 is already ~8 M parameters)."""


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LungNet(nn.Module):
    """U-Net with ``width``, 2x, 4x, 8x channels on four levels; one logit per pixel (lung vs not)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList([_block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2])])
        self.bottom = _block(w[2], w[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[3], w[2], 2, stride=2), nn.ConvTranspose2d(w[2], w[1], 2, stride=2),
                                 nn.ConvTranspose2d(w[1], w[0], 2, stride=2)])
        self.merge = nn.ModuleList([_block(2 * w[2], w[2]), _block(2 * w[1], w[1]), _block(2 * w[0], w[0])])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)[:, 0]


def lung_spec(size: int = LUNG_INPUT_SIZE) -> PreprocessSpec:
    """The checkpoint's record of the input: ``size`` px, one channel (standardised per image, see
    :func:`~covid_cxr.imaging.lung_masks.lung_input`)."""
    return PreprocessSpec(size=size, base_short_side=max(size, 512), mean=(0.0,), std=(1.0,), channels=1)


@dataclass(frozen=True)
class LungMask:
    """One image's predicted lung fields, at the image's own size, cleaned, with the plausibility verdict."""

    mask: np.ndarray
    check: LungCheck


class LungSegmenter:
    """A trained segmenter in eval mode: :meth:`masks` for decoded grayscale images."""

    def __init__(self, model: LungNet, meta: ModelMeta, device: str | torch.device = "cpu") -> None:
        self.model, self.meta, self.device = model.to(device).eval(), meta, torch.device(device)

    @property
    def size(self) -> int:
        return self.meta.preprocess.size

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """P(lung) per pixel at the segmenter's size: float32 (N, size, size)."""
        out = []
        for start in range(0, len(images), batch_size):
            x = np.stack([lung_input(g, self.size) for g in images[start:start + batch_size]])[:, None]
            out.append(torch.sigmoid(self.model(torch.from_numpy(x).to(self.device))).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def masks(self, images: list[np.ndarray], batch_size: int = 16) -> list[LungMask]:
        """Each image's lung fields at its own size (two largest parts kept, holes filled) and their verdict."""
        result = []
        for gray, prob in zip(images, self.probabilities(images, batch_size)):
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
    model = LungNet(width=width)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the lung segmenter: {str(exc)[:300]}") from None
    return LungSegmenter(model, ckpt.meta, device)
