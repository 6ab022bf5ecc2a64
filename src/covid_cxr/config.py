"""Every command's options, in one place: frozen dataclasses with defaults, a docstring per field and
checks in ``__post_init__``.

The CLI (:mod:`covid_cxr.cli`) is generated from these classes: a field becomes a flag named after it
(``image_size`` -> ``--image-size``), its type gives the parser (``bool`` -> ``--x/--no-x``, ``Literal``
-> choices, ``tuple`` -> repeatable), and the docstring under it is the help text. A YAML file can
overlay the defaults (``--config``), flags overlay the YAML, and the resolved config is written next to
every output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import reprlib
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

from covid_cxr.errors import ConfigError
from covid_cxr.files import default_workers

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A classification task: its classes in index order, its positive class, and how source labels map."""

    classes: tuple[str, ...]
    mapping: Mapping[str, str]
    """Manifest label (normal, covid, pneumonia, other) -> class; labels not listed are outside the task."""
    positive: str = "covid"
    """The class whose sensitivity and specificity are reported and thresholded (set here, once)."""
    description: str = ""


TASKS: dict[str, Task] = {
    "covid-vs-normal": Task(("normal", "covid"), {"normal": "normal", "covid": "covid"}, "covid",
                            "COVID-19 against normal (the original study; normal = 0, covid = 1)"),
    "covid-vs-rest": Task(("rest", "covid"), {"normal": "rest", "pneumonia": "rest", "other": "rest",
                                              "covid": "covid"}, "covid",
                          "COVID-19 against everything else: normal, other pneumonia and other findings"),
    "covid-pneumonia-normal": Task(("normal", "covid", "pneumonia"),
                                   {"normal": "normal", "covid": "covid", "pneumonia": "pneumonia"}, "covid",
                                   "three classes: normal, COVID-19, other pneumonia"),
}
"""Task name -> :class:`Task`."""

PROTOCOLS = ("patient", "leave-source-out")
SplitName = Literal["train", "val", "test"]
Checkpoint = Literal["best", "last"]
Backend = Literal["torch", "onnx"]
Arch = Literal["densenet121", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny"]
Intensity = Literal["none", "equalize", "clahe"]
EXPERIMENT_LOGS = ("tensorboard", "mlflow")
DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N"
MAX_WORKERS = 256
"""Most worker processes any option may ask for (a typo must not fork thousands of processes)."""
MAX_CONFIG_BYTES = 1 << 20
"""Largest YAML config file read (options files are a few hundred bytes)."""

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 5, 5


def shown(value: Any) -> str:
    """A value for an error message: a repr cut short (a YAML file can hold a list of a billion strings built from
    a few aliases, whose full repr would never finish)."""
    return _REPR.repr(value)


def _device(value: str) -> None:
    if not (value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value))):
        raise ConfigError(f"--device {shown(value)} is not valid; use {DEVICE_HELP}")


def _check_common(config: Any) -> None:
    """Checks of the fields several configs share: seeds NumPy and torch accept, a sane number of processes."""
    seed = getattr(config, "seed", None)
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be between 0 and {2**32 - 1}, got {seed}")
    workers = getattr(config, "workers", None)
    if isinstance(workers, int) and not isinstance(workers, bool) and workers > MAX_WORKERS:
        raise ConfigError(f"--workers {workers} is more than the {MAX_WORKERS} allowed; use about as many as CPU cores")


def _positive(name: str, value: float | int, minimum: float = 0, strict: bool = True) -> None:
    if (value <= minimum if strict else value < minimum) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'>' if strict else '>='} {minimum}, got {value}")


