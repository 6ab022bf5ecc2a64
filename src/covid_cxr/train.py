"""``covid-cxr train``: train a classifier on a manifest's train split.

The loop is shaped for ``torchrun``: device and rank come from the environment, every rank draws its
own shard of each epoch (gradients averaged by DDP; BatchNorm statistics per rank, or of the global
batch with ``--sync-bn``), validation is sharded and gathered so each image counts once (with rank 0's
BatchNorm buffers, the model it saves), train metrics are summed over ranks, every rank takes the same
early-stopping decision, and only rank 0 writes files while the others wait for it (and stop if it
failed, instead of hanging in the next collective).

After the last epoch (rank 0): the best checkpoint is calibrated on the validation split (temperature
and operating point, :func:`covid_cxr.calibration.calibrate`), its out-of-scope gate is fitted
(:func:`covid_cxr.gate.fit_gate`), and it is saved again through the one checkpoint writer.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_cxr.augment import AugmentSpec, mixup_lambda
from covid_cxr.calibration import calibrate, reliability_diagram_png
from covid_cxr.config import TrainConfig
from covid_cxr.data import BatchAugment, EpochSampler, StackDataset, sample_seed, worker_init
from covid_cxr.dataset import Dataset, read_dataset
from covid_cxr.errors import CheckpointError, CovidCxrError, OutputError, RunError
from covid_cxr.files import (RunLock, append_line, atomic_write, default_workers, read_json, relative_or_absolute,
                             remove_stale_temp_files, write_json, write_yaml)
from covid_cxr.gate import fit_gate
from covid_cxr.inference import forward_pixels
from covid_cxr.meta import ModelMeta, TrainingData
from covid_cxr.metrics import roc_auc
from covid_cxr.model import (backbone_parameters, build_model, model_from_checkpoint, new_meta, read_checkpoint,
                             save_checkpoint, unwrap)
from covid_cxr.paths import RunDir
from covid_cxr.pixels import PreprocessSpec
from covid_cxr.plots import learning_curves_png
from covid_cxr.runtime import (Runtime, all_sum, amp_dtype, autocast, broadcast_buffers, convert_sync_batchnorm,
                               on_main, setup_runtime, use_compile)

log = logging.getLogger(__name__)

RESUME_FREE_OPTIONS = ("resume", "workers", "progress", "device", "logs", "compile")
"""Options that may differ between an interrupted run and its ``--resume``."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (initialisation); data order and augmentation use their own seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- source-adversarial head

class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``-weight`` on the way back (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``x`` unchanged; its gradient reversed and scaled by ``weight`` in the backward pass."""
    return _ReverseGradient.apply(x, float(weight))


class SourceAdversary(nn.Module):
    """Predicts the source from the penultimate features through a gradient-reversal layer: minimising its loss
    trains it to tell sources apart and pushes the features to make that impossible."""

    def __init__(self, feature_dim: int, n_sources: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_sources))

    def forward(self, features: torch.Tensor, weight: float) -> torch.Tensor:
        return self.net(reverse_gradient(features, weight))


def adversary_weight(max_weight: float, progress: float) -> float:
    """DANN's ramp: 0 at the start of training, ``max_weight`` towards the end."""
    return float(max_weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0))


# ----------------------------------------------------------------------------- one epoch

