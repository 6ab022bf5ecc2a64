"""The one pixel pipeline: from a decoded image to the model's input, for every stage and backend.

A decoded image (``images.load_image``: (H, W) uint8, 0..255) becomes the model input in four
stages, all defined here and parameterised by one :class:`PreprocessSpec` stored in checkpoints:

1. :func:`shrink_short_side` - a shorter side above ``spec.base_short_side`` is shrunk to it
   (aspect kept). This is what the preprocessed cache stores.
2. :func:`resize_square` - the whole image is squashed to ``spec.size`` x ``spec.size`` (no crop,
   no padding: cropping can cut off lung fields, padding adds borders a model can learn from).
   Stages 1-2 give the *model pixels* that training stacks hold and augmentation works on.
3. :func:`standardize_intensity` - optional per-image intensity standardisation (global
   histogram equalisation or CLAHE), so that exposure, processing and encoding differences
   between hospitals matter less.
4. :func:`normalize` - scaled to [0, 1], repeated on ``spec.channels`` channels, standardised
   with ``spec.mean`` and ``spec.std``.

Training applies augmentation between stages 2 and 3 (``augment.py``); evaluation, prediction,
the web app and both ONNX and PyTorch backends run exactly these functions. NumPy only: the ONNX
backend does not need PyTorch.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from covid_cxr.errors import DatasetError
from covid_cxr.files import default_workers
from covid_cxr.imaging.images import load_image, sha256_file
from covid_cxr.imaging.lung_masks import LUNG_MARGIN, LUNG_VIEWS, LungCheck, view_lungs

log = logging.getLogger(__name__)

PIXEL_RANGE = (0, 255)
"""Input pixel range: the pipeline takes 8-bit grayscale images (uint8, 0..255)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_MEAN = (0.5, 0.5, 0.5)
XRV_STD = (1 / 2048, 1 / 2048, 1 / 2048)
"""torchxrayvision's input range: ``(x / 255) * 2048 - 1024``, i.e. [0, 1] standardised with mean 0.5, std 1/2048
(``xrv.datasets.normalize(img, 255)``); its chest-X-ray-pretrained weights were trained on that range."""
INPUT_SCALES = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "xrv": (XRV_MEAN, XRV_STD)}
"""Named input standardisations (``--input-scale``)."""

BASE_SHORT_SIDE = 256
"""Default stage-1 shorter side (and the side of the preprocessed cache)."""

INTENSITY_MODES = ("none", "equalize", "clahe")
"""Stage 3: ``none``; ``equalize`` (global histogram equalisation); ``clahe`` (contrast-limited adaptive
histogram equalisation over a grid of tiles)."""