class _Config:
    """Shared behaviour: ``to_dict`` (for config.yaml and checkpoints), and the choice fields (``Literal``) checked
    on construction, also when a config is built in Python rather than through :func:`make_config`."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A class without a __post_init__ of its own keeps its nearest base's checks.
        own = cls.__dict__.get("__post_init__")
        if own is None:
            own = next((c.__dict__["_own_post_init"] for c in cls.__mro__[1:] if "_own_post_init" in c.__dict__), None)
        cls._own_post_init = own

        def __post_init__(self) -> None:
            _check_choices(self)
            _check_common(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Config):
    """``covid-cxr data build``: read the public sources, check and hash every image, remove copies, split by
    patient and write DATASET_DIR/{manifest.csv, dataset.json, ingest_report.json, dropped.csv, dataset_card.md}."""

    sources: tuple[tuple[str, str], ...]
    """A source folder as NAME=PATH (cohen, mooney, radiography, actualmed, figure1, folder); repeat for each."""
    out: str
    """Dataset folder to write."""
    task: Literal["covid-vs-normal", "covid-vs-rest", "covid-pneumonia-normal"] = "covid-vs-normal"
    """Which labels are classes; images of other labels stay in the manifest as split 'unused'."""
    test_per_class: int = 200
    """Test images per class (the study used 200)."""
    val_fraction: float = 0.1
    """Fraction of the non-test development images held out for validation (early stopping, calibration)."""
    train_size: int = 850
    """Training images at most (the study used 850); fewer if fewer are available."""
    seed: int = 0
    """Seed of the patient-level split."""
    protocol: Literal["patient", "leave-source-out"] = "patient"
    """'patient': random split by patient, stratified; 'leave-source-out': the test split is one whole source."""
    test_source: str | None = None
    """With --protocol leave-source-out: the source held out as the test split."""
    max_source_share: float = 1.0
    """Cap on one source's share of a class (e.g. 0.6); surplus images are left out of the task, counted."""
    dedup: bool = True
    """Remove near-duplicate images (perceptual hash confirmed by a pixel check) before splitting."""
    cache: bool = True
    """Write the preprocessed image cache (DATASET_DIR/cache), so training never decodes originals again."""
    workers: int = field(default_factory=lambda: default_workers(limit=1024))
    """Processes decoding, hashing, fingerprinting and caching images (default: every usable CPU)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if (self.protocol == "leave-source-out") != (self.test_source is not None):
            raise ConfigError("--test-source goes with --protocol leave-source-out (and that protocol needs it)")
        if not 0.0 < self.max_source_share <= 1.0:
            raise ConfigError("--max-source-share must be in (0, 1]")
        if not self.sources:
            raise ConfigError("no sources given; pass at least one --source NAME=PATH")
        names = [n for n, _ in self.sources if n != "folder"]  # several folder sources are fine
        if len(set(names)) != len(names) or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"a source is given twice: {[n for n, _ in self.sources]}")
        if self.test_per_class < 1:
            raise ConfigError("--test-per-class must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.train_size < 2:
            raise ConfigError("--train-size must be at least 2")
        _positive("workers", self.workers)


@dataclass(frozen=True, kw_only=True)
class FetchConfig(_Config):
    """``covid-cxr data fetch``: download a public source (Cohen over HTTP with resume; Kaggle sources through the
    kaggle package, or exact manual steps)."""

    source: Literal["cohen", "mooney", "radiography"]
    """Which source to download."""
    out: str
    """Folder to create (then pass it to `covid-cxr data build --source NAME=PATH`)."""
    url: str | None = None
    """Archive URL instead of the default (cohen only), e.g. a mirror or a pinned commit."""
    sha256: str | None = None
    """Expected SHA-256 of the downloaded archive; a mismatch is an error."""
    overwrite: bool = False
    """Replace an existing non-empty --out folder."""
    timeout: float = 60.0
    """Seconds to wait for the server to connect or send more bytes."""
    progress: bool = True
    """Show a progress bar."""
    max_unpacked_bytes: int = 20 * 2**30
    """Refuse archives that unpack to more than this many bytes (zip-bomb guard)."""

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ConfigError("--out is empty; give the folder to create")
        if self.url is not None:
            if self.source != "cohen":
                raise ConfigError(f"--url applies to cohen only; {self.source} is downloaded from Kaggle")
            if not re.match(r"^https?://", self.url):
                raise ConfigError(f"--url must start with http:// or https://, got {shown(self.url)}")
        if self.sha256 is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
                raise ConfigError(f"--sha256 must be 64 hexadecimal digits, got {shown(self.sha256)}")
            object.__setattr__(self, "sha256", self.sha256.lower())
        _positive("timeout", self.timeout)
        _positive("max_unpacked_bytes", self.max_unpacked_bytes)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class TrainOptions(_Config):
    """How to train a model (shared by ``train`` and ``crossval``)."""

    epochs: int = 10
    """Maximum number of epochs."""
    image_size: int = 224
    """Side of the square network input in pixels."""
    batch_size: int = 16
    """Images per optimisation step (per process under torchrun)."""
    arch: Arch = "densenet121"
    """Network (torchvision): densenet121 (the study's), resnet18, resnet50, efficientnet_b0, convnext_tiny."""
    weights: str = "imagenet"
    """'imagenet' (torchvision's cached ImageNet weights), 'none' (from scratch) or a state-dict file: a torchvision
    network of --arch, a covid-cxr checkpoint, or a torchxrayvision DenseNet-121 (chest-X-ray-pretrained)."""
    input_scale: Literal["imagenet", "xrv"] = "imagenet"
    """Input standardisation, stored with the model: 'imagenet' (ImageNet mean/std) or 'xrv' (torchxrayvision's
    [-1024, 1024] range, what its weights were trained on; worth it with --freeze-backbone, whose BatchNorm
    statistics do not adapt)."""
    freeze_backbone: bool = False
    """Train only the head; by default all layers are fine-tuned, as in the study."""
    lr: float | None = None
    """Peak AdamW learning rate; default 1e-4 with pretrained weights, 1e-3 from scratch."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_epochs: float = 1.0
    """Linear warm-up length (epochs, fractions allowed) before cosine decay."""
    patience: int = 5
    """Stop when validation ROC AUC has not improved for this many epochs (0: never stop early)."""
    balance: Literal["loss", "sampler", "source"] = "loss"
    """'loss': class-weighted cross-entropy; 'sampler': class-balanced sampling; 'source': batches balanced over
    source x class, so no source dominates a class in what the model sees."""
    intensity: Intensity = "none"
    """Per-image intensity standardisation, part of the preprocessing stored in the checkpoint: none, equalize
    (global histogram equalisation) or clahe (contrast-limited adaptive equalisation)."""
    acquisition_augment: bool = True
    """Also augment with acquisition differences: down-and-up sampling, JPEG re-compression, gamma, blur, noise.
    On by default: it raised the pooled out-of-source AUC most of the options measured (benchmarks/crossval.md);
    --no-acquisition-augment is v0.1's training."""
    mixup: float = 0.0
    """MixUp alpha (Beta(alpha, alpha) mixing of image pairs and their labels); 0: off."""
    adversarial: float = 0.0
    """Weight of a source-adversarial head trained through gradient reversal (the features are pushed to not
    tell the source apart); 0: off. Needs at least two sources in the training split."""
    threshold_rule: Literal["sensitivity", "youden"] = "sensitivity"
    """Operating point chosen on validation: 'sensitivity' (highest threshold meeting --target-sensitivity) or
    'youden' (max sensitivity + specificity - 1)."""
    target_sensitivity: float = 0.95
    """COVID sensitivity the 'sensitivity' rule must reach on validation."""
    gate_quantile: float = 0.99
    """Out-of-scope gate: the fraction of validation images its threshold keeps in scope."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    workers: int | None = None
    """DataLoader worker processes; default 1 on CPU (overlaps augmentation with the model step); on CUDA up to 8
    when they augment, 2 when the device does (--augment-on)."""
    augment_on: Literal["auto", "workers", "device"] = "auto"
    """Where training augmentation runs: 'workers' (the DataLoader's processes, image by image with Pillow and
    torchvision; CPU cores bound the rate), 'device' (whole batches as tensor operations on the training device:
    a GPU augments thousands of images per second) or 'auto' (device on CUDA, workers on CPU). Each image gets the
    same random parameters either way (seed, epoch, index); the pixel operations differ slightly
    (covid_cxr.augment.augment_batch)."""
    device: str = "auto"
    """Where to train: auto (CUDA if available), cpu, cuda or cuda:N."""
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU."""
    sync_bn: bool = False
    """Under torchrun: BatchNorm statistics of the global batch (all processes' images), as one process would
    compute them, instead of each process's own share (SyncBatchNorm; slower: it communicates at every layer).
    Ignored for one process."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the training model: 'auto' compiles on CUDA and not on CPU, where compiling takes minutes
    (DenseNet-121: 4 to 17 min on a busy 2-core VM) for steps 0-20% faster at 64 px, which pays only after tens of
    thousands of images (benchmarks/bench_train.py). Checkpoints are the same either way; --resume may change it."""
    progress: bool = True
    """Show progress bars."""
    logs: tuple[str, ...] = ()
    """Experiment log beside metrics.jsonl: tensorboard (RUN_DIR/tensorboard) or mlflow (when installed); repeatable."""

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs)
        unknown = sorted(set(self.logs) - set(EXPERIMENT_LOGS))
        if unknown:
            raise ConfigError(f"--log {', '.join(unknown)} is not supported; use {' or '.join(EXPERIMENT_LOGS)}")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError("--image-size must be between 32 and 1024")
        _positive("batch_size", self.batch_size)
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ConfigError(f"--weights {shown(self.weights)}: not 'imagenet', 'none' or an existing file")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError("--target-sensitivity must be in (0, 1]")
        if not 0.5 <= self.gate_quantile <= 1.0:
            raise ConfigError("--gate-quantile must be in [0.5, 1]")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.weights == "none" else 1e-4)
        _positive("lr", self.lr)
        for name in ("weight_decay", "warmup_epochs", "patience", "mixup", "adversarial"):
            _positive(name, getattr(self, name), strict=False)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} is longer than --epochs {self.epochs}; warm up "
                              "for at most the whole run")
        if self.workers is not None:
            _positive("workers", self.workers, strict=False)
        _device(self.device)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainOptions):
    """``covid-cxr train``: train a model on a dataset's train split, with early stopping, calibration and the
    out-of-scope gate fitted on its validation split. Runs under torchrun for several GPUs or nodes."""

    data: str
    """Dataset folder written by `covid-cxr data build`."""
    out: str
    """Run folder: checkpoints, metrics.jsonl, config.yaml, calibration."""
    resume: bool = False
    """Continue an interrupted run from RUN_DIR/last.pt."""
    all_images: bool = False
    """Final-model mode: train on every image of the task except the validation split (no internal test split);
    report the performance estimate of --estimate-from."""
    estimate_from: str | None = None
    """With --all-images: the crossval folder whose out-of-source estimate describes this model."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """Where a source's images are now, as NAME=PATH, when the dataset's recorded folder moved."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimate_from is not None and not self.all_images:
            raise ConfigError("--estimate-from goes with --all-images (a final model without a test split)")


