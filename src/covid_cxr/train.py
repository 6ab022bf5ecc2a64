"""``covid-cxr train``: fine-tune DenseNet-121 on a manifest's train split.

The loop is shaped for ``torchrun``: device and rank come from the environment, every
rank draws its own shard of each epoch, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_cxr.config import TrainConfig, write_yaml
from covid_cxr.data import EpochSampler, StackDataset, load_rows, worker_init
from covid_cxr.errors import CheckpointError, CovidCxrError
from covid_cxr.manifest import read_manifest
from covid_cxr.metrics import roc_auc
from covid_cxr.model import backbone_parameters, build_model, read_checkpoint, save_checkpoint, unwrap
from covid_cxr.predict import probabilities
from covid_cxr.runtime import Runtime, amp_dtype, autocast, setup_runtime
from covid_cxr.transforms import AugmentSpec, PreprocessSpec

log = logging.getLogger(__name__)

# Options that may differ between an interrupted run and its --resume.
RESUME_FREE_OPTIONS = ("resume", "workers", "progress", "device")


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


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, device: torch.device,
                    dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = False, desc: str = "train") -> dict:
    """One pass over ``loader``. Returns {"loss", "accuracy", "images"} averaged over samples."""
    from tqdm.auto import tqdm

    model.train()
    frozen = getattr(unwrap(model), "_covid_cxr_frozen", False)
    if frozen:  # keep frozen BatchNorm statistics fixed
        unwrap(model).features.eval()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for x, y, _ in bar:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
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
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device,
                   dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) as float32 and targets (N,) in dataset order."""
    model.eval()
    logits, targets, order = [], [], []
    for x, y, idx in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
        order.append(idx)
    inv = torch.argsort(torch.cat(order))
    return torch.cat(logits)[inv].numpy(), torch.cat(targets)[inv].numpy()


def validation_metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
    """Loss, accuracy and ROC AUC (one-vs-rest macro for more than two classes)."""
    probs = probabilities(torch.from_numpy(logits)).numpy()
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], eps, 1.0))))
    return {"loss": loss, "accuracy": float(np.mean(probs.argmax(1) == targets)),
            "auc": roc_auc(targets, probs)}


