"""The options of ``covid-cxr evaluate``, ``audit``, ``report`` and ``calibrate`` (see :mod:`covid_cxr.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from covid_cxr.config import Checkpoint, CommandOptions, SplitName, check_device_option, check_positive
from covid_cxr.errors import ConfigError
from covid_cxr.files import default_workers


@dataclass(frozen=True, kw_only=True)
class ModelOnData(CommandOptions):
    """What ``evaluate``, ``audit`` and ``calibrate`` share: one checkpoint of a run applied to one split of a
    dataset."""

    run: str
    """Run folder written by `covid-cxr train`."""
    data: str | None = None
    """Dataset folder; default: the one the run was trained on."""
    split: SplitName = "test"
    """Which manifest split (all: every image of the model's classes, whatever its split)."""
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

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size)
        check_positive("workers", self.workers)
        check_device_option(self.device)


@dataclass(frozen=True, kw_only=True)
class SplitJob(ModelOnData):
    """What ``evaluate`` and ``audit`` share: one checkpoint of a run scored on one split, with bootstrap CIs."""

    bootstrap: int = 1000
    """Bootstrap resamples (by patient) for 95% confidence intervals; 0 disables them."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("bootstrap", self.bootstrap, strict=False)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(SplitJob):
    """``covid-cxr evaluate``: metrics with patient-bootstrap CIs, the study's classification report and pictures
    for one manifest split; writes RUN_DIR/eval-<split>/. On a dataset the model was not trained on (a hospital's
    own, --data DATASET_DIR --split all) it adds a local validation section (docs/local-validation.md)."""


@dataclass(frozen=True, kw_only=True)
class AuditConfig(SplitJob):
    """``covid-cxr audit``: does the model look at the lungs? AUC with the lungs masked and with only the border,
    a source probe on frozen features, per-source performance; writes RUN_DIR/audit-<split>/ with verdicts."""

    bootstrap: int = 500
    """Bootstrap resamples (by patient) for the AUC intervals (five maskings: fewer than evaluate's); 0 disables
    them."""
    seed: int = 0
    """Seed of the bootstrap and the probe."""
    lungs: str | None = None
    """A lung segmenter (lungs.pt from `covid-cxr lungs train`, or a torchxrayvision ChestX-Det PSPNet state dict: see
    docs/lungs.md): the lungs-masked test hides each image's predicted
    lung fields. Default: the model's own segmenter when it carries one (train --lungs), else a fixed central
    rectangle."""


@dataclass(frozen=True, kw_only=True)
class ReportConfig(CommandOptions):
    """``covid-cxr report``: RUN_DIR/report.html, one self-contained page: the study's table beside ours, metrics
    with CIs, the out-of-source estimate, ROC, confusion matrix, calibration, learning curves, per-source tables,
    the audit, Grad-CAM examples, the dataset and a model card. Runs evaluate (and audit) first if needed."""

    run: str
    """Run folder."""
    split: Literal["val", "test", "all"] = "test"
    """Split the metrics come from (all: every image of the dataset, for a hospital's own dataset given with
    --data)."""
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
        check_device_option(self.device)


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig(ModelOnData):
    """``covid-cxr calibrate``: refit a run's temperature and decision threshold on a hospital's own images (the
    functions training uses on its validation split) and write them into a NEW run folder; the run given is never
    changed. Metrics measured afterwards on the same images are optimistic (docs/local-validation.md)."""

    data: str = field()  # no default (a bare annotation would inherit the base class's None)
    """Dataset folder of the images to calibrate on (a hospital's own, with both classes)."""
    split: SplitName = "all"
    """Which manifest split of it (all: every image of the model's classes, whatever its split)."""
    out: str
    """The new run folder to write (must not exist yet; never inside --run)."""
    threshold_rule: Literal["sensitivity", "youden"] | None = None
    """How to choose the threshold: sensitivity (the highest reaching --target-sensitivity) or youden; default: the
    model's own rule."""
    target_sensitivity: float | None = None
    """Sensitivity the threshold must reach on these images; default: the model's own target."""
    allow_training_data: bool = False
    """Calibrate on the model's own training data anyway (its dataset folder or a dataset sharing a training source);
    refused otherwise: training already fitted the temperature and threshold on its validation split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}")