@dataclass(frozen=True, kw_only=True)
class CrossvalConfig(TrainOptions):
    """``covid-cxr crossval``: out-of-source validation. One model per source, each trained with that whole
    source held out; every image of every source is scored by a model that never saw its source."""

    data: str
    """Dataset folder written by `covid-cxr data build`."""
    out: str
    """Crossval folder: folds/<source>/{dataset,run}, crossval.json, predictions.csv, pictures."""
    by: Literal["source"] = "source"
    """What a fold holds out (a whole source: its images and patients)."""
    folds: tuple[str, ...] = ()
    """Only these held-out sources (default: every source with images of the task); repeatable."""
    val_fraction: float = 0.1
    """Fraction of each fold's training patients held out for validation."""
    resume: bool = False
    """Skip finished folds, continue interrupted ones."""
    prepare_only: bool = False
    """Write the fold datasets and the commands that train them (to run folds on other machines), then stop."""
    final: bool = False
    """After the folds, train the final model on every image (CV_DIR/final), its estimate taken from crossval."""
    bootstrap: int = 1000
    """Bootstrap resamples (by patient) for the pooled AUC's 95% interval."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """Where a source's images are now, as NAME=PATH, when the dataset's recorded folder moved."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in (0, 1): each fold needs validation images")
        _positive("bootstrap", self.bootstrap, strict=False)


