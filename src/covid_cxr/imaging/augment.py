"""Training augmentation (training only; the pixel pipeline itself is :mod:`covid_cxr.imaging.pixels`).

One sample's random parameters are a :class:`Draw` (:func:`draw`); two implementations apply them: :func:`augment`,
one image at a time with Pillow and torchvision (in DataLoader workers), and :func:`augment_batch`, a whole batch as
tensor operations on the training device (``covid-cxr train --augment-on device``).

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


@dataclass(frozen=True)
class Draw:
    """The random parameters of one sample's augmentation: what :func:`augment` (one image, PIL and torchvision on
    the CPU) and :func:`augment_batch` (a batch, tensor operations on any device) both apply.

    Acquisition steps that were not drawn are None."""

    crop: tuple[int, int, int, int]
    """top, left, height, width of the random resized crop (resized back to the full side)."""
    angle: float
    """Rotation in degrees, counter-clockwise, about the centre."""
    shift: tuple[float, float]
    """(x, y) translation in pixels."""
    brightness: float
    contrast: float
    resample: float | None = None
    """Down-and-up sampling to this fraction of the side."""
    blur: float | None = None
    """Gaussian blur sigma in pixels."""
    jpeg: int | None = None
    """JPEG re-compression quality."""
    gamma: float | None = None
    noise: float | None = None
    """Gaussian noise standard deviation in grey levels."""
    noise_seed: int = 0


def draw(shape: tuple[int, int], spec: AugmentSpec, g: torch.Generator) -> Draw:
    """Draw one sample's parameters from ``g`` (the order of the draws is fixed: a run's augmentation does not
    change with the implementation that applies it).

    Every acquisition draw is made whether or not its step runs, so one step's probability never shifts the
    random numbers of the next ones.
    """
    h, w = shape
    area = h * w * _uniform(g, *spec.crop_scale)
    ratio = math.exp(_uniform(g, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])))
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    top = int(_uniform(g, 0, h - ch + 1)) if h > ch else 0
    left = int(_uniform(g, 0, w - cw + 1)) if w > cw else 0
    angle = _uniform(g, -spec.max_rotation, spec.max_rotation)
    tx = _uniform(g, -spec.max_shift, spec.max_shift) * w
    ty = _uniform(g, -spec.max_shift, spec.max_shift) * h
    brightness = _uniform(g, 1 - spec.brightness, 1 + spec.brightness)
    contrast = _uniform(g, 1 - spec.contrast, 1 + spec.contrast)
    base = Draw((top, left, ch, cw), angle, (tx, ty), brightness, contrast)
    if not spec.acquisition:
        return base
    d_resample, scale = _chance(g, spec.p_resample), _uniform(g, *spec.resample_scale)
    d_blur, sigma = _chance(g, spec.p_blur), _uniform(g, *spec.blur_sigma)
    d_jpeg, quality = _chance(g, spec.p_jpeg), int(round(_uniform(g, *spec.jpeg_quality)))
    d_gamma = _chance(g, spec.p_gamma)
    gamma = math.exp(_uniform(g, math.log(spec.gamma[0]), math.log(spec.gamma[1])))
    d_noise, noise_std = _chance(g, spec.p_noise), _uniform(g, *spec.noise_std)
    noise_seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    return Draw(base.crop, angle, (tx, ty), brightness, contrast, resample=scale if d_resample else None,
                blur=sigma if d_blur else None, jpeg=quality if d_jpeg else None, gamma=gamma if d_gamma else None,
                noise=noise_std if d_noise else None, noise_seed=noise_seed)


def _geometry(x: torch.Tensor, d: Draw) -> torch.Tensor:
    h, w = x.shape
    top, left, ch, cw = d.crop
    y = TF.resized_crop(x.unsqueeze(0), top, left, ch, cw, [h, w], antialias=True)
    y = TF.affine(y, angle=d.angle, translate=list(d.shift), scale=1.0, shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    y = TF.adjust_brightness(y, d.brightness)
    y = TF.adjust_contrast(y, d.contrast)
    return y.squeeze(0)


def _acquisition(x: np.ndarray, d: Draw) -> np.ndarray:
    """Down-and-up sampling, blur, JPEG, gamma, noise on a (S, S) uint8 array (the steps drawn)."""
    h, w = x.shape
    img = Image.fromarray(x)
    if d.resample is not None:
        small = (max(8, round(w * d.resample)), max(8, round(h * d.resample)))
        img = img.resize(small, Image.Resampling.BILINEAR, reducing_gap=2.0).resize((w, h), Image.Resampling.BILINEAR)
    if d.blur is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=d.blur))
    out = np.asarray(img, dtype=np.uint8)
    if d.jpeg is not None:
        out = _jpeg_pillow(out, d.jpeg)
    if d.gamma is not None:
        out = _gamma_lut(d.gamma)[out]
    if d.noise is not None:
        noise = np.random.default_rng(d.noise_seed).normal(0.0, d.noise, size=out.shape)
        out = np.clip(np.round(out + noise), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def _gamma_lut(gamma: float) -> np.ndarray:
    return np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)


def augment(pixels: np.ndarray | torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> np.ndarray:
    """Randomly transform (S, S) uint8 model pixels; returns (S, S) uint8 model pixels.

    All randomness comes from ``generator``: the same generator state gives the same output.
    """
    x = torch.as_tensor(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
    if x.dtype != torch.uint8 or x.ndim != 2:
        raise ValueError(f"augment expects (H, W) uint8 pixels, got {x.dtype} {tuple(x.shape)}")
    d = draw(tuple(x.shape), spec, generator)
    out = _geometry(x, d).numpy()
    if spec.acquisition:
        out = _acquisition(out, d)
    return out


# ----------------------------------------------------------------------------- the same, batched on a device


def _affine_theta(d: Draw, h: int, w: int) -> tuple[list[float], list[float]]:
    """Two 2x3 matrices in ``affine_grid``'s normalised coordinates (align_corners=False): output -> crop image
    (the inverse of the rotation and shift, as torchvision's affine applies them), and crop image -> source."""
    a = math.radians(d.angle)
    cos, sin = math.cos(a), math.sin(a)
    tx, ty = d.shift
    # torchvision rotates by +angle counter-clockwise on screen (y down): a source point p maps to R p + t with
    # R = [[cos, -sin], [sin, cos]] in pixel units about the centre; the grid needs the inverse, R^T (q - t).
    inv = [[cos, sin, -(cos * tx + sin * ty)], [-sin, cos, sin * tx - cos * ty]]
    # Pixel units about the centre -> normalised units ([-1, 1] across the side): scale x by 2/w, y by 2/h.
    rot = [inv[0][0], inv[0][1] * h / w, inv[0][2] * 2 / w], [inv[1][0] * w / h, inv[1][1], inv[1][2] * 2 / h]
    top, left, ch, cw = d.crop
    crop = [cw / w, 0.0, (2 * left + cw) / w - 1.0], [0.0, ch / h, (2 * top + ch) / h - 1.0]
    return [list(rot[0]), list(rot[1])], [list(crop[0]), list(crop[1])]


def _gaussian_kernel(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _jpeg_pillow(x: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf, formats=["JPEG"]) as re_read:
        return np.array(re_read.convert("L"), dtype=np.uint8)  # a writable copy


def _jpeg_torchvision(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-compression of a (1, H, W) uint8 image by torchvision on the image's device (nvjpeg on CUDA). The grey
    image is encoded as RGB (nvjpeg's encoder takes three channels) and decoded to its luma, which is the grey
    level up to rounding."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        data = encode_jpeg(img.expand(3, -1, -1).contiguous(), quality=quality)
        return decode_jpeg(data, mode=ImageReadMode.GRAY, device=img.device)


_JPEG_FALLBACK_LOGGED = False


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-compression of a (1, H, W) uint8 image: nvjpeg on CUDA (torchvision), else Pillow (what
    :func:`augment` uses, so on the CPU the two implementations agree exactly on this step)."""
    global _JPEG_FALLBACK_LOGGED
    if img.device.type == "cuda":
        try:
            return _jpeg_torchvision(img, quality)
        except (RuntimeError, TypeError, ValueError) as exc:  # a build without GPU JPEG: Pillow below
            if not _JPEG_FALLBACK_LOGGED:
                _JPEG_FALLBACK_LOGGED = True
                import logging

                logging.getLogger(__name__).warning("JPEG augmentation on %s failed (%s); using Pillow on the CPU "
                                                    "for that step (slower)", img.device, exc)
    return torch.from_numpy(_jpeg_pillow(img[0].cpu().numpy(), quality)).unsqueeze(0).to(img.device)


def augment_batch(pixels: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """:func:`augment` of a batch with given draws, as tensor operations on the batch's device (a GPU can augment
    thousands of images per second that CPU workers would have to prepare one by one).

    The same draws give the same transformation as :func:`augment`, implemented differently, so the pixels agree
    closely but not bit for bit: one bilinear sampling for crop, rotation and shift (instead of a resize then an
    affine), a true Gaussian blur (Pillow approximates it with box filters), JPEG by nvjpeg on CUDA (by Pillow, as
    :func:`augment`, elsewhere), and the noise drawn by torch from the same per-sample seed (numpy draws other
    numbers). A sample's output depends only on its pixels and its draw,
    never on the other samples of the batch, the batch size or the number of loader workers.

    Args:
        pixels: (B, S, S) uint8 model pixels on any device.
        draws: one :class:`Draw` per sample (see :func:`draw`).

    Returns:
        (B, S, S) uint8 on the same device.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 3:
        raise ValueError(f"augment_batch expects (B, H, W) uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if len(draws) != len(pixels):
        raise ValueError(f"{len(draws)} draws for {len(pixels)} images")
    b, h, w = pixels.shape
    dev = pixels.device
    if b == 0:
        return pixels
    import torch.nn.functional as F

    x = pixels.to(torch.float32).unsqueeze(1)
    mats = [_affine_theta(d, h, w) for d in draws]
    rot = torch.tensor([m[0] for m in mats], dtype=torch.float32, device=dev)
    crop = torch.tensor([m[1] for m in mats], dtype=torch.float32, device=dev)
    q = F.affine_grid(rot, [b, 1, h, w], align_corners=False)  # output -> crop image
    src = q @ crop[:, :, :2].transpose(1, 2)[:, None] + crop[:, None, None, :, 2]  # crop image -> source
    y = F.grid_sample(x, src, mode="bilinear", padding_mode="border", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:1]).expand(b, -1, -1, -1), q, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # fill 0 outside the crop, as torchvision's affine does
    y = torch.round(y * inside).clamp_(0, 255).floor_()
    bright = torch.tensor([d.brightness for d in draws], dtype=torch.float32, device=dev).view(b, 1, 1, 1)
    y = (y * bright).clamp_(0, 255).floor_()  # torchvision's uint8 blend: clamp, then truncate
    con = torch.tensor([d.contrast for d in draws], dtype=torch.float32, device=dev).view(b, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (con * y + (1 - con) * mean).clamp_(0, 255).floor_()

    rows = [k for k, d in enumerate(draws) if d.resample is not None]
    for k in rows:  # each image its own size: small per-image ops
        s = draws[k].resample
        small = (max(8, round(h * s)), max(8, round(w * s)))
        down = F.interpolate(y[k:k + 1], size=small, mode="bilinear", antialias=True, align_corners=False)
        y[k:k + 1] = F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
    for k in [k for k, d in enumerate(draws) if d.blur is not None]:  # a kernel of its own radius per image
        sig = draws[k].blur
        radius = max(1, math.ceil(3 * sig))
        kern = _gaussian_kernel(sig, radius, dev)
        z = F.pad(y[k:k + 1], (radius, radius, radius, radius), mode="replicate")
        z = F.conv2d(F.conv2d(z, kern.view(1, 1, 1, -1)), kern.view(1, 1, -1, 1))
        y[k:k + 1] = z.round_().clamp_(0, 255)
    for k in [k for k, d in enumerate(draws) if d.jpeg is not None]:  # a quality per image
        y[k] = _jpeg(y[k].to(torch.uint8), draws[k].jpeg).to(torch.float32)
    rows = [k for k, d in enumerate(draws) if d.gamma is not None]
    if rows:
        luts = torch.tensor(np.stack([_gamma_lut(draws[k].gamma) for k in rows]), dtype=torch.float32, device=dev)
        idx = y[rows].view(len(rows), -1).long()
        y[rows] = torch.gather(luts, 1, idx).view(len(rows), 1, h, w)
    rows = [k for k, d in enumerate(draws) if d.noise is not None]
    for k in rows:
        g = torch.Generator(device=dev).manual_seed(draws[k].noise_seed)
        noise = torch.randn((1, h, w), generator=g, device=dev) * draws[k].noise
        y[k] = (y[k] + noise).round_().clamp_(0, 255)
    return y.squeeze(1).to(torch.uint8)


def mixup_lambda(alpha: float, seed: int) -> float:
    """MixUp weight lambda ~ Beta(alpha, alpha) (Zhang et al., 2018), a pure function of ``seed``."""
    return float(np.random.default_rng(int(seed)).beta(alpha, alpha))
