"""Reading a dataset folder: the manifest with its image paths resolved, the dataset's facts, its pixels.

``manifest.csv`` stores each image path relative to its source's root folder; ``dataset.json``
records each root relative to the dataset folder and as an absolute path. :func:`read_dataset`
resolves them in this order: ``--source-root NAME=PATH`` if given, the relative path, the absolute
path. A dataset folder (with its cache) copied elsewhere therefore still works, and sources that
moved are re-pointed with ``--source-root``. A root that cannot be found only matters when an image
must be decoded from its file (not found in the cache); the error then names the root and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from covid_cxr.config import TASKS
from covid_cxr.errors import CovidCxrError, DatasetError, ImageReadError
from covid_cxr.files import read_json, relative_or_absolute
from covid_cxr.limits import MAX_MODEL_JSON_BYTES
from covid_cxr.paths import DatasetDir, parse_pairs

log = logging.getLogger(__name__)

ACQUISITION_COLUMNS = ("modality", "manufacturer", "photometric", "pixel_spacing")
"""How an image was acquired, from its DICOM header (Modality, Manufacturer, PhotometricInterpretation, PixelSpacing
as "row\\col" in mm); '' where the source does not say (every non-DICOM source). Kept for subgroup analysis: evaluate
and the report break metrics down by them. Never patient data: see :mod:`covid_cxr.data.dicom_source`."""

MANIFEST_COLUMNS = ["path", "label", "target", "source", "patient_id", "view", "sha256", "width", "height",
                    "split", "group", "finding", "source_split", "mask_path", *ACQUISITION_COLUMNS]
"""``path``: relative to the source's root; ``label``: the source's label mapped onto normal/covid/pneumonia/other;
``target``: the task's class ('' when the image is outside the task); ``group``: the split group (patient, joined
across copies); ``mask_path``: the image's lung mask, relative to the source's root like ``path`` ('' when it has
none; a mask is never an image row of its own); :data:`ACQUISITION_COLUMNS`: how the image was acquired."""

OPTIONAL_COLUMNS = {"mask_path": "", **{c: "" for c in ACQUISITION_COLUMNS}}
"""Columns a manifest written before they existed lacks, and the value they then take."""

_DTYPES = {"path": str, "patient_id": str, "sha256": str, "view": str, "finding": str, "source_split": str,
           "target": str, "label": str, "source": str, "split": str, "mask_path": str,
           **{c: str for c in ACQUISITION_COLUMNS}}


def source_root_record(root: str | Path, dataset_dir: str | Path, synthetic: bool = False) -> dict:
    """How ``dataset.json`` records a source root: relative to the dataset folder, and absolute."""
    root = Path(root).resolve()
    return {"path": relative_or_absolute(root, dataset_dir), "absolute": str(root), "synthetic": bool(synthetic)}


@dataclass(frozen=True)
class DatasetInfo:
    """The facts in ``dataset.json``."""

    task: str
    labels: tuple[str, ...]
    positive: str | None
    protocol: dict
    sources: dict
    """Source name -> ``{"path", "absolute", "synthetic"}`` (see :func:`source_root_record`)."""
    cache: dict | None = None
    """``{"path", "absolute", "short_side"}`` of the preprocessed image cache, or None."""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def synthetic_sources(self) -> tuple[str, ...]:
        return tuple(n for n, r in self.sources.items() if isinstance(r, dict) and r.get("synthetic"))


@dataclass
class Dataset:
    """A dataset folder read for use: ``df`` has absolute image paths."""

    dir: DatasetDir
    df: pd.DataFrame
    info: DatasetInfo
    roots: dict[str, Path]
    """Source name -> the folder its images are read from."""
    missing_roots: dict[str, list[str]]
    """Source name -> the folders tried that do not exist (its images can still come from the cache)."""

    @property
    def labels(self) -> list[str]:
        return list(self.info.labels)

    def mask_paths(self, rows: pd.DataFrame) -> list[str]:
        """The lung mask file of each row ('' where the image has none). ``df["mask_path"]`` keeps the manifest's
        words (relative to the source's root, checked by :func:`read_dataset` to stay inside it), so that a
        dataset written from ``df`` (a crossval fold) records them as the build did."""
        return [os.path.normpath(os.path.join(self.roots[s], m)) if m else ""
                for s, m in zip(rows["source"], rows["mask_path"])]

    def rows(self, split: str | tuple[str, ...]) -> pd.DataFrame:
        """Rows of the task's classes in ``split`` (one name or several), re-indexed from 0."""
        splits = (split,) if isinstance(split, str) else tuple(split)
        m = self.df["split"].isin(splits) & self.df["target"].isin(self.labels)
        return self.df[m].reset_index(drop=True)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        """Class index per row."""
        return rows["target"].map({lab: i for i, lab in enumerate(self.labels)}).to_numpy(dtype=np.int64)

    def cache(self):
        """The dataset's :class:`~covid_cxr.imaging.cache.ImageCache`, or None when it has none."""
        from covid_cxr.imaging.cache import ImageCache

        c = self.info.cache
        if not c:
            return None
        for cand in (self.dir.root / c.get("path", "cache"), Path(c.get("absolute", "/nonexistent"))):
            if cand.is_dir():
                return ImageCache(cand, int(c.get("short_side", 256)))
        return None

    def pixels(self, rows: pd.DataFrame, spec, workers: int | None = None, progress: bool = False,
               lungs=None) -> np.ndarray:
        """Model pixels (N, size, size) uint8 of manifest rows: from the cache where it holds them (when its
        short side matches the spec), else decoded from the files (and added to the cache). ``lungs``: the model's
        segmenter (a :class:`~covid_cxr.imaging.pixels.LungMasker`), required when the spec has a lung view.

        Raises:
            DatasetError: an image must be decoded and its source folder is not where the dataset says
                (naming ``--source-root``), or a file changed since the build.
            ImageReadError: an image file cannot be decoded (named); nothing is skipped.
        """
        return self.pixels_and_lungs(rows, spec, workers, progress, lungs)[0]

    def pixels_and_lungs(self, rows: pd.DataFrame, spec, workers: int | None = None, progress: bool = False,
                         lungs=None) -> tuple[np.ndarray, list | None]:
        """:meth:`pixels` and, with a lung view, each image's lung verdict; the lung masks are kept in the dataset's
        cache (one set per segmenter), so each image is segmented once."""
        from covid_cxr.imaging.cache import MaskCache
        from covid_cxr.imaging.pixels import pixels_and_lungs

        cache = self.cache()
        if cache is not None and cache.short_side != spec.base_short_side:
            cache = None
        masks = (MaskCache(cache.root, lungs.key, lungs.size, spec.base_short_side)
                 if cache is not None and lungs is not None and spec.needs_lungs and lungs.key else None)
        try:
            return pixels_and_lungs(rows["path"].tolist(), spec, rows["sha256"].tolist(), cache=cache,
                                    workers=workers, progress=progress, lungs=lungs, masks=masks)
        except ImageReadError as exc:
            for name, tried in self.missing_roots.items():
                if exc.path.startswith(str(self.roots[name])):
                    raise DatasetError(
                        f"the images of source {name!r} are not at {' or '.join(tried)} (where {self.dir.root} says "
                        f"they are) and {Path(exc.path).name} is not in the dataset's cache; pass --source-root "
                        f"{name}=PATH with the folder that holds them now") from None
            raise


def _wrong_types(raw: dict) -> str | None:
    """What in a dataset.json has the wrong type (a received dataset is checked before it is used), or None."""
    labels = raw.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return f"labels must be a list of class names, got {str(labels)[:60]!r}"
    for key in ("task", "positive_class"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"{key} must be a name, got {str(raw[key])[:40]!r}"
    for key in ("source_roots", "sources", "protocol", "cache"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            return f"{key} must be an object, got {type(raw[key]).__name__}"
    for name, rec in (raw.get("source_roots") or {}).items():
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k, ""), str) for k in ("path", "absolute")):
            return f"source_roots.{str(name)[:40]} must hold a path and an absolute path"
    return None


