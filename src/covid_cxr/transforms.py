"""Preprocessing (shared by training, evaluation, prediction and export) and training augmentation.

:func:`preprocess` is the one pure function that turns a decoded image into the model's
input. Augmentation is separate, only used on the training split, and draws all its
randomness from an explicit :class:`torch.Generator`, so a sample's augmentation depends
only on (seed, epoch, index) and never on worker count or on resuming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from covid_cxr.images import BASE_SHORT_SIDE, to_model_pixels

PIXEL_RANGE = (0, 255)
"""Input pixel range: preprocessing takes 8-bit grayscale images (uint8, 0..255)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to reproduce the model input from an image; stored in checkpoints."""

    size: int
    """Side of the square model input in pixels."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pixel_range: tuple[int, int] = PIXEL_RANGE
    base_short_side: int = BASE_SHORT_SIDE
    """Stage 1: a shorter side above this is first shrunk to it (aspect kept; what the cache stores)."""
    resize: str = "shrink-short-side-then-squash-bilinear"
    """Stage 2: the whole image is resized to size x size (no crop, no padding)."""
    channels: int = 3
    """The grayscale image is repeated on three channels (ImageNet-pretrained stems)."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def for_size(cls, size: int) -> "PreprocessSpec":
        """The spec used for training at ``size``: stage 1 never shrinks below the input size."""
        return cls(size=size, base_short_side=max(BASE_SHORT_SIDE, size))

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   pixel_range=tuple(d["pixel_range"]), base_short_side=int(d.get("base_short_side", 1 << 30)),  # pre-0.1 files had no stage 1
                   resize=d["resize"], channels=int(d["channels"]))


def _check_uint8_image(image: np.ndarray | torch.Tensor) -> None:
    if image.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"preprocess expects 8-bit grayscale pixels in {PIXEL_RANGE} (dtype uint8), "
                         f"got dtype {image.dtype}; decode files with covid_cxr.images.load_image")
    if image.ndim != 2:
        raise ValueError(f"preprocess expects a (H, W) grayscale image, got shape {tuple(image.shape)}")


def normalize(image_u8: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., C, H, W) float32 normalised with ``spec``'s mean and std."""
    if image_u8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 pixels in {PIXEL_RANGE}, got {image_u8.dtype}")
    x = image_u8.to(torch.float32).div_(float(spec.pixel_range[1]))
    x = x.unsqueeze(-3).expand(*x.shape[:-2], spec.channels, *x.shape[-2:])
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def preprocess(image: np.ndarray, size: int | PreprocessSpec) -> torch.Tensor:
    """Turn a decoded (H, W) uint8 grayscale image into a (3, size, size) float tensor.

    Args:
        image: output of :func:`covid_cxr.images.load_image`; values in :data:`PIXEL_RANGE`.
        size: input side in pixels, or a full :class:`PreprocessSpec` (as stored in a checkpoint).

    Raises:
        ValueError: the image is not a 2-D uint8 array.
    """
    spec = size if isinstance(size, PreprocessSpec) else PreprocessSpec.for_size(int(size))
    _check_uint8_image(image)
    resized = to_model_pixels(np.ascontiguousarray(image), spec.size, spec.base_short_side)
    return normalize(torch.from_numpy(resized.copy()), spec)


@dataclass(frozen=True)
class AugmentSpec:
    """Chest-X-ray-appropriate training augmentation. No vertical flips: anatomy is not symmetric
    top-to-bottom, and no horizontal flips by default (the heart is on one side)."""

    max_rotation: float = 7.0
    """Degrees, uniform in [-max, max]."""
    max_shift: float = 0.05
    """Fraction of the side, uniform in [-max, max] on each axis."""
    crop_scale: tuple[float, float] = (0.85, 1.0)
    """Area fraction of the random resized crop: close to the full image."""
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.15
    contrast: float = 0.15


def augment(image_u8: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop, rotate, shift and change brightness/contrast of a (H, W) uint8 image.

    The output has the same shape and dtype. All randomness comes from ``generator``.
    """
    if image_u8.dtype != torch.uint8 or image_u8.ndim != 2:
        raise ValueError(f"augment expects a (H, W) uint8 tensor, got {image_u8.dtype} {tuple(image_u8.shape)}")
    h, w = image_u8.shape

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    area = h * w * uniform(*spec.crop_scale)
    log_ratio = uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
    ratio = math.exp(log_ratio)
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    top = int(uniform(0, h - ch + 1)) if h > ch else 0
    left = int(uniform(0, w - cw + 1)) if w > cw else 0
    x = image_u8.unsqueeze(0)
    x = TF.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)
    angle = uniform(-spec.max_rotation, spec.max_rotation)
    tx = uniform(-spec.max_shift, spec.max_shift) * w
    ty = uniform(-spec.max_shift, spec.max_shift) * h
    x = TF.affine(x, angle=angle, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    x = TF.adjust_brightness(x, uniform(1 - spec.brightness, 1 + spec.brightness))
    x = TF.adjust_contrast(x, uniform(1 - spec.contrast, 1 + spec.contrast))
    return x.squeeze(0)