# ----------------------------------------------------------------------------- using a run


@dataclass(frozen=True, kw_only=True)
class _SplitJob(_Config):
    """What ``evaluate`` and ``audit`` share: one checkpoint of a run scored on one split of its dataset."""

    run: str
    """Run folder written by `covid-cxr train`."""
    data: str | None = None
    """Dataset folder; default: the one the run was trained on."""
    split: SplitName = "test"
    """Which manifest split."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    batch_size: int = 32
    """Images per forward pass."""
    workers: int = field(default_factory=default_workers)
    """Processes decoding images that are not in the cache."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """Where a source's images are now, as NAME=PATH, when the dataset's recorded folder moved."""
    bootstrap: int = 1000
    """Bootstrap resamples (by patient) for 95% confidence intervals; 0 disables them."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        _positive("bootstrap", self.bootstrap, strict=False)
        _positive("batch_size", self.batch_size)
        _positive("workers", self.workers)
        _device(self.device)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(_SplitJob):
    """``covid-cxr evaluate``: metrics with patient-bootstrap CIs, the study's classification report and pictures
    for one manifest split; writes RUN_DIR/eval-<split>/."""


@dataclass(frozen=True, kw_only=True)
class AuditConfig(_SplitJob):
    """``covid-cxr audit``: does the model look at the lungs? AUC with the lungs masked and with only the border,
    a source probe on frozen features, per-source performance; writes RUN_DIR/audit-<split>/ with verdicts."""

    bootstrap: int = 500
    """Bootstrap resamples (by patient) for the AUC intervals (five maskings: fewer than evaluate's); 0 disables
    them."""
    seed: int = 0
    """Seed of the bootstrap and the probe."""


