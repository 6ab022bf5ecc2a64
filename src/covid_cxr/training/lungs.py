"""``covid-cxr lungs train``: the lung-field segmenter, trained on the images of a dataset that have lung masks.

Patients are split once (seeded) into training and validation; the epoch with the best validation Dice is kept.
Dice and IoU are measured per validation image at the mask's own resolution, after the same clean-up that
prediction applies, and reported with a patient-bootstrap 95 % CI. The checkpoint is written by the classifier's
writer (same meta, same checksum) and read by :func:`covid_cxr.model.lungs.load_segmenter`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from covid_cxr.errors import DatasetError
from covid_cxr.files import write_json
from covid_cxr.imaging.lung_masks import (MASK_THRESHOLD, check_lungs, clean_mask, dice, iou, lung_input,
                                          mask_from_file_values, resize_mask)
from covid_cxr.model.lungs import LUNG_ARCH, LUNG_LABELS, LungNet, lung_spec
from covid_cxr.training.loop import seed_everything
from covid_cxr.training.options import LungsTrainConfig

log = logging.getLogger(__name__)

MIN_MASKED_IMAGES = 8
"""Fewer images with masks than this cannot give both a training and a validation part."""
BOOTSTRAP = 2000


def masked_images(data_dir: str | Path) -> list[dict]:
    """The dataset's images that have a lung mask: ``path``, ``mask_path`` (absolute), ``group`` (patient), ``source``.

    Raises:
        DatasetError: the dataset records no masks (name the sources that carry them).
    """
    from covid_cxr.data.dataset import read_dataset

    dataset = read_dataset(data_dir)
    df = dataset.df
    if not (df["mask_path"] != "").any():
        raise DatasetError(f"{data_dir}: no image of this dataset has a lung mask; build it with a source that "
                           "carries masks (--source openist=PATH, a folder source with masks/, or the Radiography "
                           "DB's <Class>/masks/), or see docs/lungs.md for licensed mask sets")
    rows = df[df["mask_path"] != ""]
    return [{"path": str(r.path), "mask_path": mask, "group": str(r.group), "source": str(r.source)}
            for r, mask in zip(rows.itertuples(), dataset.mask_paths(rows))]


def _decode(items: list[dict], size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    from covid_cxr.imaging.images import load_image

    xs, ys, truths = [], [], []
    for it in items:
        gray = load_image(it["path"])
        truth = mask_from_file_values(load_image(it["mask_path"]))
        if truth.shape != gray.shape:
            truth = resize_mask(truth, gray.shape)
        xs.append(lung_input(gray, size))
        ys.append(resize_mask(truth, (size, size)))
        truths.append(truth)
    return np.stack(xs), np.stack(ys), truths


def split_groups(groups: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """True for the validation images: ``val_fraction`` of the patients (at least one), chosen with ``seed``."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise DatasetError("the images with lung masks come from one patient: nothing to validate on")
    rng = np.random.default_rng(seed)
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val = set(rng.permutation(unique)[:n_val].tolist())
    return np.array([g in val for g in groups])


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (the fields are ~25 % of the image: Dice keeps the edges in focus)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2))
    soft_dice = (2 * inter + 1) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return bce + (1 - soft_dice).mean()


@torch.no_grad()
def _probabilities(model: LungNet, x: np.ndarray, device: torch.device, batch: int = 16) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(x[i:i + batch, None]).to(device))).float().cpu().numpy()
           for i in range(0, len(x), batch)]
    return np.concatenate(out)


def score_masks(probs: np.ndarray, truths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
    """Per image: Dice and IoU of the cleaned predicted mask against the truth at the truth's resolution, and the
    plausibility verdict."""
    d, j, checks = [], [], []
    for prob, truth in zip(probs, truths):
        mask = resize_mask(clean_mask(prob >= MASK_THRESHOLD), truth.shape)
        d.append(dice(mask, truth))
        j.append(iou(mask, truth))
        checks.append(check_lungs(mask))
    return np.array(d), np.array(j), checks


def mean_with_ci(values: np.ndarray, groups: list[str], seed: int = 0) -> dict:
    """Mean of per-image values with a 95 % CI from resampling patients (images of one patient move together)."""
    values = np.asarray(values, float)
    keys = np.array(groups)
    unique = np.unique(keys)
    members = [np.flatnonzero(keys == g) for g in unique]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[k] for k in pick])
        means.append(values[idx].mean())
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(values.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "images": int(len(values)), "patients": int(len(unique))}