_PARALLEL_MIN = 32
"""Fewer images than this are decoded in-process: starting workers costs more than it saves."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to reproduce the model input from a decoded image; stored in checkpoints."""

    size: int
    """Side of the square model input in pixels."""
    base_short_side: int = BASE_SHORT_SIDE
    """Stage 1: a shorter side above this is first shrunk to it (aspect kept; what the cache stores)."""
    intensity: str = "none"
    """Stage 3: one of :data:`INTENSITY_MODES`."""
    clahe_clip: float = 2.0
    """CLAHE clip limit, in multiples of the mean bin count of a tile's histogram."""
    clahe_tiles: int = 8
    """CLAHE grid (tiles per side); fewer when a tile would be smaller than 8 pixels."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int = 3
    """The grayscale image is repeated on this many channels (ImageNet-pretrained stems take 3)."""
    lung_view: str = "none"
    """Between stages 1 and 2, one of :data:`~covid_cxr.imaging.lung_masks.LUNG_VIEWS`: ``crop`` keeps the lung
    fields' box, ``mask`` also blacks out what lies outside them (:func:`~covid_cxr.imaging.lung_masks.view_lungs`;
    the lung mask comes from the segmenter the model carries)."""
    lung_margin: float = LUNG_MARGIN
    """The crop's margin around the lung fields, a fraction of their box (lung views only)."""

    def __post_init__(self) -> None:
        # a spec may come from a file someone else wrote: every field is checked by type and range
        for name in ("size", "base_short_side", "clahe_tiles", "channels"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {str(value)[:40]!r}")
        if not 8 <= self.size <= 4096:
            raise ValueError(f"size must be an integer in 8..4096, got {self.size!r}")
        if self.channels not in (1, 3) or not self.size <= self.base_short_side <= 16384 or self.clahe_tiles > 64:
            raise ValueError(f"channels must be 1 or 3, base_short_side in size..16384 and clahe_tiles at most 64, got "
                             f"{self.channels}, {self.base_short_side}, {self.clahe_tiles}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite numbers, one per channel, got {str(values)[:60]!r}")
        if not (isinstance(self.clahe_clip, numbers.Real) and math.isfinite(self.clahe_clip)):
            raise ValueError(f"clahe_clip must be a finite number, got {str(self.clahe_clip)[:40]!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.lung_view not in LUNG_VIEWS:
            raise ValueError(f"lung_view must be one of {LUNG_VIEWS}, got {str(self.lung_view)[:40]!r}")
        if not (isinstance(self.lung_margin, numbers.Real) and not isinstance(self.lung_margin, bool)
                and 0.0 <= self.lung_margin <= 0.5):
            raise ValueError(f"lung_margin must be a number from 0 to 0.5, got {str(self.lung_margin)[:40]!r}")
        if self.base_short_side < self.size:
            raise ValueError(f"base_short_side {self.base_short_side} is below the input size {self.size}")
        if not self.clahe_clip > 0 or self.clahe_tiles < 1:
            raise ValueError("clahe_clip must be > 0 and clahe_tiles >= 1")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError("mean and std need one value per channel, std > 0")

    @classmethod
    def for_size(cls, size: int, intensity: str = "none", scale: str = "imagenet") -> "PreprocessSpec":
        """The spec for training at ``size``: stage 1 never shrinks below the input size; ``scale`` is one of
        :data:`INPUT_SCALES`."""
        if scale not in INPUT_SCALES:
            raise ValueError(f"scale must be one of {tuple(INPUT_SCALES)}, got {scale!r}")
        mean, std = INPUT_SCALES[scale]
        return cls(size=int(size), base_short_side=max(BASE_SHORT_SIDE, int(size)), intensity=intensity, mean=mean,
                   std=std)

    @property
    def needs_lungs(self) -> bool:
        """Whether stage 2 needs each image's lung mask (a lung view)."""
        return self.lung_view != "none"

    @property
    def scale(self) -> str:
        """The name of the input standardisation (``imagenet``, ``xrv``) or ``custom``."""
        return next((k for k, (m, s) in INPUT_SCALES.items() if tuple(self.mean) == m and tuple(self.std) == s),
                    "custom")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {"size", "base_short_side", "intensity", "clahe_clip", "clahe_tiles", "mean", "std", "channels",
                 "lung_view", "lung_margin"}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**values)

    def describe(self) -> str:
        """One line for reports and model cards."""
        stage3 = {"none": "no intensity standardisation", "equalize": "global histogram equalisation",
                  "clahe": f"CLAHE (clip {self.clahe_clip:g}, {self.clahe_tiles}x{self.clahe_tiles} tiles)"}
        view = {"none": "whole image",
                "crop": f"cropped to the lung fields' box (margin {self.lung_margin:g}) and",
                "mask": f"cropped to the lung fields' box (margin {self.lung_margin:g}), black outside the lungs, and"}
        return (f"decode to 8-bit grayscale; shorter side to at most {self.base_short_side} px; {view[self.lung_view]} "
                f"squashed to {self.size}x{self.size} (no padding); {stage3[self.intensity]}; "
                + {"imagenet": f"scaled to [0, 1] and standardised with ImageNet mean/std on {self.channels} channels",
                   "xrv": f"scaled to torchxrayvision's [-1024, 1024] range on {self.channels} channels"}.get(
                    self.scale, f"scaled to [0, 1] and standardised with mean {list(self.mean)}, std {list(self.std)} "
                                f"on {self.channels} channels"))

    def with_size(self, size: int) -> "PreprocessSpec":
        return replace(self, size=int(size), base_short_side=max(self.base_short_side, int(size)))


# ----------------------------------------------------------------------------- stages 1-2: geometry

def _check_gray_u8(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected 8-bit grayscale pixels in {PIXEL_RANGE}: a (H, W) uint8 array, got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}; "
                         "decode files with covid_cxr.imaging.images.load_image")


def shrink_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Stage 1: shrink a (H, W) uint8 image so its shorter side is ``short_side`` (never enlarges)."""
    _check_gray_u8(image)
    h, w = image.shape
    if min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    size = (size[0], short_side) if h <= w else (short_side, size[1])
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Stage 2: resize a (H, W) uint8 image to (size, size) with antialiasing, keeping the whole image."""
    _check_gray_u8(image)
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


