"""The training loop: one epoch (:func:`train_one_epoch`), validation, and the epochs of a run
(:func:`run_epochs`: keep the best, write metrics.jsonl, best.pt and last.pt, stop early), with the pieces they use:
the learning-rate schedule, the class-weighted loss of the global batch, and the source adversary.

Shaped for ``torchrun`` (see :mod:`covid_cxr.training.train` for how a run is set up and finished).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_cxr.evaluation.metrics import roc_auc
from covid_cxr.files import append_line
from covid_cxr.imaging.augment import mixup_lambda
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.checkpoint import save_checkpoint
from covid_cxr.model.inference import forward_pixels
from covid_cxr.model.networks import unwrap
from covid_cxr.model.runtime import Runtime, all_sum, autocast, broadcast_buffers, on_main
from covid_cxr.training.loaders import BatchAugment, sample_seed

log = logging.getLogger(__name__)


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
    from covid_cxr.model.meta import log_probs

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

def run_epochs(cfg, rt, run_dir, meta, train_model, model, train_ds, sampler, train_loader, val_px, val_y, optimizer,
            scheduler, scaler, loss_fn, dtype, state, adversary, sources, experiment_log=None,
            train_adversary=None, batch_augment=None) -> dict:
    """Epochs ``state["epoch"] + 1 .. cfg.epochs``: train, validate, keep the best (validation AUC, then loss),
    write metrics.jsonl, best.pt and last.pt (rank 0), stop early after ``cfg.patience`` epochs without gain."""
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
            tr = global_train_metrics(tr, rt)  # every rank records (and decides on) the same numbers
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
                 tr["loss"], tr["accuracy"], fmt(val.get("loss")), fmt(val.get("accuracy")), fmt(auc),
                 record["epoch_seconds"])
        if cfg.patience and len(val_px) and state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: validation AUC has not improved for %d epochs", cfg.patience)
            stopped_early = True
            break
    return {"run": str(run_dir.root), "best_epoch": state["best_epoch"], "best_val_auc": state["best_auc"],
            "epochs_run": state["epoch"], "stopped_early": stopped_early,
            "best_checkpoint": str(run_dir.best), "last_checkpoint": str(run_dir.last)}


def global_train_metrics(tr: dict, rt: Runtime) -> dict:
    """One epoch's train metrics over all ranks' images (each rank's are of its shard)."""
    keys = [k for k in ("loss", "accuracy", "adv_loss", "adv_accuracy") if k in tr]
    sums = all_sum([tr[k] * tr["images"] for k in keys] + [tr["images"]], rt)
    return {**{k: sums[i] / max(sums[-1], 1) for i, k in enumerate(keys)}, "images": int(sums[-1])}


def fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