def _read_info(d: DatasetDir) -> DatasetInfo:
    try:
        raw = read_json(d.info, "dataset description", max_bytes=MAX_MODEL_JSON_BYTES)
    except CovidCxrError as exc:
        raise DatasetError(f"{exc}; rebuild the dataset with `covid-cxr data build`") from None
    if not isinstance(raw, dict) or "labels" not in raw:
        raise DatasetError(f"{d.info} is not a covid-cxr dataset description; rebuild it with `covid-cxr data build`")
    wrong = _wrong_types(raw)
    if wrong:
        raise DatasetError(f"{d.info}: {wrong}; the file was edited or not written by covid-cxr: rebuild the dataset "
                           "with `covid-cxr data build`")
    task = raw.get("task", "")
    positive = raw.get("positive_class", TASKS[task].positive if task in TASKS else None)
    roots = raw.get("source_roots")
    if roots is None:  # covid-cxr 0.1: absolute image paths, roots listed as plain strings
        roots = {n: {"path": p, "absolute": p, "synthetic": False} for n, p in (raw.get("sources") or {}).items()}
    cache = raw.get("cache")
    if cache and "path" not in cache:  # 0.1: {"dir": "cache", "short_side": N}
        cache = {"path": cache.get("dir", "cache"), "absolute": str(d.root / cache.get("dir", "cache")),
                 "short_side": cache.get("short_side", 256)}
    return DatasetInfo(task=task, labels=tuple(raw["labels"]), positive=positive, protocol=raw.get("protocol") or {},
                       sources=roots, cache=cache, raw=raw)


