"""``covid-cxr train``: train a classifier on a manifest's train split.

The loop is shaped for ``torchrun``: device and rank come from the environment, every rank draws its
own shard of each epoch (gradients averaged by DDP; BatchNorm statistics per rank, or of the global
batch with ``--sync-bn``), validation is sharded and gathered so each image counts once (with rank 0's
BatchNorm buffers, the model it saves), train metrics are summed over ranks, every rank takes the same
early-stopping decision, and only rank 0 writes files while the others wait for it (and stop if it
failed, instead of hanging in the next collective).

After the last epoch (rank 0): the best checkpoint is calibrated on the validation split (temperature
and operating point, :func:`covid_cxr.evaluation.calibration.calibrate`), its out-of-scope gate is fitted
(:func:`covid_cxr.model.gate.fit_gate`), and it is saved again through the one checkpoint writer.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_cxr.config import UNLEARNED_OPTIONS
from covid_cxr.data.dataset import Dataset, read_dataset
from covid_cxr.errors import CheckpointError, CovidCxrError, OutputError, RunError
from covid_cxr.evaluation.calibration import calibrate, reliability_diagram_png
from covid_cxr.evaluation.plots import learning_curves_png
from covid_cxr.files import (RunLock, atomic_write, default_workers, read_json, relative_or_absolute,
                             remove_stale_temp_files, write_json, write_yaml)
from covid_cxr.imaging.augment import AugmentSpec
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.checkpoint import model_from_checkpoint, new_meta, read_checkpoint, save_checkpoint
from covid_cxr.model.gate import fit_gate
from covid_cxr.model.inference import forward_pixels
from covid_cxr.model.meta import ModelMeta, TrainingData
from covid_cxr.model.networks import backbone_parameters, build_model
from covid_cxr.model.runtime import Runtime, amp_dtype, convert_sync_batchnorm, on_main, setup_runtime, use_compile
from covid_cxr.paths import RunDir, read_metrics
from covid_cxr.training.loaders import BatchAugment, EpochSampler, StackDataset, worker_init
from covid_cxr.training.loop import (GlobalBatchCrossEntropy, SourceAdversary, fmt, run_epochs, seed_everything,
                                     warmup_cosine)
from covid_cxr.training.options import TrainConfig

log = logging.getLogger(__name__)

RESUME_FREE_OPTIONS = UNLEARNED_OPTIONS
"""Options that may differ between an interrupted run and its ``--resume``."""


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
    if cfg.lungs:  # a segmenter the model cannot carry is refused now, not after the training it would finish
        from covid_cxr.model.lungs import load_segmenter

        load_segmenter(cfg.lungs).model_width
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
    spec = replace(PreprocessSpec.for_size(cfg.image_size, cfg.intensity, input_scale(cfg)), lung_view=cfg.resolved_lung_view)
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
    masker = None
    if spec.needs_lungs:  # the lung view: each image segmented once (masks kept in the dataset's cache)
        from covid_cxr.model.lungs import TorchLungMasker, load_segmenter

        segmenter = load_segmenter(cfg.lungs, rt.device)
        masker = TorchLungMasker(segmenter.model, rt.device, segmenter.checksum)
    train_px = ds.pixels(train_rows, spec, progress=progress, lungs=masker)
    val_px = ds.pixels(val_rows, spec, progress=progress, lungs=masker)
    train_y, val_y = ds.targets(train_rows), ds.targets(val_rows)
    log.info("loaded %d train and %d val images at %d px in %.1f s", len(train_px), len(val_px), cfg.image_size,
             time.perf_counter() - t0)
    return _train(cfg, rt, run_dir, ds, meta, train_rows, train_px, train_y, val_px, val_y, resume_ckpt)


def input_scale(cfg: TrainConfig) -> str:
    """``--input-scale``, with a note when it differs from what the ``--weights`` were trained on."""
    from covid_cxr.model.networks import weights_are_xrv

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
        summary = run_epochs(**loop)

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
    from covid_cxr.training.tracking import ExperimentLog, open_logs

    if not rt.is_main or not cfg.logs:
        return ExperimentLog([])
    return open_logs(cfg.logs, run_dir.root, meta.training, first_epoch)


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
    log.info("finalize 1/4: features of the %d training images (what the out-of-scope gate learns)", len(train_px))
    train_out = forward_pixels(model, train_px, spec, rt.device, cfg.batch_size, features=True)
    log.info("finalize 2/4: logits and features of the %d validation images", len(val_px))
    val_out = forward_pixels(model, val_px, spec, rt.device, cfg.batch_size, features=True) if len(val_px) else None
    doc: dict = {"split": "val", "n": int(len(val_px))}
    log.info("finalize 3/4: temperature and operating threshold (%s)", cfg.threshold_rule)
    if val_out is not None:
        cal, threshold_lo, plot = calibrate(val_out.logits, val_y, meta.positive_index if meta.binary else None,
                                            cfg.threshold_rule, cfg.target_sensitivity)
        reliability_diagram_png(plot["probs_after"], val_y, run_dir.calibration_png,
                                f"validation, temperature {cal.temperature:.3g} ({cal.status})",
                                probs_before=plot["probs_before"])
    else:
        from covid_cxr.model.meta import Calibration

        cal, threshold_lo = Calibration(warnings=("no validation split: the temperature (1) and threshold (0.5) were "
                                                  "not fitted",)), 0.0
    log.info("finalize 4/4: the out-of-scope gate (distances to the training images' features)")
    gate_module, gate_info, gate_summary = fit_gate(train_out.features, train_out.views, train_y,
                                                    None if val_out is None else val_out.features,
                                                    None if val_out is None else val_out.views, cfg.gate_quantile)
    model.gate = gate_module.to(rt.device)
    meta = meta.replace(temperature=cal.temperature, threshold_log_odds=threshold_lo, calibration=cal, gate=gate_info)
    if cfg.lungs:  # the model carries the segmenter: its verdict joins the gate's wherever the model predicts
        from covid_cxr.model.lungs import load_segmenter
        from covid_cxr.model.meta import LungUse

        segmenter = load_segmenter(cfg.lungs)
        model.lungs = segmenter.model.to(rt.device)
        meta = meta.replace(lungs=LungUse(width=segmenter.model_width, size=segmenter.size,
                                          segmenter_checksum=segmenter.checksum,
                                          dice=segmenter.meta.val_metrics.get("dice")))
        log.info("the model carries the lung segmenter %s (held-out Dice %s)", cfg.lungs, meta.lungs.dice)
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
             + f"; best validation AUC {fmt(summary['best_val_auc'])} at epoch {summary['best_epoch']}"]
    if "threshold_text" in summary:
        lines.append(f"operating point {summary['threshold_text']}; temperature {summary['temperature']:.3g} "
                     f"({summary['calibration_status']})")
    lines += [f"WARNING: {w}" for w in summary.get("calibration_warnings", [])]
    lines.append(f"model: {summary['best_checkpoint']}")
    lines += [f"experiment log: {where}" for where in summary.get("experiment_logs", [])]
    return "\n".join(lines)