@dataclass(frozen=True, kw_only=True)
class PredictConfig(_Config):
    """``covid-cxr predict``: class probabilities, the decision at the model's threshold and the out-of-scope flag
    for image files and folders (PNG, JPEG and DICOM, also DICOM files without an ending)."""

    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively)."""
    run: str
    """Run folder, checkpoint file, or (with --backend onnx) an .onnx file."""
    out: str | None = None
    """Output file; default: print to standard output."""
    format: Literal["csv", "json"] = "csv"
    """Output format."""
    skip_unreadable: bool = False
    """Write a row with the reason for an unreadable file instead of stopping."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    batch_size: int = 16
    """Images per forward pass."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    backend: Backend = "torch"
    """torch (the checkpoint) or onnx (RUN/model.onnx from `covid-cxr export`; pass --run RUN/model.int8.onnx for the
    int8 model of `export --quantize int8`)."""
    heatmaps: str | None = None
    """Folder for Grad-CAM overlays of every readable image (computed with the PyTorch checkpoint)."""
    progress: bool = True
    """Show a progress bar for many files."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("predict needs at least one image file or folder")
        _positive("batch_size", self.batch_size)
        _device(self.device)
        if self.out is not None and Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a folder; give a file name, e.g. {Path(self.out) / 'predictions.csv'}")
        if self.heatmaps is not None and Path(self.heatmaps).exists() and not Path(self.heatmaps).is_dir():
            raise ConfigError(f"--heatmaps {self.heatmaps} is a file; give a folder for the overlay images")


@dataclass(frozen=True, kw_only=True)
class ExplainConfig(_Config):
    """``covid-cxr explain``: a Grad-CAM overlay PNG per image and explanations.json (research use only: shows where
    evidence was found, not why)."""

    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively)."""
    run: str
    """Run folder or checkpoint file."""
    out: str
    """Folder for the heatmap PNGs and explanations.json."""
    target: str | None = None
    """Class to explain; default: the positive class (covid)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("explain needs at least one image file or folder")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder for the overlay images")
        _device(self.device)