def calibrate(run_dir: Path, val_loader: DataLoader | None, labels: list[str], cfg: TrainConfig,
              rt: Runtime) -> dict:
    """Fit temperature scaling and choose the operating point on the validation split; store both in best.pt.

    The threshold applies to the calibrated probability of the positive class (covid); with more
    than two classes the argmax is used and only the temperature is fitted.
    """
    from covid_cxr.calibration import (choose_threshold, expected_calibration_error, fit_temperature, nll,
                                       reliability_diagram_png)
    from covid_cxr.model import load_checkpoint

    best = run_dir / "best.pt"
    result: dict = {"split": "val", "temperature": 1.0, "threshold": 0.5, "notes": []}
    if val_loader is None:
        result["notes"].append("no validation split: temperature 1 and threshold 0.5 kept")
        return result
    model, _ = load_checkpoint(best, rt.device)
    logits, targets = predict_loader(model, val_loader, rt.device)
    positive = labels.index("covid") if "covid" in labels else 1
    try:
        t = fit_temperature(logits, targets)
    except ValueError as exc:
        t = 1.0
        result["notes"].append(f"temperature not fitted ({exc}); 1.0 kept")
    before = probabilities(torch.from_numpy(logits)).numpy()
    after = probabilities(torch.from_numpy(logits), t).numpy()
    result.update(temperature=float(t), nll_before=nll(logits, targets), nll_after=nll(logits, targets, t),
                  ece_before=expected_calibration_error(before, targets)["ece"],
                  ece_after=expected_calibration_error(after, targets)["ece"], n=int(len(targets)))
    if len(labels) == 2:
        try:
            op = choose_threshold(after[:, positive], (targets == positive).astype(int), cfg.threshold_rule,
                                  cfg.target_sensitivity)
            # The threshold equals one validation score; a hair below it keeps that image positive when
            # batch size or hardware changes the probability in the 7th digit.
            result.update(threshold=float(op["threshold"]) - 1e-6, operating_point=op)
        except ValueError as exc:
            result["notes"].append(f"threshold not chosen ({exc}); 0.5 kept")
    else:
        result.update(threshold=None, operating_point={"rule": "argmax"})
    reliability_diagram_png(after, targets, run_dir / "calibration_val.png",
                            f"validation, temperature {t:.2f}", probs_before=before)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt.update(temperature=result["temperature"], threshold=result["threshold"] if result["threshold"] is not None
                else 0.5, calibration=result)
    tmp = best.with_name(f".{best.name}.tmp-{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, best)
    (run_dir / "calibration.json").write_text(json.dumps(result, indent=2))
    return result


def _load_split(df: pd.DataFrame, data_dir: str, split: str, labels: list[str], spec: PreprocessSpec,
                progress: bool) -> tuple[np.ndarray, np.ndarray]:
    rows = df[(df["split"] == split) & df["target"].isin(labels)]
    targets = rows["target"].map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    return load_rows(rows, data_dir, spec, progress=progress), targets


def _check_run_dir(cfg: TrainConfig) -> dict | None:
    """Refuse to overwrite a run; on --resume return the last checkpoint after checking its config."""
    out = Path(cfg.out)
    last = out / "last.pt"
    if not cfg.resume:
        if last.exists() or (out / "best.pt").exists():
            raise CovidCxrError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    if not last.exists():
        raise CheckpointError(f"--resume: {last} not found; start the run without --resume")
    ckpt = read_checkpoint(last)
    saved = ckpt.get("config", {})
    now = cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE_OPTIONS and saved.get(k) != now[k]}
    if diff:
        raise CovidCxrError(f"--resume: options differ from the interrupted run {diff} (saved, now); resume with "
                            "the same options or start a new --out")
    return ckpt


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: as requested, else 1 on CPU and up to 8 on CUDA.

    On CPU one single-threaded worker prepares the next batch while the model computes; in the
    main process augmentation would compete with the model's threads (measured ~50x slower
    per image under load by benchmarks/bench_data.py)."""
    if requested is not None:
        return requested
    return 1 if device.type == "cpu" else min(8, len(os.sched_getaffinity(0)))


def _make_loader(ds: StackDataset, sampler, cfg: TrainConfig, rt: Runtime, train: bool = False) -> DataLoader:
    workers = loader_workers(cfg.workers, rt.device)
    # A last training batch of one image breaks BatchNorm; drop it (it is a different image each epoch).
    drop_last = train and len(sampler) % cfg.batch_size == 1
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=rt.device.type == "cuda", worker_init_fn=worker_init if workers else None,
                      persistent_workers=False)


def _class_weights(targets: np.ndarray, k: int) -> torch.Tensor:
    counts = np.bincount(targets, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise CovidCxrError(f"the train split has no images of some class (counts {counts.tolist()})")
    return torch.tensor(len(targets) / (k * counts), dtype=torch.float32)


def run(cfg: TrainConfig) -> dict:
    """Train a model as configured; returns a summary (best epoch, best validation AUC, paths)."""
    rt = setup_runtime(cfg.device)
    resume_ckpt = _check_run_dir(cfg)
    seed_everything(cfg.seed)
    df, meta = read_manifest(cfg.data)
    labels = list(meta["labels"])
    spec = PreprocessSpec.for_size(cfg.image_size)
    out = Path(cfg.out)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", {**cfg.to_dict(), "labels": labels, "dataset": meta})
    t0 = time.perf_counter()
    train_x, train_y = _load_split(df, cfg.data, "train", labels, spec, cfg.progress and rt.is_main)
    val_x, val_y = _load_split(df, cfg.data, "val", labels, spec, cfg.progress and rt.is_main)
    if len(train_x) == 0:
        raise CovidCxrError(f"{cfg.data}: the train split is empty")
    log.info("decoded %d train and %d val images at %d px in %.1f s", len(train_x), len(val_x), cfg.image_size,
             time.perf_counter() - t0)
    train_ds = StackDataset(train_x, train_y, spec, AugmentSpec(), seed=cfg.seed)
    sampler = EpochSampler(train_y, cfg.seed, balanced=cfg.balance == "sampler", rank=rt.rank,
                           world_size=rt.world_size)
    train_loader = _make_loader(train_ds, sampler, cfg, rt, train=True)
    val_loader = None
    if len(val_x):
        val_ds = StackDataset(val_x, val_y, spec)
        val_loader = _make_loader(val_ds, EpochSampler(val_y, cfg.seed, shuffle=False), cfg, rt)
    model = build_model(labels, weights=None if cfg.weights == "none" else cfg.weights)
    if cfg.freeze_backbone:
        for p in backbone_parameters(model):
            p.requires_grad_(False)
        model._covid_cxr_frozen = True
    model.to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps, int(round(cfg.warmup_epochs * steps))))
    dtype = amp_dtype(rt, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    weight = _class_weights(train_y, len(labels)) if cfg.balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(rt.device) if weight is not None else None)
    state = {"epoch": 0, "best_auc": -math.inf, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"], strict=True)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        state = dict(resume_ckpt["train_state"])
        torch.set_rng_state(resume_ckpt["rng"])
        log.info("resuming %s after epoch %d", out, state["epoch"])
        if rt.is_main:
            _truncate_metrics(out / "metrics.jsonl", state["epoch"])
    train_model = model
    if rt.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return _epochs(cfg, rt, labels, spec, train_model, model, train_ds, sampler, train_loader, val_loader,
                   optimizer, scheduler, scaler, loss_fn, dtype, state)


def _epochs(cfg, rt, labels, spec, train_model, model, train_ds, sampler, train_loader, val_loader,
            optimizer, scheduler, scaler, loss_fn, dtype, state) -> dict:
    out = Path(cfg.out)
    stopped_early = False
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        tr = train_one_epoch(train_model, train_loader, optimizer, scheduler, loss_fn, rt.device, dtype, scaler,
                             progress=cfg.progress and rt.is_main, desc=f"epoch {epoch}/{cfg.epochs}")
        train_s = time.perf_counter() - t0
        val = validation_metrics(*predict_loader(model, val_loader, rt.device, dtype)) if val_loader else {}
        auc = val.get("auc")
        loss = val.get("loss", tr["loss"])
        score = auc if auc is not None and not math.isnan(auc) else -math.inf
        # Higher validation AUC wins; equal AUC (e.g. both 1.0) goes to the lower validation loss.
        improved = (score, -loss) > (state["best_auc"], -state.get("best_loss", math.inf))
        state.update(epoch=epoch, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best_auc=score, best_loss=loss, best_epoch=epoch)
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  **{f"val_{k}": v for k, v in val.items()}, "lr": scheduler.get_last_lr()[0],
                  "epoch_seconds": round(time.perf_counter() - t0, 2),
                  "train_images_per_second": round(tr["images"] / train_s, 2), "best_epoch": state["best_epoch"]}
        if rt.is_main:
            config = cfg.to_dict()
            if improved:
                save_checkpoint(out / "best.pt", model, labels, spec, config,
                                extra={"epoch": epoch, "val_metrics": val})
            save_checkpoint(out / "last.pt", model, labels, spec, config, extra={
                "epoch": epoch, "val_metrics": val, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "train_state": dict(state), "rng": torch.get_rng_state()})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %s acc %s auc %s | %.1f s", epoch, cfg.epochs,
                 tr["loss"], tr["accuracy"], _fmt(val.get("loss")), _fmt(val.get("accuracy")), _fmt(auc),
                 record["epoch_seconds"])
        if cfg.patience and val_loader is not None and state["bad_epochs"] >= cfg.patience:
            log.info("early stopping: validation AUC has not improved for %d epochs", cfg.patience)
            stopped_early = True
            break
    calibration = calibrate(out, val_loader, labels, cfg, rt) if rt.is_main else {}
    return {"run": str(out), "best_epoch": state["best_epoch"], "best_val_auc": state["best_auc"],
            "epochs_run": state["epoch"], "stopped_early": stopped_early,
            "temperature": calibration.get("temperature"), "threshold": calibration.get("threshold"),
            "best_checkpoint": str(out / "best.pt"), "last_checkpoint": str(out / "last.pt")}


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint we resume from (they will be rerun)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in keep))
