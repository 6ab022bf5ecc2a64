"""Training augmentation (training only; the pixel pipeline itself is :mod:`covid_cxr.pixels`).

:func:`augment` works on model pixels (stages 1-2 of the pipeline, (S, S) uint8) and returns
model pixels, so stages 3-4 (intensity standardisation, normalisation) run after it exactly as
at inference. All randomness comes from an explicit :class:`torch.Generator`, so a sample's
augmentation depends only on (seed, epoch, index) and never on worker count or on resuming.

Two families:

* **geometry and photometry** (always): a random resized crop close to the full image, a small
  rotation and shift, brightness and contrast. No flips: the heart is on one side and anatomy is
  not symmetric top to bottom.
* **acquisition** (``AugmentSpec.acquisition``): what differs between hospitals and between
  copies of one film in these collections rather than between diseases: down-and-up sampling
  to a low resolution (many normals in the public collections were re-encoded at 224 px),
  JPEG re-compression, gamma, blur and sensor noise. A model trained with it cannot separate the
  classes by those traces alone.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class AugmentSpec:
    """Chest-X-ray-appropriate training augmentation."""

    max_rotation: float = 7.0
    """Degrees, uniform in [-max, max]."""
    max_shift: float = 0.05
    """Fraction of the side, uniform in [-max, max] on each axis."""
    crop_scale: tuple[float, float] = (0.85, 1.0)
    """Area fraction of the random resized crop: close to the full image."""
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.15
    contrast: float = 0.15
    acquisition: bool = False
    """Also simulate acquisition and encoding differences (the fields below)."""
    p_resample: float = 0.5
    """Probability of shrinking the image to a random lower resolution and enlarging it back."""
    resample_scale: tuple[float, float] = (0.3, 0.8)
    """Range of that resolution, as a fraction of the side."""
    p_jpeg: float = 0.5
    """Probability of a JPEG re-compression."""
    jpeg_quality: tuple[int, int] = (25, 95)
    p_gamma: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    """Gamma range, drawn log-uniformly."""
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    """Gaussian blur sigma range, in pixels of the model input."""
    p_noise: float = 0.3
    noise_std: tuple[float, float] = (1.0, 6.0)
    """Gaussian noise standard deviation range, in grey levels (0..255)."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def _geometry(x: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape
    area = h * w * _uniform(g, *spec.crop_scale)
    ratio = math.exp(_uniform(g, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])))
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    top = int(_uniform(g, 0, h - ch + 1)) if h > ch else 0
    left = int(_uniform(g, 0, w - cw + 1)) if w > cw else 0
    y = TF.resized_crop(x.unsqueeze(0), top, left, ch, cw, [h, w], antialias=True)
    angle = _uniform(g, -spec.max_rotation, spec.max_rotation)
    tx = _uniform(g, -spec.max_shift, spec.max_shift) * w
    ty = _uniform(g, -spec.max_shift, spec.max_shift) * h
    y = TF.affine(y, angle=angle, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    y = TF.adjust_brightness(y, _uniform(g, 1 - spec.brightness, 1 + spec.brightness))
    y = TF.adjust_contrast(y, _uniform(g, 1 - spec.contrast, 1 + spec.contrast))
    return y.squeeze(0)


def _acquisition(x: np.ndarray, spec: AugmentSpec, g: torch.Generator) -> np.ndarray:
    """Down-and-up sampling, blur, JPEG, gamma, noise on a (S, S) uint8 array (each with its probability).

    Every draw is made whether or not its step runs, so one step's probability never shifts the
    random numbers of the next ones.
    """
    h, w = x.shape
    d_resample, scale = _chance(g, spec.p_resample), _uniform(g, *spec.resample_scale)
    d_blur, sigma = _chance(g, spec.p_blur), _uniform(g, *spec.blur_sigma)
    d_jpeg, quality = _chance(g, spec.p_jpeg), int(round(_uniform(g, *spec.jpeg_quality)))
    d_gamma = _chance(g, spec.p_gamma)
    gamma = math.exp(_uniform(g, math.log(spec.gamma[0]), math.log(spec.gamma[1])))
    d_noise, noise_std = _chance(g, spec.p_noise), _uniform(g, *spec.noise_std)
    noise_seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    img = Image.fromarray(x)
    if d_resample:
        small = (max(8, round(w * scale)), max(8, round(h * scale)))
        img = img.resize(small, Image.Resampling.BILINEAR, reducing_gap=2.0).resize((w, h), Image.Resampling.BILINEAR)
    if d_blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
    if d_jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf, formats=["JPEG"]) as re_read:
            img = re_read.convert("L")
    out = np.asarray(img, dtype=np.uint8)
    if d_gamma:
        lut = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
        out = lut[out]
    if d_noise:
        noise = np.random.default_rng(noise_seed).normal(0.0, noise_std, size=out.shape)
        out = np.clip(np.round(out + noise), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def augment(pixels: np.ndarray | torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> np.ndarray:
    """Randomly transform (S, S) uint8 model pixels; returns (S, S) uint8 model pixels.

    All randomness comes from ``generator``: the same generator state gives the same output.
    """
    x = torch.as_tensor(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
    if x.dtype != torch.uint8 or x.ndim != 2:
        raise ValueError(f"augment expects (H, W) uint8 pixels, got {x.dtype} {tuple(x.shape)}")
    out = _geometry(x, spec, generator).numpy()
    if spec.acquisition:
        out = _acquisition(out, spec, generator)
    return out


def mixup_lambda(alpha: float, seed: int) -> float:
    """MixUp weight lambda ~ Beta(alpha, alpha) (Zhang et al., 2018), a pure function of ``seed``."""
    return float(np.random.default_rng(int(seed)).beta(alpha, alpha))