@dataclass(frozen=True, kw_only=True)
class ReportConfig(_Config):
    """``covid-cxr report``: RUN_DIR/report.html, one self-contained page: the study's table beside ours, metrics
    with CIs, the out-of-source estimate, ROC, confusion matrix, calibration, learning curves, per-source tables,
    the audit, Grad-CAM examples, the dataset and a model card. Runs evaluate (and audit) first if needed."""

    run: str
    """Run folder."""
    split: Literal["val", "test"] = "test"
    """Split the metrics come from."""
    audit: bool = True
    """Run the shortcut audit if it is missing."""
    data: str | None = None
    """Dataset folder; default: the one the run was trained on."""
    crossval: str | None = None
    """Crossval folder whose out-of-source estimate to show (default: the one recorded in the model, if any)."""
    device: str = "auto"
    """Where to run evaluate, audit and Grad-CAM: auto, cpu, cuda or cuda:N."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """Where a source's images are now, as NAME=PATH, when the dataset's recorded folder moved."""

    def __post_init__(self) -> None:
        _device(self.device)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(_Config):
    """``covid-cxr export``: the model in a deployable format, with its metadata; the ONNX graph is checked against
    PyTorch before anything is written."""

    run: str
    """Run folder or checkpoint file."""
    format: Literal["onnx", "safetensors", "hf"] = "onnx"
    """Export format: onnx (model.onnx + model.json, dynamic batch), safetensors (the weights, with the model's
    metadata inside and beside them as JSON) or hf (a Hugging Face-style folder: model.safetensors, config.json and
    a README.md model card; also model.onnx unless --no-hf-onnx)."""
    out: str | None = None
    """Output: the .onnx or .safetensors file (default RUN_DIR/model.onnx, RUN_DIR/model.safetensors), or for hf
    the folder (default RUN_DIR/hf)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    opset: int = 18
    """ONNX opset (18 or newer: the torch.export-based exporter writes no older one)."""
    hf_onnx: bool = True
    """With --format hf: also put model.onnx + model.json in the folder, for installs without PyTorch."""
    overwrite: bool = False
    """With --format hf: replace the files of an existing export folder."""
    quantize: Literal["none", "int8"] = "none"
    """With --format onnx: int8 also writes model.int8.onnx (+ model.int8.json) beside model.onnx, by ONNX Runtime
    static quantisation calibrated on the run's validation images; it is kept only if its test-split ROC AUC is at
    most --max-auc-drop below fp32 (both numbers go into model.json's "quantization" block)."""
    calibration_images: int = 256
    """With --quantize int8: validation images (spread evenly over the split) used to calibrate activation ranges."""
    max_auc_drop: float = 0.01
    """With --quantize int8: largest accepted fall of test ROC AUC from fp32 to int8; a larger one refuses the int8
    model."""
    data: str | None = None
    """With --quantize int8: dataset folder for calibration and the check; default: the one the run was trained on."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """With --quantize int8: where a source's images are now, as NAME=PATH, when the dataset's recorded folder
    moved."""

    def __post_init__(self) -> None:
        if self.quantize != "none" and self.format != "onnx":
            raise ConfigError(f"--quantize {self.quantize} needs --format onnx (it quantises the ONNX graph)")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images {self.calibration_images}: give at least 1")
        if not 0 <= self.max_auc_drop <= 1:
            raise ConfigError(f"--max-auc-drop {self.max_auc_drop}: give a number from 0 to 1")
        if self.opset < 18:
            raise ConfigError(f"--opset {self.opset} is not supported: the torch.export-based ONNX exporter writes "
                              "opset 18 or newer (ONNX Runtime >= 1.14 reads it); pass --opset 18")
        suffix = {"onnx": ".onnx", "safetensors": ".safetensors"}.get(self.format)
        if self.out is not None and suffix and not str(self.out).endswith(suffix):
            raise ConfigError(f"--out {self.out}: the {self.format} file name must end in {suffix} (its metadata goes "
                              "beside it as .json)")
        if self.out is not None and self.format == "hf" and Path(self.out).is_file():
            raise ConfigError(f"--out {self.out} is a file; --format hf writes a folder")


@dataclass(frozen=True, kw_only=True)
class ServeConfig(_Config):
    """``covid-cxr serve``: POST /v1/predict, GET /healthz, OpenAPI docs at /docs and a web page at / (research use
    only)."""

    run: str
    """Run folder (or a checkpoint file)."""
    host: str = "127.0.0.1"
    """Address to bind. The app has no TLS: bind other addresses only behind a proxy that adds it."""
    port: int = 8000
    """TCP port (0: any free port)."""
    backend: Backend = "torch"
    """torch (the checkpoint) or onnx (RUN/model.onnx, exported from the checkpoint if missing)."""
    max_upload_mb: float = 20.0
    """Largest accepted upload in MB (2**20 bytes); larger ones get HTTP 413 before they are read in full."""
    concurrency: int = 2
    """Predictions running at once (threads); further admitted requests wait their turn."""
    max_uploads: int = 32
    """Prediction requests admitted at once (receiving, waiting or predicting; each holds one temporary folder);
    more get HTTP 503 with Retry-After."""
    max_heatmaps: int = 2
    """Requests with ?heatmap=true admitted at once. Grad-CAM runs one at a time in a thread of its own, so heatmaps
    never hold up plain predictions; more get HTTP 503 with Retry-After."""
    idle_timeout: float = 10.0
    """Seconds an upload may send nothing before it is cut off with HTTP 408."""
    upload_timeout: float = 60.0
    """Seconds a whole upload may take; a client trickling bytes is cut off with HTTP 408."""
    api_key: str | None = field(default=None, repr=False)
    """Require this key on POST /v1/predict (header Authorization: Bearer KEY or X-API-Key: KEY; otherwise HTTP 401).
    Prefer the COVID_CXR_API_KEY environment variable: a flag shows in the process list."""
    rate_limit: int = 0
    """Requests per minute per client address on POST /v1/predict (token bucket; over it HTTP 429 with
    Retry-After); 0: no limit. Behind a proxy every client has the proxy's address."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    onnx_path: str | None = None
    """ONNX file for backend onnx (default RUN/model.onnx; RUN/model.int8.onnx is the int8 model of `export --quantize
    int8`)."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if not str(self.run):
            raise ConfigError("serve needs --run (a run folder or checkpoint file)")
        if not self.host:
            raise ConfigError("--host must not be empty (e.g. 127.0.0.1)")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        for name in ("max_upload_mb", "concurrency", "max_uploads", "max_heatmaps", "idle_timeout", "upload_timeout"):
            _positive(name, getattr(self, name))
        _positive("rate_limit", self.rate_limit, strict=False)
        _device(self.device)
        if self.api_key is not None and not re.fullmatch(r"[\x21-\x7e]{16,}", self.api_key):
            # never echo the key itself
            raise ConfigError("--api-key must be at least 16 printable ASCII characters without spaces (it travels "
                              "in an HTTP header); make one with: python -c \"import secrets; "
                              "print(secrets.token_urlsafe(32))\"")


@dataclass(frozen=True, kw_only=True)
class DemoConfig(_Config):
    """``covid-cxr demo``: the whole pipeline, offline, on synthetic phantom chest X-rays (not patients): data build
    -> train (from scratch, small images) -> evaluate -> predict -> report. A few minutes on a CPU."""

    out: str = "demo-output"
    """Output folder."""
    per_class: int = 160
    """Phantoms per class."""
    image_size: int = 64
    """Network input side."""
    epochs: int = 8
    """Training epochs."""
    seed: int = 0
    """Seed of the phantoms, the split and training."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.per_class < 20:
            raise ConfigError("--per-class must be at least 20")
        if not 32 <= self.image_size <= 256:
            raise ConfigError("--image-size must be between 32 and 256")
        _positive("epochs", self.epochs)