class GlobalBatchCrossEntropy(nn.Module):
    """Cross-entropy over the global batch under DDP: the (class-weighted) mean over every rank's images, as one
    process computes it. DDP averages the ranks' gradients, so each rank divides its sum by the global weight sum
    over the number of ranks; :class:`torch.nn.CrossEntropyLoss`'s weighted mean would divide by its own images'
    weights. Every rank must call it the same number of times (one all-reduce of a scalar per call)."""

    def __init__(self, weight: torch.Tensor | None = None, world_size: int = 1):
        super().__init__()
        self.register_buffer("weight", weight)
        self.world_size = world_size

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = nn.functional.cross_entropy(logits, targets, weight=self.weight, reduction="sum")
        denom = (self.weight[targets].sum() if self.weight is not None
                 else torch.tensor(float(targets.numel()), device=logits.device)).detach().float().clone()
        if self.world_size > 1:
            dist.all_reduce(denom)
            denom = denom / self.world_size
        return total / denom


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, device: torch.device,
                    dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = False, desc: str = "train", mixup: float = 0.0, seed: int = 0, epoch: int = 0,
                    adversary: SourceAdversary | None = None, sources: torch.Tensor | None = None,
                    adversary_max: float = 0.0, total_steps: int = 1, channels_last: bool | None = None,
                    batch_augment: BatchAugment | None = None) -> dict:
    """One pass over ``loader``. Returns {"loss", "accuracy", "images"} (plus ``adv_loss``/``adv_accuracy``).

    With ``batch_augment`` the loader yields (B, S, S) uint8 model pixels, augmented and finished on ``device``
    here (--augment-on device); otherwise it yields finished network input.

    MixUp (``mixup`` > 0) mixes each batch with a permutation of itself, with lambda and the permutation
    drawn from (seed, epoch, step). The adversary (if given) reads the features of the same forward pass.
    ``channels_last`` (default: on CUDA) sends the batches in that memory format, to match the model's.
    """
    from tqdm.auto import tqdm

    model.train()
    if getattr(unwrap(model), "_covid_cxr_frozen", False):  # keep frozen BatchNorm statistics fixed
        unwrap(model).net.eval()
    total_loss, correct, seen, adv_loss, adv_correct = 0.0, 0, 0, 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    steps_done = scheduler.last_epoch
    if channels_last is None:
        channels_last = device.type == "cuda"
    for step, (x, y, idx) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if batch_augment is not None:
            x = batch_augment(x, idx, epoch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lam, perm = 1.0, None
        if mixup > 0:
            s = sample_seed(seed, epoch, step, 104729)
            lam = mixup_lambda(mixup, s)
            perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(s)).to(device)
            x = lam * x + (1.0 - lam) * x[perm]
        with autocast(device, dtype):
            logits, feats = model(x, with_features=True)
            logits = logits.float()
            loss = loss_fn(logits, y) if perm is None else lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, y[perm])
            if adversary is not None:
                src = sources[idx].to(device)
                w = adversary_weight(adversary_max, (steps_done + step) / max(1, total_steps))
                adv_logits = adversary(feats.float(), w)
                a_loss = nn.functional.cross_entropy(adv_logits, src) if perm is None else (
                    lam * nn.functional.cross_entropy(adv_logits, src)
                    + (1 - lam) * nn.functional.cross_entropy(adv_logits, src[perm]))
                loss = loss + a_loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        if adversary is not None:
            adv_loss += float(a_loss.detach()) * n
            adv_correct += int((adv_logits.argmax(1) == src).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        lr=f"{scheduler.get_last_lr()[0]:.2e}")
    out = {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}
    if adversary is not None:
        out.update(adv_loss=adv_loss / max(seen, 1), adv_accuracy=adv_correct / max(seen, 1))
    return out


def validation_metrics(logits: np.ndarray, targets: np.ndarray, positive: int | None) -> dict:
    """Loss, accuracy and ROC AUC (on log-odds; one-vs-rest macro for more than two classes)."""
    from covid_cxr.meta import log_probs

    lp = log_probs(logits)
    return {"loss": float(-lp[np.arange(len(targets)), targets].mean()),
            "accuracy": float(np.mean(lp.argmax(1) == targets)), "auc": roc_auc(targets, lp, positive)}


def validation_logits(model: nn.Module, pixels: np.ndarray, spec: PreprocessSpec, rt: Runtime, batch_size: int,
                      dtype) -> np.ndarray:
    """Validation logits of every image, computed in shards across ranks and gathered, so each image counts once
    and every rank sees the same numbers."""
    if not rt.distributed:
        return forward_pixels(model, pixels, spec, rt.device, batch_size, dtype=dtype).logits
    import torch.distributed as dist

    mine = np.arange(rt.rank, len(pixels), rt.world_size)
    part = forward_pixels(model, pixels[mine], spec, rt.device, batch_size, dtype=dtype).logits
    gathered: list = [None] * rt.world_size
    dist.all_gather_object(gathered, (mine, part))
    out = np.empty((len(pixels), part.shape[1]), dtype=np.float32)
    for idx, lg in gathered:
        out[idx] = lg
    return out