def _inside_roots(d: DatasetDir, df: pd.DataFrame, roots: Mapping[str, Path], relative: bool,
                  column: str = "path") -> list[str]:
    """Each manifest path (``column``: ``path``, or ``mask_path`` where '' means none) joined to its source's root,
    refused unless it stays inside that root: a dataset received from someone else must not make evaluate open
    ``/etc/passwd`` or ``../../x``. The check is on the path's words (normalised, not resolved), so symlinked image
    folders inside a source keep working.

    Raises:
        DatasetError: an absolute or escaping path, or a source with no recorded root; names the manifest row and
            never opens the file.
    """
    what = "image" if column == "path" else "mask"
    out = []
    for i, (source, p) in enumerate(zip(df["source"], df[column])):
        if column != "path" and not p:
            out.append("")
            continue
        root = roots.get(source)
        if root is None:
            raise DatasetError(f"{d.manifest} row {i + 2}: source {str(source)[:80]!r} has no root folder in "
                               f"{d.info.name}; rebuild the dataset with `covid-cxr data build`")
        if relative and (os.path.isabs(p) or not p):
            raise DatasetError(f"{d.manifest} row {i + 2}: {what} path {str(p)[:120]!r} is not relative to the "
                               f"{source} source folder; a dataset built by covid-cxr never holds one: rebuild it")
        full = os.path.normpath(root / p) if relative else os.path.normpath(p)
        if os.path.commonpath([full, str(root)]) != str(root):
            raise DatasetError(f"{d.manifest} row {i + 2}: {what} path {str(p)[:120]!r} leads outside the {source} "
                               f"source folder {root}; it was not written by covid-cxr data build: rebuild the "
                               "dataset")
        out.append(full)
    return out


def read_dataset(dataset_dir: str | Path | DatasetDir,
                 source_roots: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None) -> Dataset:
    """Read a dataset folder; image paths are resolved against the source roots (see the module docstring).

    Args:
        dataset_dir: folder written by ``covid-cxr data build``.
        source_roots: ``{source: folder}`` overrides for sources whose images moved.

    Raises:
        DatasetError: files missing, columns missing, or an override names an unknown source or a missing folder.
    """
    d = (dataset_dir if isinstance(dataset_dir, DatasetDir) else DatasetDir(Path(dataset_dir))).require()
    info = _read_info(d)
    try:
        df = pd.read_csv(d.manifest, dtype=_DTYPES, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{d.manifest} is unreadable ({exc}); rebuild it with `covid-cxr data build`") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DatasetError(f"{d.manifest} lacks columns {missing}; rebuild it with `covid-cxr data build`")
    for c, value in OPTIONAL_COLUMNS.items():
        if c not in df.columns:
            df[c] = value
    overrides = parse_pairs(source_roots)
    unknown = sorted(set(overrides) - set(info.sources))
    if unknown:
        raise DatasetError(f"--source-root names unknown source(s) {', '.join(unknown)}; this dataset's sources are "
                           f"{', '.join(info.sources)}")
    roots: dict[str, Path] = {}
    missing_roots: dict[str, list[str]] = {}
    for name, rec in info.sources.items():
        if name in overrides:
            p = Path(overrides[name]).expanduser()
            if not p.is_dir():
                raise DatasetError(f"--source-root {name}={p}: no such folder")
            roots[name] = p.resolve()
            continue
        rel = Path(rec.get("path", ""))
        candidates = [rel if rel.is_absolute() else d.root / rel, Path(rec.get("absolute", rel))]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            missing_roots[name] = list(dict.fromkeys(str(c) for c in candidates))
            found = candidates[0]
        roots[name] = Path(os.path.normpath(found.absolute()))
    relative = "source_roots" in info.raw
    df["path"] = _inside_roots(d, df, roots, relative)
    _inside_roots(d, df, roots, relative, column="mask_path")  # checked; kept as written (see Dataset.mask_paths)
    if missing_roots:
        log.info("source folders not found (images come from the cache where it has them): %s",
                 ", ".join(f"{n}: {' or '.join(t)}" for n, t in missing_roots.items()))
    return Dataset(d, df, info, roots, missing_roots)