COMMANDS: dict[str, type] = {
    "data build": DataConfig, "data fetch": FetchConfig, "train": TrainConfig, "crossval": CrossvalConfig,
    "evaluate": EvalConfig, "predict": PredictConfig, "explain": ExplainConfig, "audit": AuditConfig,
    "report": ReportConfig, "export": ExportConfig, "serve": ServeConfig, "demo": DemoConfig,
}
"""Command -> its config class (the CLI's table)."""


# ----------------------------------------------------------------------------- reflection: docs and types

@lru_cache(maxsize=None)
def _class_nodes(module: str) -> dict[str, ast.ClassDef]:
    """The top-level class definitions of a module's source, parsed once (``--help`` builds every command's
    options; parsing the module once per class took ~0.3 s of each start-up)."""
    import sys

    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (KeyError, OSError, TypeError):  # pragma: no cover - no source available
        return {}
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        node = _class_nodes(klass.__module__).get(klass.__qualname__)
        if node is None:
            try:
                node = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
            except (OSError, TypeError):  # pragma: no cover - no source available
                continue
        body = node.body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def class_doc(cls: type) -> str:
    """The class docstring as plain text (for ``--help``)."""
    return " ".join((cls.__doc__ or "").replace("``", "").split())


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def required_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


@lru_cache(maxsize=None)
def _choice_fields(cls: type) -> tuple[tuple[str, tuple], ...]:
    """(name, allowed values) of every ``Literal`` field of a config class."""
    out = []
    for name, tp in field_types(cls).items():
        inner, _ = unwrap_optional(tp)
        if typing.get_origin(inner) is Literal:
            out.append((name, typing.get_args(inner)))
    return tuple(out)