# ----------------------------------------------------------------------------- the run folder

def _comparable(options: dict, run_relative_base: Path) -> dict:
    """Options with their paths made absolute, so `./runs/a` and `/home/me/runs/a` compare equal."""
    out = dict(options)
    for k in ("data", "out", "estimate_from"):
        if out.get(k):
            p = Path(out[k])
            out[k] = str((p if p.is_absolute() else run_relative_base / p).resolve())
    if out.get("weights") not in (None, "imagenet", "none"):
        out["weights"] = str(Path(out["weights"]).resolve())
    return out


def _check_same_options(saved_options: dict, cfg: TrainConfig, run: RunDir) -> None:
    saved = _comparable(saved_options, run.root)
    now = _comparable(cfg.to_dict(), Path.cwd())
    if saved_options.get("data_absolute") and now.get("data") == str(Path(saved_options["data_absolute"]).resolve()):
        saved["data"] = now["data"]  # the run folder was moved or copied; the dataset is where it was
    diff = {k: (saved.get(k), now[k]) for k in now
            if k not in RESUME_FREE_OPTIONS and k in saved and saved.get(k) != now[k]}
    if diff:
        raise RunError("--resume: options differ from the interrupted run: "
                       + "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                       + "; resume with the same options or start a new --out")


def _check_run_dir(cfg: TrainConfig, run: RunDir):
    """Refuse to overwrite a run; on --resume return the last checkpoint after checking its options.

    A run interrupted before its first last.pt (killed, or the disk filled during epoch 1) has a config.yaml and
    maybe a best.pt: --resume starts it again from epoch 1 (nothing is lost: no epoch was finished)."""
    if not cfg.resume:
        if run.last.exists():
            raise RunError(f"{run.root} already holds a run; pass --resume to continue it or choose another --out")
        if run.best.exists():
            if run.config.exists():
                raise RunError(f"{run.root} holds a run interrupted during its first epoch; pass --resume to start it "
                               "again, or choose another --out")
            raise RunError(f"{run.root} already holds a model ({run.best.name}); choose another --out")
        return None
    if not run.last.exists():
        if run.config.exists():
            import yaml

            try:
                saved = yaml.safe_load(run.config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise RunError(f"--resume: {run.config} is unreadable ({exc}); start a new run with another "
                               "--out") from None
            if isinstance(saved, dict):
                _check_same_options(saved, cfg, run)
            log.info("--resume: %s has no last.pt (no epoch was finished): starting again from epoch 1", run.root)
            return None
        raise CheckpointError(f"--resume: {run.last} not found; start the run without --resume")
    ckpt = read_checkpoint(run.last)
    if not ckpt.training or "optimizer" not in ckpt.training:
        raise CheckpointError(f"--resume: {run.last} holds no training state (optimizer, schedule); it is not a "
                              "last.pt written by `covid-cxr train`: start a new run with another --out")
    _check_same_options(ckpt.meta.training, cfg, run)
    return ckpt


def loader_workers(requested: int | None, device: torch.device, augmenting: bool = True) -> int:
    """DataLoader workers: as requested, else 1 on CPU, and on CUDA up to 8 when they augment, 2 when they only
    hand over pixels (--augment-on device).

    On CPU one single-threaded worker prepares the next batch while the model computes; in the main
    process augmentation would compete with the model's threads (measured ~50x slower per image under
    load by v0.1's data benchmark; benchmarks/bench_train.py measures the data wait now)."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 1
    return default_workers(8) if augmenting else min(2, default_workers(8))


def augment_location(requested: str, device: torch.device) -> str:
    """``--augment-on``: 'workers' or 'device' ('auto': the device when it is a GPU)."""
    if requested == "auto":
        return "device" if device.type == "cuda" else "workers"
    return requested


def make_train_loader(train_ds: StackDataset, sampler: EpochSampler, batch_size: int, workers: int,
                      device: torch.device) -> DataLoader:
    """The training DataLoader (also what benchmarks/bench_train.py measures)."""
    # A last training batch of one image breaks BatchNorm; drop it (it is a different image each epoch).
    return DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=len(sampler) % batch_size == 1, pin_memory=device.type == "cuda",
                      worker_init_fn=worker_init if workers else None)


def _class_weights(targets: np.ndarray, k: int) -> torch.Tensor:
    counts = np.bincount(targets, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise CovidCxrError(f"the train split has no images of some class (counts {counts.tolist()}); rebuild the "
                            "dataset with more images of every class")
    return torch.tensor(len(targets) / (k * counts), dtype=torch.float32)


def _training_options(cfg: TrainConfig, run: RunDir) -> dict:
    """The options as stored in config.yaml and in the checkpoint: the dataset relative to the run folder."""
    d = cfg.to_dict()
    d["data"] = relative_or_absolute(cfg.data, run.root)
    d["data_absolute"] = str(Path(cfg.data).resolve())
    d["out"] = "."
    if cfg.weights not in ("imagenet", "none"):
        d["weights"] = str(Path(cfg.weights).resolve())
    if cfg.estimate_from:
        d["estimate_from"] = relative_or_absolute(cfg.estimate_from, run.root)
    return d


def _estimate(cfg: TrainConfig, run: RunDir) -> dict | None:
    if not cfg.all_images:
        return None
    if not cfg.estimate_from:
        return {"source": "none", "note": "trained on every image without a test split and without a crossval "
                                          "estimate: this model's performance is unknown"}
    doc = read_json(Path(cfg.estimate_from) / "crossval.json", "crossval result")
    pooled = doc.get("pooled", {})
    return {"source": "crossval", "crossval": relative_or_absolute(cfg.estimate_from, run.root),
            "pooled_auc": pooled.get("auc"), "ci95": pooled.get("ci95"), "protocol": doc.get("protocol"),
            "per_source": {k: v.get("auc") for k, v in doc.get("per_source", {}).items()}}


# ----------------------------------------------------------------------------- run

def run(cfg: TrainConfig) -> dict:
    """Train a model as configured; returns a summary (best epoch, best validation AUC, paths).

    Raises:
        RunError: --out is in use by another process, or holds a run (without --resume).
        OutputError: the disk filled up or the folder is not writable; the run can be continued with --resume.
    """
    rt = setup_runtime(cfg.device)
    run_dir = RunDir(Path(cfg.out))
    lock = RunLock(run_dir.lock) if rt.is_main else None

    def acquire() -> None:
        lock.acquire()
        # Only the lock holder writes here, so any temporary file is left by a killed run.
        for p in remove_stale_temp_files(run_dir.root):
            log.info("removed %s, left by an interrupted run", p.name)

    on_main(rt, acquire)  # the other ranks stop too if the folder is in use
    try:
        return _run(cfg, rt, run_dir)
    except OutputError as exc:
        if run_dir.last.exists() or run_dir.config.exists():
            hint = "; everything finished so far is kept: continue the run with the same command and --resume"
            exc = OutputError(exc.errno, exc.strerror, exc.filename, str(exc) + hint)
        raise exc from None
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: TrainConfig, rt: Runtime, run_dir: RunDir) -> dict:
    resume_ckpt = _check_run_dir(cfg, run_dir)
    seed_everything(cfg.seed)
    ds = read_dataset(cfg.data, cfg.source_roots)
    labels, positive = ds.labels, ds.info.positive
    spec = PreprocessSpec.for_size(cfg.image_size, cfg.intensity, input_scale(cfg))
    options = _training_options(cfg, run_dir)
    train_rows = ds.rows(("train", "test", "unused")) if cfg.all_images else ds.rows("train")
    val_rows = ds.rows("val")
    if train_rows.empty:
        raise CovidCxrError(f"{ds.dir.root}: the train split is empty")
    data = TrainingData(task=ds.info.task, sources=tuple(sorted(set(train_rows["source"]) | set(val_rows["source"]))),
                        synthetic_sources=tuple(s for s in ds.info.synthetic_sources
                                                if s in set(train_rows["source"]) | set(val_rows["source"])),
                        protocol=str(ds.info.protocol.get("description", ds.info.protocol.get("name", ""))),
                        n_train=int(len(train_rows)), n_val=int(len(val_rows)), test_split=not cfg.all_images)
    meta = new_meta(cfg.arch, tuple(labels), positive, spec, options, data).replace(estimate=_estimate(cfg, run_dir))
    if rt.is_main:
        write_yaml(run_dir.config, {**options, "labels": labels,
                                    "positive": positive, "preprocess": spec.to_dict()})
    t0 = time.perf_counter()
    progress = cfg.progress and rt.is_main
    train_px = ds.pixels(train_rows, spec, progress=progress)
    val_px = ds.pixels(val_rows, spec, progress=progress)
    train_y, val_y = ds.targets(train_rows), ds.targets(val_rows)
    log.info("loaded %d train and %d val images at %d px in %.1f s", len(train_px), len(val_px), cfg.image_size,
             time.perf_counter() - t0)
    return _train(cfg, rt, run_dir, ds, meta, train_rows, train_px, train_y, val_px, val_y, resume_ckpt)


def input_scale(cfg: TrainConfig) -> str:
    """``--input-scale``, with a note when it differs from what the ``--weights`` were trained on."""
    from covid_cxr.model import weights_are_xrv

    if cfg.input_scale == "imagenet" and weights_are_xrv(cfg.weights):
        (log.warning if cfg.freeze_backbone else log.info)(
            "--weights %s are torchxrayvision's, trained on inputs in [-1024, 1024]; they get ImageNet-scaled inputs "
            "(BatchNorm adapts while fine-tuning%s); --input-scale xrv feeds them their own range", cfg.weights,
            "; NOT with --freeze-backbone, whose BatchNorm statistics stay fixed" if cfg.freeze_backbone else "")
    return cfg.input_scale


def _strata(cfg: TrainConfig, train_rows, train_y) -> np.ndarray | None:
    if cfg.balance == "sampler":
        return train_y
    if cfg.balance == "source":
        return (train_rows["source"].astype(str) + "|" + train_rows["target"].astype(str)).to_numpy()
    return None


def _train(cfg: TrainConfig, rt: Runtime, run_dir: RunDir, ds: Dataset, meta: ModelMeta, train_rows, train_px,
           train_y, val_px, val_y, resume_ckpt) -> dict:
    labels, spec = list(meta.labels), meta.preprocess
    aug = AugmentSpec(acquisition=cfg.acquisition_augment)
    on_device = augment_location(cfg.augment_on, rt.device) == "device"
    if on_device:
        train_ds = StackDataset(train_px, train_y, spec, seed=cfg.seed, pixels_only=True)
        batch_augment = BatchAugment(spec, aug, cfg.seed)
    else:
        train_ds = StackDataset(train_px, train_y, spec, aug, seed=cfg.seed)
        batch_augment = None
    log.info("augmentation: %s", f"batched on {rt.device}" if on_device else "image by image in the loader workers")
    sampler = EpochSampler(train_y, cfg.seed, strata=_strata(cfg, train_rows, train_y), rank=rt.rank,
                           world_size=rt.world_size)
    train_loader = make_train_loader(train_ds, sampler, cfg.batch_size,
                                     loader_workers(cfg.workers, rt.device, augmenting=not on_device), rt.device)
    model = build_model(labels, arch=cfg.arch, weights=None if cfg.weights == "none" else cfg.weights)
    if cfg.freeze_backbone:
        for p in backbone_parameters(model):
            p.requires_grad_(False)
        model._covid_cxr_frozen = True
    source_names = sorted(set(train_rows["source"]))
    adversary = None
    sources = None
    if cfg.adversarial > 0:
        if len(source_names) < 2:
            raise CovidCxrError(f"--adversarial needs at least two sources in the training split, found "
                                f"{source_names}; use --adversarial 0")
        adversary = SourceAdversary(model.feature_dim, len(source_names))
        sources = torch.tensor(train_rows["source"].map({s: i for i, s in enumerate(source_names)}).to_numpy())
    if cfg.sync_bn and rt.distributed:
        model = convert_sync_batchnorm(model, rt.device)
        log.info("--sync-bn: BatchNorm statistics of the global batch (%d processes)", rt.world_size)
    elif cfg.sync_bn:
        log.info("--sync-bn ignored: one process (its BatchNorm statistics are already the whole batch's)")
    model.to(rt.device)
    if adversary is not None:
        adversary.to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad] + (
        list(adversary.parameters()) if adversary is not None else [])
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps, int(round(cfg.warmup_epochs * steps))))
    dtype = amp_dtype(rt.device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    weight = _class_weights(train_y, len(labels)) if cfg.balance == "loss" else None
    weight = weight.to(rt.device) if weight is not None else None
    loss_fn = GlobalBatchCrossEntropy(weight, rt.world_size) if rt.distributed else nn.CrossEntropyLoss(weight=weight)
    state = {"epoch": 0, "best_auc": -math.inf, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    if resume_ckpt is not None:
        tr = resume_ckpt.training
        model.load_state_dict(resume_ckpt.state_dict, strict=True)
        optimizer.load_state_dict(tr["optimizer"])
        scheduler.load_state_dict(tr["scheduler"])
        if scaler is not None and tr.get("scaler"):
            scaler.load_state_dict(tr["scaler"])
        if adversary is not None and tr.get("adversary"):
            adversary.load_state_dict(tr["adversary"])
        state = dict(tr["train_state"])
        torch.set_rng_state(tr["rng"])
        log.info("resuming %s after epoch %d", run_dir.root, state["epoch"])
    if rt.is_main:  # lines of epochs after the checkpoint (or of a run that never finished an epoch) are rerun
        _truncate_metrics(run_dir.metrics, state["epoch"])
    train_model, train_adversary = model, adversary
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if adversary is not None:  # its gradients are averaged over ranks too
            train_adversary = nn.parallel.DistributedDataParallel(adversary, device_ids=ids)
    if use_compile(cfg.compile, rt.device):
        # Compiled last, around DDP (its graph breaks at bucket boundaries overlap communication). Checkpoints are
        # written from `model`, the plain module, so their keys carry no `_orig_mod.` prefix; validation runs it
        # in eager mode (other batch sizes, eval mode: no recompiles). The first step pays for the compilation.
        log.info("torch.compile: compiling the training model (the first step takes a while)")
        train_model = torch.compile(train_model)
    experiment_log = _open_experiment_log(cfg, rt, run_dir, meta, state["epoch"] + 1)
    loop = dict(cfg=cfg, rt=rt, run_dir=run_dir, meta=meta, train_model=train_model, model=model, train_ds=train_ds,
                sampler=sampler, train_loader=train_loader, val_px=val_px, val_y=val_y, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, loss_fn=loss_fn, dtype=dtype, state=state, adversary=adversary,
                train_adversary=train_adversary, sources=sources, experiment_log=experiment_log,
                batch_augment=batch_augment)
    ok = False
    try:
        summary = _epochs(**loop)

        def final() -> None:
            summary.update(finalize(run_dir, cfg, rt, train_px, train_y, val_px, val_y))
            experiment_log.summary(summary, [run_dir.calibration, run_dir.config, run_dir.metrics,
                                             run_dir.learning_curves_png, run_dir.calibration_png])

        on_main(rt, final)  # the other ranks return once rank 0 has written the final checkpoint
        ok = True
    finally:
        experiment_log.close(ok)
    if experiment_log.sinks:
        summary["experiment_logs"] = experiment_log.where()
    return summary


def _open_experiment_log(cfg: TrainConfig, rt: Runtime, run_dir: RunDir, meta: ModelMeta, first_epoch: int):
    """TensorBoard/MLflow logs (``--log``), written by rank 0 only (the other ranks get an empty log)."""
    from covid_cxr.tracking import ExperimentLog, open_logs

    if not rt.is_main or not cfg.logs:
        return ExperimentLog([])
    return open_logs(cfg.logs, run_dir.root, meta.training, first_epoch)


def _epochs(cfg, rt, run_dir, meta, train_model, model, train_ds, sampler, train_loader, val_px, val_y, optimizer,
            scheduler, scaler, loss_fn, dtype, state, adversary, sources, experiment_log=None,
            train_adversary=None, batch_augment=None) -> dict:
    stopped_early = False
    positive = meta.positive_index
    total_steps = cfg.epochs * len(train_loader)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        tr = train_one_epoch(train_model, train_loader, optimizer, scheduler, loss_fn, rt.device, dtype, scaler,
                             progress=cfg.progress and rt.is_main, desc=f"epoch {epoch}/{cfg.epochs}",
                             mixup=cfg.mixup, seed=cfg.seed, epoch=epoch,
                             adversary=train_adversary if train_adversary is not None else adversary,
                             sources=sources, adversary_max=cfg.adversarial, total_steps=total_steps,
                             batch_augment=batch_augment)
        train_s = time.perf_counter() - t0
        if rt.distributed:
            tr = _global_train_metrics(tr, rt)  # every rank records (and decides on) the same numbers
            broadcast_buffers(model)  # validate the model rank 0 saves (BatchNorm running statistics differ per rank)
        val = validation_metrics(validation_logits(model, val_px, meta.preprocess, rt, cfg.batch_size, dtype), val_y,
                                 positive) if len(val_px) else {}
        auc = val.get("auc")
        loss = val.get("loss", tr["loss"])
        score = auc if auc is not None and not math.isnan(auc) else -math.inf
        # Higher validation AUC wins; equal AUC (e.g. both 1.0) goes to the lower validation loss.
        improved = (score, -loss) > (state["best_auc"], -state.get("best_loss", math.inf))
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best_auc=score, best_loss=loss, best_epoch=epoch)
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  **{k: v for k, v in tr.items() if k.startswith("adv_")},
                  **{f"val_{k}": v for k, v in val.items()}, "lr": scheduler.get_last_lr()[0],
                  "epoch_seconds": round(time.perf_counter() - t0, 2),
                  "train_images_per_second": round(tr["images"] / train_s, 2),
                  "best_epoch": state["best_epoch"]}

        def write() -> None:
            # The metrics line first, then best.pt, then last.pt: an epoch counts once last.pt holds it. Interrupted
            # before that (killed, disk full), --resume reruns the epoch (dropping its line) and writes the same
            # best.pt; nothing written is ever half a file.
            append_line(run_dir.metrics, json.dumps(record))
            epoch_meta = meta.replace(epoch=epoch, val_metrics=val)
            if improved:
                save_checkpoint(run_dir.best, model, epoch_meta)
            save_checkpoint(run_dir.last, model, epoch_meta, training={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "train_state": dict(state),
                "rng": torch.get_rng_state(), "adversary": adversary.state_dict() if adversary is not None else None})
            if experiment_log is not None:
                experiment_log.epoch(record)

        on_main(rt, write)
        log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %s acc %s auc %s | %.1f s", epoch, cfg.epochs,
                 tr["loss"], tr["accuracy"], _fmt(val.get("loss")), _fmt(val.get("accuracy")), _fmt(auc),
                 record["epoch_seconds"])
        if cfg.patience and len(val_px) and state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: validation AUC has not improved for %d epochs", cfg.patience)
            stopped_early = True
            break
    return {"run": str(run_dir.root), "best_epoch": state["best_epoch"], "best_val_auc": state["best_auc"],
            "epochs_run": state["epoch"], "stopped_early": stopped_early,
            "best_checkpoint": str(run_dir.best), "last_checkpoint": str(run_dir.last)}


def _global_train_metrics(tr: dict, rt: Runtime) -> dict:
    """One epoch's train metrics over all ranks' images (each rank's are of its shard)."""
    keys = [k for k in ("loss", "accuracy", "adv_loss", "adv_accuracy") if k in tr]
    sums = all_sum([tr[k] * tr["images"] for k in keys] + [tr["images"]], rt)
    return {**{k: sums[i] / max(sums[-1], 1) for i, k in enumerate(keys)}, "images": int(sums[-1])}


def finalize(run_dir: RunDir, cfg: TrainConfig, rt: Runtime, train_px: np.ndarray, train_y: np.ndarray,
             val_px: np.ndarray, val_y: np.ndarray) -> dict:
    """Calibrate the best checkpoint and fit its out-of-scope gate on validation; save it through the writer.

    Writes ``calibration.json``, ``calibration_val.png`` and ``learning_curves.png``. Returns a summary.
    """
    log.info("calibrating %s on %d validation images and fitting its out-of-scope gate", run_dir.best.name,
             len(val_px))
    ckpt = read_checkpoint(run_dir.best)
    model = model_from_checkpoint(ckpt, rt.device)
    meta = ckpt.meta
    spec, synthetic = meta.preprocess, bool(meta.data and meta.data.synthetic)
    train_out = forward_pixels(model, train_px, spec, rt.device, cfg.batch_size, features=True)
    val_out = forward_pixels(model, val_px, spec, rt.device, cfg.batch_size, features=True) if len(val_px) else None
    doc: dict = {"split": "val", "n": int(len(val_px))}
    if val_out is not None:
        cal, threshold_lo, plot = calibrate(val_out.logits, val_y, meta.positive_index if meta.binary else None,
                                            cfg.threshold_rule, cfg.target_sensitivity)
        reliability_diagram_png(plot["probs_after"], val_y, run_dir.calibration_png,
                                f"validation, temperature {cal.temperature:.3g} ({cal.status})",
                                probs_before=plot["probs_before"])
    else:
        from covid_cxr.meta import Calibration

        cal, threshold_lo = Calibration(warnings=("no validation split: the temperature (1) and threshold (0.5) were "
                                                  "not fitted",)), 0.0
    gate_module, gate_info, gate_summary = fit_gate(train_out.features, train_out.views, train_y,
                                                    None if val_out is None else val_out.features,
                                                    None if val_out is None else val_out.views, cfg.gate_quantile)
    model.gate = gate_module.to(rt.device)
    meta = meta.replace(temperature=cal.temperature, threshold_log_odds=threshold_lo, calibration=cal, gate=gate_info)
    save_checkpoint(run_dir.best, model, meta)
    doc.update(calibration=cal.to_dict(), threshold=meta.threshold, threshold_log_odds=meta.threshold_log_odds,
               threshold_text=meta.threshold_text(), gate=gate_summary)
    write_json(run_dir.calibration, doc)
    for w in cal.warnings:
        log.warning("calibration: %s", w)
    _learning_curves(run_dir, synthetic)
    return {"temperature": cal.temperature, "calibration_status": cal.status, "threshold": meta.threshold,
            "threshold_text": meta.threshold_text(), "calibration_warnings": list(cal.warnings),
            "gate_threshold": gate_info.threshold}


def _learning_curves(run_dir: RunDir, synthetic: bool) -> None:
    records = read_metrics(run_dir)
    if records:
        best = max((r.get("best_epoch") or 0) for r in records)
        learning_curves_png(records, run_dir.learning_curves_png, best_epoch=best or None, synthetic=synthetic)


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


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the metric lines of epochs up to the checkpoint we continue from (later ones are rerun); damaged lines
    are dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= last_epoch:
            keep.append(line)
    if keep or path.stat().st_size:
        atomic_write(path, "".join(line + "\n" for line in keep))


def format_summary(summary: dict) -> str:
    """A readable terminal summary of a training run."""
    lines = [f"trained {summary['run']}: {summary['epochs_run']} epochs"
             + (" (stopped early)" if summary.get("stopped_early") else "")
             + f"; best validation AUC {_fmt(summary['best_val_auc'])} at epoch {summary['best_epoch']}"]
    if "threshold_text" in summary:
        lines.append(f"operating point {summary['threshold_text']}; temperature {summary['temperature']:.3g} "
                     f"({summary['calibration_status']})")
    lines += [f"WARNING: {w}" for w in summary.get("calibration_warnings", [])]
    lines.append(f"model: {summary['best_checkpoint']}")
    lines += [f"experiment log: {where}" for where in summary.get("experiment_logs", [])]
    return "\n".join(lines)

