"""Typed run and dataset folders: every file name a stage reads or writes is defined here, once.

Paths stored inside a folder are relative to the folder that holds them, so a run folder or a
dataset folder can be copied or moved and still works with every command:

* a run's ``config.yaml`` records its dataset as ``data`` (relative to the run folder) and
  ``data_absolute`` (a fallback when only the run was copied);
* a dataset's ``manifest.csv`` stores image paths relative to their source's root folder, and
  ``dataset.json`` records each root (relative to the dataset folder, and absolute). A root that
  moved is re-pointed with ``--source-root NAME=PATH``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from covid_cxr.errors import DatasetError, RunError

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def plain_name(text: str) -> str:
    """``text`` made a plain name (:func:`is_plain_name`): every run of other characters becomes '-'."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.")[:128]
    return name if is_plain_name(name) else "source"


def is_plain_name(name: str) -> bool:
    """True for a name that can be one folder's name anywhere: letters, digits, '.', '_' and '-', not '.' or '..'
    (no separator, so it cannot climb out of the folder it is put in)."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None and name not in (".", "..")

SPLITS = ("train", "val", "test")
CHECKPOINTS = ("best", "last")


@dataclass(frozen=True)
class DatasetDir:
    """A folder written by ``covid-cxr data build``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    manifest = property(lambda self: self.root / "manifest.csv")
    """One row per image: the contract between stages (written last by a build)."""
    info = property(lambda self: self.root / "dataset.json")
    """Task, labels, positive class, protocol, source roots."""
    ingest_report = property(lambda self: self.root / "ingest_report.json")
    dropped = property(lambda self: self.root / "dropped.csv")
    duplicates = property(lambda self: self.root / "duplicates.csv")
    build_config = property(lambda self: self.root / "build_config.yaml")
    card = property(lambda self: self.root / "dataset_card.md")
    cache = property(lambda self: self.root / "cache")
    class_distribution_png = property(lambda self: self.root / "class_distribution.png")
    source_mix_png = property(lambda self: self.root / "source_mix.png")
    samples_png = property(lambda self: self.root / "samples.png")

    def require(self) -> "DatasetDir":
        """This folder, after checking it holds a finished dataset.

        Raises:
            DatasetError: naming the missing file and the command that writes it.
        """
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} not found; build one with "
                               f"`covid-cxr data build --source NAME=PATH --out {self.root}` or pass --data DATASET_DIR")
        for p in (self.manifest, self.info):
            if not p.is_file():
                raise DatasetError(f"{self.root} is not a finished dataset folder ({p.name} is missing); build it "
                                   f"with `covid-cxr data build --out {self.root}`")
        return self


def parse_pairs(pairs: tuple[tuple[str, str], ...] | Mapping[str, str] | None) -> dict[str, str]:
    """``(("cohen", "/data/cohen"),)`` or a mapping -> ``{"cohen": "/data/cohen"}``."""
    if not pairs:
        return {}
    return dict(pairs.items()) if isinstance(pairs, Mapping) else {str(k): str(v) for k, v in pairs}