def _check_choices(config: Any) -> None:
    for name, choices in _choice_fields(type(config)):
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                              f"got {shown(value)}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check a value read from YAML (or given in Python) against the field's type; convert lists to tuples."""
    tp, optional = unwrap_optional(field_types(cls)[name])
    flag = "--" + name.replace("_", "-")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag} cannot be empty")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{flag} must be a whole number, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} must be a number, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{flag} must be text, got {shown(value)}")
        return str(value)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        if typing.get_origin(inner) is tuple:
            out = []
            for item in value:
                if isinstance(item, str) and "=" in item:
                    item = item.split("=", 1)
                elif isinstance(item, Mapping) and len(item) == 1:
                    item = next(iter(item.items()))
                if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
                    raise ConfigError(f"{flag} takes NAME=PATH pairs, got {shown(item)}")
                out.append((item[0], item[1]))
            return tuple(out)
        if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{flag} takes a list of text values, got {shown(value)}")
        return tuple(str(x) for x in value)
    return value


T = TypeVar("T")


def load_yaml_options(yaml_file: str | Path) -> dict:
    """The options in a YAML file (a mapping of option names to values).

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, uses tags, or is not a mapping.
    """
    path = Path(yaml_file)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; an options file is a "
                              "short YAML mapping of option names to values")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; write it as a YAML mapping of options") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}; only plain YAML mappings of "
                          "option names to values are read (no tags)") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests lists or mappings too deeply to read; options are plain "
                          "values or short lists") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a value PyYAML cannot build, e.g. the date 2020-13-45
        raise ConfigError(f"config file {path} holds a value that cannot be read ({exc}); quote it if it is "
                          "text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values, got "
                          f"{type(loaded).__name__ if not isinstance(loaded, dict) else 'other keys than names'}")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def make_config(cls: type[T], overrides: Mapping[str, Any], yaml_file: str | None = None) -> T:
    """Build ``cls`` from its defaults, overlaid by ``yaml_file`` then by ``overrides``.

    Raises:
        ConfigError: the YAML is broken or names an unknown option, a value has the wrong type, an option is
            missing, or a value is invalid. Messages name options as flags, never internal classes.
    """
    values: dict[str, Any] = {}
    if yaml_file:
        values.update(load_yaml_options(yaml_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(u[:60] for u in unknown[:10])}"
                          f"{' ...' if len(unknown) > 10 else ''}; valid: {', '.join(names)}")
    missing = [n for n in required_fields(cls) if n not in values]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join('--' + n.replace('_', '-') for n in missing)}")
    values = {k: _coerce(cls, k, v) for k, v in values.items()}
    return cls(**values)
