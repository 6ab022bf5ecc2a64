"""The options of ``covid-cxr train`` and ``covid-cxr crossval`` (see :mod:`covid_cxr.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from covid_cxr.config import (EXPERIMENT_LOGS, Arch, CommandOptions, Intensity, check_device_option, check_positive,
                              shown)
from covid_cxr.errors import ConfigError


DEFAULT_LUNG_VIEW = "mask"
"""What ``--lung-view auto`` gives a model that carries a segmenter: the lung view that scored best out of source over
three seeds (benchmarks/crossval.md)."""


@dataclass(frozen=True, kw_only=True)
class TrainOptions(CommandOptions):
    """How to train a model (shared by ``train`` and ``crossval``)."""

    epochs: int = 10
    """Maximum number of epochs."""
    image_size: int = 224
    """Side of the square network input in pixels."""
    batch_size: int = 16
    """Images per optimisation step (per process under torchrun)."""
    arch: Arch = "densenet121"
    """Network (torchvision): densenet121 (the study's), resnet18, resnet50, efficientnet_b0, convnext_tiny."""
    lungs: str | None = None
    """A lung segmenter (lungs.pt from `covid-cxr lungs train`, or its folder; torchxrayvision's PSPNet is for audit
    and lungs predict only, too large to carry) for the model to carry: an image
    whose model pixels show no two plausible lung fields (a lateral film, a CT slice, a document) is out of scope, in
    evaluate, predict and serve alike."""
    lung_view: Literal["auto", "none", "crop", "mask"] = "auto"
    """What the classifier sees: 'none' (the whole image), 'crop' (the lung fields' box with a margin, cut before the
    resize to --image-size), 'mask' (that crop, black outside the lungs), or 'auto': mask with --lungs, the whole
    image without (mask scored best on unseen hospitals, benchmarks/crossval.md). Stored in the model, so evaluate,
    predict, serve, Grad-CAM and the ONNX export see the same pixels. An image without two plausible lung fields
    keeps its whole frame and is out of scope."""
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
    (covid_cxr.imaging.augment.augment_batch)."""
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

    @property
    def resolved_lung_view(self) -> str:
        """The lung view this run trains with: ``auto`` is :data:`DEFAULT_LUNG_VIEW` with --lungs, else none."""
        if self.lung_view == "auto":
            return DEFAULT_LUNG_VIEW if self.lungs else "none"
        return self.lung_view

    def __post_init__(self) -> None:
        check_positive("epochs", self.epochs)
        unknown = sorted(set(self.logs) - set(EXPERIMENT_LOGS))
        if unknown:
            raise ConfigError(f"--log {', '.join(unknown)} is not supported; use {' or '.join(EXPERIMENT_LOGS)}")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError("--image-size must be between 32 and 1024")
        if self.lung_view not in ("none", "auto") and not self.lungs:
            raise ConfigError(f"--lung-view {self.lung_view} needs --lungs LUNGS (the segmenter that finds the lung "
                              "fields: `covid-cxr lungs train`)")
        check_positive("batch_size", self.batch_size)
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ConfigError(f"--weights {shown(self.weights)}: not 'imagenet', 'none' or an existing file")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError("--target-sensitivity must be in (0, 1]")
        if not 0.5 <= self.gate_quantile <= 1.0:
            raise ConfigError("--gate-quantile must be in [0.5, 1]")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.weights == "none" else 1e-4)
        check_positive("lr", self.lr)
        for name in ("weight_decay", "warmup_epochs", "patience", "mixup", "adversarial"):
            check_positive(name, getattr(self, name), strict=False)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} is longer than --epochs {self.epochs}; warm up "
                              "for at most the whole run")
        if self.workers is not None:
            check_positive("workers", self.workers, strict=False)
        check_device_option(self.device)


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
    seeds: int = 1
    """Train every fold with this many seeds (--seed, --seed + 1, ...: initialisation, order, augmentation and the
    fold's validation split): the summary gives the seed-to-seed spread of the out-of-source AUC beside its patient
    interval, an interval covering both, and the seed ensemble (the seeds' log-odds averaged)."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """Where a source's images are now, as NAME=PATH, when the dataset's recorded folder moved."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.seeds <= 20:
            raise ConfigError("--seeds must be from 1 to 20")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in (0, 1): each fold needs validation images")
        check_positive("bootstrap", self.bootstrap, strict=False)


@dataclass(frozen=True, kw_only=True)
class LungsTrainConfig(CommandOptions):
    """``covid-cxr lungs train``: train the lung-field segmenter on a dataset's images that have lung masks, with a
    patient-level validation split; report Dice and IoU with confidence intervals."""

    data: str
    """Dataset folder written by `covid-cxr data build` (images with a mask_path are used, whatever their split)."""
    out: str
    """Folder to write: lungs.pt and lungs_metrics.json."""
    image_size: int = 256
    """Side of the square the segmenter sees (the whole image, resized)."""
    epochs: int = 30
    """Passes over the training images; the epoch with the best validation Dice is kept."""
    batch_size: int = 8
    """Images per optimisation step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, one-cycle schedule)."""
    width: int = 16
    """Channels of the U-Net's first level (16: about 0.5 M parameters)."""
    val_fraction: float = 0.2
    """Fraction of the patients held out to measure Dice and choose the best epoch."""
    seed: int = 0
    """Seed of the patient split, the initialisation and the batch order."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        check_device_option(self.device)
        for name in ("epochs", "batch_size"):
            check_positive(name, getattr(self, name))
        if not 32 <= self.image_size <= 1024 or self.image_size % 8:
            raise ConfigError("--image-size must be a multiple of 8 from 32 to 1024 (the U-Net halves it three times)")
        if not 4 <= self.width <= 64:
            raise ConfigError("--width must be from 4 to 64")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in (0, 1)")
        if not (self.lr > 0 and self.lr < 1):
            raise ConfigError("--lr must be in (0, 1)")