@dataclass(frozen=True)
class RunDir:
    """A folder written by ``covid-cxr train`` (and read or extended by every later stage)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    best = property(lambda self: self.root / "best.pt")
    """Checkpoint of the best validation epoch, calibrated and gated after training."""
    last = property(lambda self: self.root / "last.pt")
    """Checkpoint of the last epoch with the training state, for ``--resume``."""
    config = property(lambda self: self.root / "config.yaml")
    """The resolved training options, with the dataset path relative to the run folder."""
    metrics = property(lambda self: self.root / "metrics.jsonl")
    calibration = property(lambda self: self.root / "calibration.json")
    calibration_png = property(lambda self: self.root / "calibration_val.png")
    learning_curves_png = property(lambda self: self.root / "learning_curves.png")
    onnx = property(lambda self: self.root / "model.onnx")
    onnx_meta = property(lambda self: self.root / "model.json")
    report = property(lambda self: self.root / "report.html")
    lock = property(lambda self: self.root / ".lock")

    def checkpoint(self, which: str = "best") -> Path:
        if which not in CHECKPOINTS:
            raise RunError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
        return self.best if which == "best" else self.last

    def eval_dir(self, split: str) -> Path:
        return self.root / f"eval-{split}"

    def audit_dir(self, split: str) -> Path:
        return self.root / f"audit-{split}"

    def require_checkpoint(self, which: str = "best") -> Path:
        """The checkpoint file, or an error that says what is missing and how to make it."""
        path = self.checkpoint(which)
        if not self.root.is_dir():
            raise RunError(f"run folder {self.root} not found; train a model with "
                           f"`covid-cxr train --data DATASET_DIR --out {self.root}`")
        if not path.is_file():
            if DatasetDir(self.root).manifest.is_file() or DatasetDir(self.root).info.is_file():
                raise RunError(f"{self.root} is a dataset folder (written by `covid-cxr data build`), not a run folder; "
                               "--run takes the --out of `covid-cxr train`: train a model on it with "
                               f"`covid-cxr train --data {self.root} --out runs/NAME`, then pass --run runs/NAME")
            if (self.root / "crossval.json").is_file() or (self.root / "commands.sh").is_file():
                raise RunError(f"{self.root} is a crossval folder, not a run folder: its fold models are only for the "
                               f"estimate; pass --run {self.root / 'final'} after `covid-cxr crossval --final`, or the "
                               "--out of `covid-cxr train`")
            other = [p.name for p in (self.best, self.last) if p.is_file()]
            hint = (f" (it holds {', '.join(other)}: the run may still be training or was interrupted; "
                    f"finish it with `covid-cxr train --resume --out {self.root} ...`)" if other else
                    f"; train a model with `covid-cxr train --data DATASET_DIR --out {self.root}`")
            raise RunError(f"{self.root} has no {path.name}{hint}")
        return path

    def training_options(self) -> dict:
        """The run's ``config.yaml`` (empty if absent)."""
        if not self.config.is_file():
            return {}
        try:
            loaded = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"{self.config} is unreadable ({exc}); pass --data DATASET_DIR") from None
        return loaded if isinstance(loaded, dict) else {}

    def dataset(self, override: str | Path | None = None) -> DatasetDir:
        """The dataset this run was trained on: ``override`` if given, else the one recorded in config.yaml
        (relative to the run folder first, then its absolute path when the run was copied alone).

        Raises:
            DatasetError: no dataset can be found; the message names the paths tried and ``--data``.
        """
        if override:
            return DatasetDir(Path(override)).require()
        opts = self.training_options()
        tried = []
        rel = opts.get("data")
        if rel:
            cand = Path(rel) if Path(rel).is_absolute() else self.root / rel
            tried.append(str(cand))
            if (cand / "manifest.csv").is_file():
                return DatasetDir(cand.resolve())
        absolute = opts.get("data_absolute")
        if absolute:
            tried.append(str(absolute))
            if (Path(absolute) / "manifest.csv").is_file():
                return DatasetDir(Path(absolute))
        if not tried:
            raise DatasetError(f"{self.root} does not record its dataset (no {self.config.name}); "
                               "pass --data DATASET_DIR")
        raise DatasetError(f"the dataset {self.root} was trained on is not at {' or '.join(tried)}; pass "
                           "--data DATASET_DIR (a copy of that dataset folder)")


def locate_checkpoint(run_or_file: str | Path, which: str = "best") -> tuple[RunDir, Path]:
    """``--run`` as given: a run folder (-> its best/last checkpoint) or a checkpoint file (-> its folder)."""
    p = Path(run_or_file)
    if p.is_file():
        return RunDir(p.parent), p
    run = RunDir(p)
    return run, run.require_checkpoint(which)


def read_metrics(run_dir: RunDir) -> list[dict]:
    """The epochs recorded in metrics.jsonl (empty if none); a damaged line is skipped with a warning."""
    return _metric_records(run_dir.metrics)


def _metric_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            log.warning("%s line %d is damaged; ignoring it", path, n)
            continue
        records.append(record)
    return records