def geometry(image: np.ndarray, spec: PreprocessSpec, lung_mask: np.ndarray | None = None) -> np.ndarray:
    """Stages 1-2: the (size, size) uint8 model pixels of a decoded image.

    With a lung view, ``lung_mask`` is the cleaned mask of the stage-1 image (:class:`LungMasker`)."""
    return stage2(shrink_short_side(np.ascontiguousarray(image), spec.base_short_side), spec, lung_mask)[0]


def stage2(stage1: np.ndarray, spec: PreprocessSpec, lung_mask: np.ndarray | None = None
           ) -> tuple[np.ndarray, LungCheck | None]:
    """Stage 2 of a stage-1 image: the lung view (if the spec has one) and the resize to the model's square; with the
    lung mask's verdict (None without a mask).

    Raises:
        ValueError: a lung view without a lung mask.
    """
    if spec.needs_lungs and lung_mask is None:
        raise ValueError(f"the {spec.lung_view!r} lung view needs each image's lung mask: load the model's "
                         "segmenter (covid_cxr.model.inference.Predictor.pixels does)")
    check = None
    if lung_mask is not None:
        stage1, check = view_lungs(stage1, lung_mask, spec.lung_view, spec.lung_margin)
    return resize_square(stage1, spec.size), check


# ----------------------------------------------------------------------------- stage 3: intensity