def fit(x: np.ndarray, y: np.ndarray, val: np.ndarray, cfg: LungsTrainConfig, device: torch.device,
        truths: list[np.ndarray] | None = None) -> tuple[LungNet, list[dict]]:
    """Train on ``x[~val]``; keep the epoch with the best mean validation Dice. Returns (model, history)."""
    seed_everything(cfg.seed)
    model = LungNet(cfg.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * -(-int((~val).sum()) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    train_idx = np.flatnonzero(~val)
    val_truths = truths if truths is not None else [m for m in y[val]]
    best, best_state, history = -1.0, None, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(train_idx)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx].astype(np.float32)
            flip = rng.random(len(idx)) < 0.5  # a mirrored chest is still a chest: both fields stay lungs
            xb = np.where(flip[:, None, None], xb[:, :, ::-1], xb)
            yb = np.where(flip[:, None, None], yb[:, :, ::-1], yb)
            xt = torch.from_numpy(np.ascontiguousarray(xb[:, None])).to(device)
            yt = torch.from_numpy(np.ascontiguousarray(yb)).to(device)
            loss = _loss(model(xt), yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        d, _, _ = score_masks(_probabilities(model, x[val], device), val_truths)
        history.append({"epoch": epoch, "loss": round(total / max(1, len(train_idx)), 4),
                        "val_dice": round(float(d.mean()), 4), "seconds": round(time.perf_counter() - t0, 1)})
        log.info("lungs epoch %d/%d: loss %.4f, validation Dice %.4f (%.0f s)", epoch, cfg.epochs,
                 history[-1]["loss"], history[-1]["val_dice"], history[-1]["seconds"])
        if d.mean() > best:
            best = float(d.mean())
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), history


def run(cfg: LungsTrainConfig) -> dict:
    """Train, measure and write ``OUT/lungs.pt`` and ``OUT/lungs_metrics.json``; returns the metrics."""
    from covid_cxr.model.checkpoint import new_meta, save_checkpoint
    from covid_cxr.model.runtime import resolve_device

    items = masked_images(cfg.data)
    if len(items) < MIN_MASKED_IMAGES:
        raise DatasetError(f"{cfg.data}: only {len(items)} images have lung masks; at least {MIN_MASKED_IMAGES} "
                           "are needed to train and validate")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    log.info("lungs: decoding %d images with masks", len(items))
    x, y, truths = _decode(items, cfg.image_size)
    groups = [it["group"] for it in items]
    val = split_groups(groups, cfg.val_fraction, cfg.seed)
    model, history = fit(x, y, val, cfg, device, [t for t, v in zip(truths, val) if v])
    d, j, checks = score_masks(_probabilities(model, x[val], device), [t for t, v in zip(truths, val) if v])
    val_groups = [g for g, v in zip(groups, val) if v]
    sources = sorted({it["source"] for it in items})
    val_sources = np.array([it["source"] for it, v in zip(items, val) if v])
    metrics = {
        "protocol": (f"patient-level split of the {len(items)} images with lung masks (sources: {', '.join(sources)}): "
                     f"{int((~val).sum())} for training, {int(val.sum())} held out; Dice and IoU per held-out image "
                     "at the mask's resolution after clean-up (two largest parts, holes filled), mean with a "
                     "patient-bootstrap 95 % CI"),
        "dice": mean_with_ci(d, val_groups, cfg.seed),
        "iou": mean_with_ci(j, val_groups, cfg.seed),
        "dice_by_source": {s: mean_with_ci(d[val_sources == s], list(np.array(val_groups)[val_sources == s]), cfg.seed)
                           for s in sorted(set(val_sources))},
        "implausible_held_out_masks": int(sum(not c.plausible for c in checks)),
        "history": history,
        "training": cfg.to_dict(),
    }
    meta = new_meta(LUNG_ARCH, LUNG_LABELS, "lung", lung_spec(cfg.image_size),
                    {**cfg.to_dict(), "width": cfg.width}, None)
    meta = meta.replace(val_metrics={"dice": metrics["dice"]["mean"], "iou": metrics["iou"]["mean"]},
                        epoch=int(max(history, key=lambda h: h["val_dice"])["epoch"]))
    save_checkpoint(out / "lungs.pt", model, meta)
    write_json(out / "lungs_metrics.json", metrics)
    metrics["out"] = str(out)
    return metrics


def format_summary(metrics: dict) -> str:
    dsc, jac = metrics["dice"], metrics["iou"]
    lines = [f"lung segmenter: Dice {dsc['mean']:.3f} (95% CI {dsc['ci95'][0]:.3f}-{dsc['ci95'][1]:.3f}), IoU "
             f"{jac['mean']:.3f} ({jac['ci95'][0]:.3f}-{jac['ci95'][1]:.3f}) on {dsc['images']} held-out images of "
             f"{dsc['patients']} patients; {metrics['implausible_held_out_masks']} implausible masks",
             f"wrote {metrics['out']}/lungs.pt and lungs_metrics.json"]
    return "\n".join(lines)
