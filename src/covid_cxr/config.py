"""Configuration dataclasses for each stage.

Defaults follow the original study. A YAML file can overlay the defaults (``--config``),
command-line options overlay the YAML, and the resolved config is written next to every
output (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from covid_cxr.errors import CovidCxrError

@dataclass(frozen=True)
class Task:
    """A classification task: its classes in index order and how source labels map onto them."""

    classes: tuple[str, ...]
    mapping: Mapping[str, str]
    """Manifest label (normal, covid, pneumonia, other) -> class; labels not listed are outside the task."""
    description: str = ""

    @property
    def positive(self) -> str:
        """The class whose sensitivity and specificity are reported (always covid)."""
        return "covid"


TASKS: dict[str, Task] = {
    "covid-vs-normal": Task(("normal", "covid"), {"normal": "normal", "covid": "covid"},
                            "COVID-19 against normal (the original study; normal = 0, covid = 1)"),
    "covid-vs-rest": Task(("rest", "covid"), {"normal": "rest", "pneumonia": "rest", "other": "rest",
                                              "covid": "covid"},
                          "COVID-19 against everything else: normal, other pneumonia and other findings"),
    "covid-pneumonia-normal": Task(("normal", "covid", "pneumonia"),
                                   {"normal": "normal", "covid": "covid", "pneumonia": "pneumonia"},
                                   "three classes: normal, COVID-19, other pneumonia"),
}
"""Task name -> :class:`Task`. ``covid`` is class 1 in every task."""

PROTOCOLS = ("patient", "leave-source-out")

WEIGHTS_CHOICES = ("imagenet", "none")


class ConfigError(CovidCxrError):
    """An option value is invalid."""


def _default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class DataConfig:
    """Options of ``covid-cxr data build``."""

    sources: tuple[tuple[str, str], ...]
    """(source name, folder) pairs, e.g. (("cohen", "/data/covid-chestxray-dataset"),)."""
    out: str
    """Dataset folder to write (manifest.csv, ingest_report.json, ...)."""
    task: str = "covid-vs-normal"
    """Which labels are classes; images of other labels stay in the manifest as split 'unused'."""
    test_per_class: int = 200
    """Test images per class (the study used 200)."""
    val_fraction: float = 0.1
    """Fraction of the non-test development images held out for validation (early stopping)."""
    train_size: int = 850
    """Training images at most (the study used 850); fewer if fewer are available."""
    seed: int = 0
    """Seed of the patient-level split."""
    protocol: str = "patient"
    """'patient' (random by patient, stratified) or 'leave-source-out' (the test split is one whole source)."""
    test_source: str | None = None
    """With --protocol leave-source-out: the source held out as the test split."""
    max_source_share: float = 1.0
    """Cap on one source's share of a class (e.g. 0.6); surplus images are left out of the task, counted."""
    dedup: bool = True
    """Remove near-duplicate images (perceptual hash confirmed by a pixel check) before splitting."""
    cache_size: int = 256
    """Shorter side of the preprocessed image cache written to DATASET_DIR/cache (0: no cache)."""
    workers: int = field(default_factory=_default_workers)
    """Processes used to check and hash images."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if (self.protocol == "leave-source-out") != (self.test_source is not None):
            raise ConfigError("--test-source goes with --protocol leave-source-out (and that protocol needs it)")
        if not 0.0 < self.max_source_share <= 1.0:
            raise ConfigError("--max-source-share must be in (0, 1]")
        if self.cache_size and self.cache_size < 32:
            raise ConfigError("--cache-size must be 0 (off) or at least 32")
        if not self.sources:
            raise ConfigError("no sources given; pass at least one --source NAME=PATH")
        names = [n for n, _ in self.sources if n != "folder"]  # several folder sources are fine
        if len(set(names)) != len(names) or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"a source is given twice: {[n for n, _ in self.sources]}")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.test_per_class < 1:
            raise ConfigError("--test-per-class must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.train_size < 2:
            raise ConfigError("--train-size must be at least 2")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = [list(s) for s in self.sources]
        return d


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``covid-cxr train``."""

    data: str
    """Dataset folder written by ``covid-cxr data build``."""
    out: str
    """Run folder: checkpoints, metrics.jsonl, config.yaml."""
    epochs: int = 10
    """Maximum number of epochs."""
    image_size: int = 224
    """Side of the square network input in pixels."""
    batch_size: int = 16
    """Images per optimisation step (per process under torchrun)."""
    weights: str = "imagenet"
    """'imagenet' (torchvision's cached ImageNet weights), 'none' (from scratch) or a state-dict file."""
    freeze_backbone: bool = False
    """Train only the classifier; by default all layers are fine-tuned, as in the study."""
    resume: bool = False
    """Continue from RUN_DIR/last.pt."""
    lr: float | None = None
    """Peak AdamW learning rate; default 1e-4 with pretrained weights, 1e-3 from scratch."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_epochs: float = 1.0
    """Linear warm-up length (epochs, fractions allowed) before cosine decay."""
    patience: int = 5
    """Stop when validation ROC AUC has not improved for this many epochs (0: never stop early)."""
    balance: str = "loss"
    """'loss' (class-weighted cross-entropy) or 'sampler' (class-balanced sampling)."""
    threshold_rule: str = "sensitivity"
    """Operating point chosen on validation: 'sensitivity' (highest threshold meeting --target-sensitivity)
    or 'youden' (max sensitivity + specificity - 1)."""
    target_sensitivity: float = 0.95
    """COVID sensitivity the 'sensitivity' rule must reach on validation."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    workers: int | None = None
    """DataLoader worker processes; default 1 on CPU (one single-threaded worker overlaps augmentation
    with the model step), up to 8 on CUDA."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError("--image-size must be between 32 and 1024")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.weights not in WEIGHTS_CHOICES and not Path(self.weights).is_file():
            raise ConfigError(f"--weights {self.weights!r}: not 'imagenet', 'none' or an existing file")
        if self.threshold_rule not in ("sensitivity", "youden"):
            raise ConfigError("--threshold-rule must be 'sensitivity' or 'youden'")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError("--target-sensitivity must be in (0, 1]")
        if self.balance not in ("loss", "sampler"):
            raise ConfigError("--balance must be 'loss' or 'sampler'")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.weights == "none" else 1e-4)
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.patience < 0:
            raise ConfigError("--lr must be > 0; weight decay, warm-up and patience must be >= 0")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``covid-cxr evaluate``."""

    run: str
    """Run folder written by ``covid-cxr train``."""
    data: str | None = None
    """Dataset folder; default: the one the run was trained on."""
    split: str = "test"
    """Which manifest split to evaluate."""
    checkpoint: str = "best"
    """'best' or 'last'."""
    batch_size: int = 32
    workers: int = field(default_factory=_default_workers)
    device: str = "auto"
    bootstrap: int = 1000
    """Bootstrap resamples (by patient) for 95% confidence intervals; 0 disables them."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError("--split must be train, val or test")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError("--checkpoint must be best or last")
        if self.bootstrap < 0 or self.batch_size < 1:
            raise ConfigError("--bootstrap must be >= 0 and --batch-size >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``covid-cxr predict``."""

    run: str
    """Run folder (or a checkpoint file)."""
    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively for PNG and JPEG files)."""
    out: str | None = None
    """Output file; default: print to standard output."""
    format: str = "csv"
    """'csv' or 'json'."""
    skip_unreadable: bool = False
    """Write a row with the reason for an unreadable file instead of stopping."""
    checkpoint: str = "best"
    batch_size: int = 16
    device: str = "auto"
    backend: str = "torch"
    """'torch' (the checkpoint) or 'onnx' (RUN/model.onnx from `covid-cxr export`, or an .onnx file as --run)."""
    heatmaps: str | None = None
    """Folder for Grad-CAM overlays of every readable image (computed with the torch checkpoint)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("predict needs at least one image file or folder")
        if self.backend not in ("torch", "onnx"):
            raise ConfigError("--backend must be torch or onnx")
        if self.format not in ("csv", "json"):
            raise ConfigError("--format must be csv or json")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError("--checkpoint must be best or last")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


T = TypeVar("T")


def make_config(cls: type[T], overrides: Mapping[str, Any], yaml_file: str | None = None) -> T:
    """Build ``cls`` from its defaults, overlaid by ``yaml_file`` then by ``overrides``.

    Raises:
        ConfigError: the YAML names an unknown field or a value is invalid.
    """
    values: dict[str, Any] = {}
    if yaml_file:
        path = Path(yaml_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    required = [f.name for f in fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join('--' + n.replace('_', '-') for n in missing)}")
    if "sources" in values:
        values["sources"] = tuple(tuple(s) for s in values["sources"])
    if "inputs" in values:
        values["inputs"] = tuple(values["inputs"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def write_yaml(path: Path, data: dict) -> None:
    """Write ``data`` as YAML atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