def equalize(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 array (any shape); a flat image is returned unchanged."""
    hist = np.bincount(image.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    first = cdf[np.flatnonzero(hist)[0]]
    total = cdf[-1]
    if total == first:
        return image.copy()
    lut = np.round((cdf - first) * (255.0 / (total - first))).clip(0, 255).astype(np.uint8)
    return lut[image]


def clahe(image: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a (H, W) uint8 image.

    The image is cut into ``tiles`` x ``tiles`` tiles (fewer if a tile would be under 8 pixels).
    Each tile's histogram is clipped at ``clip`` times its mean bin count, the excess spread
    evenly over all bins, and its cumulative sum becomes a lookup table; each pixel's output is
    the bilinear blend of the tables of the four nearest tile centres (Zuiderveld, 1994).
    Deterministic, pure NumPy.
    """
    _check_gray_u8(image)
    h, w = image.shape
    n_y, n_x = max(1, min(tiles, h // 8)), max(1, min(tiles, w // 8))
    # Tile boundaries partition the image exactly (tiles differ by at most one pixel).
    ys = np.minimum((np.arange(h) * n_y) // h, n_y - 1)
    xs = np.minimum((np.arange(w) * n_x) // w, n_x - 1)
    tile = ys[:, None] * n_x + xs[None, :]
    hist = np.bincount((tile * 256 + image).ravel(), minlength=n_y * n_x * 256).reshape(n_y * n_x, 256)
    hist = hist.astype(np.float64)
    counts = hist.sum(1, keepdims=True)
    limit = np.maximum(clip * counts / 256.0, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / 256.0
    cdf = np.cumsum(hist, axis=1)
    luts = (cdf * (255.0 / counts)).reshape(n_y, n_x, 256)

    def axis(n_pix: int, n_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = (np.arange(n_pix) + 0.5) * n_tiles / n_pix - 0.5  # in tile units
        lo = np.clip(np.floor(centre), 0, n_tiles - 1).astype(np.int64)
        hi = np.minimum(lo + 1, n_tiles - 1)
        frac = np.clip(centre - lo, 0.0, 1.0)
        return lo, hi, frac

    y0, y1, fy = axis(h, n_y)
    x0, x1, fx = axis(w, n_x)
    v = image.astype(np.int64)
    top = luts[y0[:, None], x0[None, :], v] * (1 - fx)[None, :] + luts[y0[:, None], x1[None, :], v] * fx[None, :]
    bottom = luts[y1[:, None], x0[None, :], v] * (1 - fx)[None, :] + luts[y1[:, None], x1[None, :], v] * fx[None, :]
    out = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return np.round(out).clip(0, 255).astype(np.uint8)


def standardize_intensity(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Stage 3 on (S, S) or (N, S, S) uint8 model pixels (each image on its own)."""
    if spec.intensity == "none":
        return pixels
    if pixels.dtype != np.uint8:
        raise ValueError(f"intensity standardisation takes uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3:
        return np.stack([standardize_intensity(p, spec) for p in pixels]) if len(pixels) else pixels
    if spec.intensity == "equalize":
        return equalize(pixels)
    return clahe(pixels, spec.clahe_clip, spec.clahe_tiles)


# ----------------------------------------------------------------------------- stage 4 and the whole pipeline

def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Stage 4: (..., S, S) uint8 -> (..., C, S, S) float32 scaled to [0, 1] and standardised."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"normalize takes uint8 pixels in {PIXEL_RANGE}, got {pixels.dtype}")
    x = pixels.astype(np.float32) / np.float32(PIXEL_RANGE[1])
    x = np.repeat(x[..., None, :, :], spec.channels, axis=-3)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - mean) / std


def finish(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Stages 3-4 on model pixels ((S, S) or (N, S, S) uint8) -> float32 network input."""
    return normalize(standardize_intensity(pixels, spec), spec)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The whole pipeline for one decoded (H, W) uint8 image -> (C, size, size) float32 input.

    Raises:
        ValueError: the image is not a 2-D uint8 array.
    """
    _check_gray_u8(image)
    return finish(geometry(image, spec), spec)


# ----------------------------------------------------------------------------- many files, with an optional cache

class PixelCache(Protocol):
    """What :func:`model_pixels` needs of a cache (see :class:`covid_cxr.imaging.cache.ImageCache`)."""

    short_side: int

    def get(self, sha256: str) -> np.ndarray | None: ...

    def put(self, sha256: str, image: np.ndarray) -> None: ...


def decode_stage1(path: str | Path, sha256: str | None, short_side: int) -> np.ndarray:
    """``shrink_short_side(load_image(path), short_side)``, after checking the file's sha256 if given.

    Raises:
        ImageReadError: the file cannot be decoded (it is named).
        DatasetError: the file's bytes do not match ``sha256``.
    """
    image = load_image(path)  # first, so that a missing or broken file raises ImageReadError naming it
    if sha256 is not None:
        actual = sha256_file(Path(path))
        if actual != sha256:
            raise DatasetError(f"{path} has sha256 {actual}, but {sha256} was expected: the file changed after "
                               "the manifest was built; rebuild the dataset with `covid-cxr data build`")
    return shrink_short_side(image, short_side)


def _decode_job(args: tuple[str, str | None, int]) -> np.ndarray:
    return decode_stage1(*args)


def decode_many(items: Sequence[tuple[str, str | None]], short_side: int, workers: int | None = None
                ) -> Iterable[np.ndarray]:
    """Yield :func:`decode_stage1` of each (path, sha256 or None) in order, in worker processes when worthwhile."""
    jobs = [(str(path), sha, short_side) for path, sha in items]
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(jobs) < _PARALLEL_MIN:
        yield from map(_decode_job, jobs)
        return
    from covid_cxr.workers import make_pool

    pool = make_pool(min(workers, len(jobs)))
    try:
        yield from pool.map(_decode_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))
    finally:
        # On an error (or an abandoned generator) do not wait for the remaining decodes.
        pool.shutdown(wait=True, cancel_futures=True)


class LungMasker(Protocol):
    """What a lung view needs: the segmenter a model carries (:meth:`covid_cxr.model.inference.Predictor.lung_masker`,
    either backend)."""

    size: int
    """The side of the square masks."""
    key: str
    """Identifies the segmenter (its checksum): cached masks are kept per key."""

    def masks(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, size, size) bool: the cleaned lung mask of each stage-1 image."""
        ...


class MaskStore(Protocol):
    """Where computed lung masks are kept between runs (:class:`covid_cxr.imaging.cache.MaskCache`)."""

    def get(self, sha256: str) -> np.ndarray | None: ...

    def put(self, sha256: str, mask: np.ndarray) -> None: ...


LUNG_BATCH = 32
"""Stage-1 images segmented at a time for a lung view."""


def model_pixels(paths: Sequence[str | Path], spec: PreprocessSpec, sha256s: Sequence[str] | None = None,
                 cache: PixelCache | None = None, workers: int | None = None, progress: bool = False,
                 fill: bool = True, lungs: LungMasker | None = None, masks: MaskStore | None = None) -> np.ndarray:
    """Model pixels (stages 1-2) of many image files: (N, size, size) uint8 in the order of ``paths``.

    With a cache, images it holds are only resized (stage 2); the others are decoded, and stored
    when ``fill`` (after checking their sha256). Either way the pixels equal
    ``geometry(load_image(path), spec)``: there is one route, and the cache only skips work.

    Args:
        paths: image files.
        spec: the preprocessing; ``spec.base_short_side`` must equal the cache's short side.
        sha256s: the files' sha256 (the manifest's column); required with a cache (its key).
        cache: an :class:`~covid_cxr.imaging.cache.ImageCache` or None.
        workers: decoding processes (default: usable cores, at most 8).
        progress: show progress bars.
        fill: store images decoded here in the cache.
        lungs: the segmenter, required when ``spec`` has a lung view (see :func:`pixels_and_lungs`).
        masks: where lung masks are kept by sha256 (needs ``sha256s``), so a dataset's images are segmented once.

    Raises:
        ImageReadError: a file that had to be decoded cannot be (it is named); nothing is skipped.
        DatasetError: with a cache and ``fill``, a decoded file does not match its sha256.
    """
    return pixels_and_lungs(paths, spec, sha256s, cache, workers, progress, fill, lungs, masks)[0]


def pixels_and_lungs(paths: Sequence[str | Path], spec: PreprocessSpec, sha256s: Sequence[str] | None = None,
                     cache: PixelCache | None = None, workers: int | None = None, progress: bool = False,
                     fill: bool = True, lungs: LungMasker | None = None, masks: MaskStore | None = None
                     ) -> tuple[np.ndarray, list[LungCheck] | None]:
    """:func:`model_pixels` and, for a spec with a lung view, each image's lung verdict (None otherwise): an image
    without two plausible lung fields keeps its whole frame and is out of scope."""
    from tqdm.auto import tqdm

    n = len(paths)
    out = np.empty((n, spec.size, spec.size), dtype=np.uint8)
    if cache is not None:
        if sha256s is None or len(sha256s) != n:
            raise ValueError("a cache needs one sha256 per path")
        if cache.short_side != spec.base_short_side:
            raise ValueError(f"the cache holds short side {cache.short_side}, the spec needs {spec.base_short_side}")
    if spec.needs_lungs and lungs is None:
        raise ValueError(f"the {spec.lung_view!r} lung view needs the model's lung segmenter: pass "
                         "lungs=predictor.lung_masker() (covid_cxr.model.inference.Predictor)")
    if masks is not None and sha256s is None:
        raise ValueError("a lung-mask store needs one sha256 per path")
    checks: list[LungCheck | None] | None = [None] * n if spec.needs_lungs else None
    pending: list[tuple[list[int], str, np.ndarray]] = []

    def place(indices: list[int], key: str, image: np.ndarray) -> None:
        if checks is None:
            out[indices] = resize_square(image, spec.size)
            return
        pending.append((indices, key, image))
        if len(pending) >= LUNG_BATCH:
            flush()

    def flush() -> None:
        found = [masks.get(key) if masks is not None else None for _, key, _ in pending]
        todo = [j for j, m in enumerate(found) if m is None]
        if todo:
            computed = lungs.masks([pending[j][2] for j in todo])
            for j, m in zip(todo, computed):
                found[j] = m
                if masks is not None:
                    masks.put(pending[j][1], m)
        for (indices, _, image), mask in zip(pending, found):
            pixels, check = stage2(image, spec, mask)
            out[indices] = pixels
            for i in indices:
                checks[i] = check
        pending.clear()

    todo: dict[str, list[int]] = {}
    first_path: dict[str, str] = {}
    hits = 0
    for i, path in enumerate(tqdm(paths, desc="loading cached images", disable=not progress or cache is None)):
        key = str(sha256s[i]) if sha256s is not None else f"#{i}"
        if key in todo:
            todo[key].append(i)
            continue
        image = cache.get(key) if cache is not None else None
        if image is None:
            todo[key] = [i]
            first_path[key] = str(path)
            continue
        place([i], key, image)
        hits += 1
    keys = list(todo)
    verify = cache is not None and fill
    items = [(first_path[k], k if verify else None) for k in keys]
    decoded = decode_many(items, spec.base_short_side, workers)
    for key, image in zip(keys, tqdm(decoded, total=len(items), desc="decoding images",
                                     disable=not progress or not items)):
        if verify:
            cache.put(key, image)
        place(todo[key], key, image)
    if pending:
        flush()
    if cache is not None:
        log.info("model pixels at %d px: %d images from the cache, %d decoded%s", spec.size, hits, len(items),
                 " and stored" if verify and items else "")
    return out, checks
