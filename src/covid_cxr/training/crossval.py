"""``covid-cxr crossval``: how will the model do on a hospital it has never seen?

Out-of-source validation. For every source S of a dataset, a fold trains a model with S held out
entirely (its images and its patients) and scores every image of S with it. Pooling the held-out
predictions of all folds gives the *pooled out-of-source AUC*: each image scored by a model that never
saw its source, which is what a new hospital's images are.

Layout of ``CV_DIR``::

    folds/<source>/dataset/   manifest.csv + dataset.json of the fold (test = the held-out source;
                              train/val = the other sources, split by patient); images come from the
                              parent dataset's sources and cache
    folds/<source>/run/       an ordinary run folder (`covid-cxr train` wrote it)
    folds/<source>/result.json   the fold's held-out predictions are scored (written last: the fold is done)
    folds/<source>/predictions.csv
    commands.sh               the `covid-cxr train` command of every fold (to run folds on other machines)
    crossval.json, predictions.csv, per_source.csv, roc.png
    final/                    with --final: the model trained on every image, its estimate taken from here

Folds are independent runs: ``--prepare-only`` writes the fold datasets and ``commands.sh``; run each line
on any machine or GPU that can read the images (or the dataset's cache), copy ``folds/<source>/run`` back,
and ``covid-cxr crossval --resume`` scores and pools them. ``--fold NAME`` runs one fold only.
"""

from __future__ import annotations

import logging
import shlex
import time
import types
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.data.dataset import Dataset, read_dataset, source_root_record
from covid_cxr.data.splits import split_leave_source_out
from covid_cxr.errors import DatasetError
from covid_cxr.evaluation.metrics import (MIN_PER_CLASS, auc_with_ci, enough_to_judge, rates, roc_auc,
                                          sensitivity_at_specificity, subgroup_metrics, with_ci)
from covid_cxr.files import atomic_write, read_json, relative_or_absolute, write_json, write_yaml
from covid_cxr.model.meta import class_log_odds
from covid_cxr.paths import DatasetDir, RunDir, is_plain_name
from covid_cxr.training.options import CrossvalConfig, TrainConfig, TrainOptions

log = logging.getLogger(__name__)

UNLIMITED = 10**9


def fold_dir(cv: Path, source: str) -> Path:
    """The folder of the fold that holds ``source`` out; a source name read from a dataset is refused unless it is
    a plain name (it must not climb out of ``cv``)."""
    if not is_plain_name(source):
        raise DatasetError(f"source name {str(source)[:80]!r} cannot be a fold folder name (letters, digits, '.', '_' "
                           "and '-' only); the dataset was edited or not written by `covid-cxr data build`: build it "
                           "again")
    return Path(cv) / "folds" / source


def plan_folds(ds: Dataset, requested: tuple[str, ...]) -> list[str]:
    """The held-out sources: every source with images of the task (or the requested ones).

    Raises:
        DatasetError: fewer than two sources, a requested source without images of the task, or a fold whose
            training sources lack a class (named, with the fix), before anything is written.
    """
    task_rows = ds.df[ds.df["target"].isin(ds.labels)]
    present = sorted(task_rows["source"].unique())
    odd = [s for s in present if not is_plain_name(s)]
    if odd:  # each becomes a folder name: refused before anything is written
        raise DatasetError(f"{ds.dir.manifest}: source name {str(odd[0])[:80]!r} cannot be a fold folder name "
                           "(letters, digits, '.', '_' and '-' only, not '.' or '..'); the dataset was edited or not "
                           "written by `covid-cxr data build`: build it again")
    if len(present) < 2:
        raise DatasetError(f"out-of-source validation needs at least two sources with images of the task; "
                           f"{ds.dir.root} has {present}")
    if requested:
        unknown = [s for s in requested if s not in present]
        if unknown:
            raise DatasetError(f"--fold {', '.join(unknown)}: not a source of {ds.dir.root} with images of the task; "
                               f"choose from {', '.join(present)}")
        folds = list(dict.fromkeys(requested))
    else:
        folds = present
    for held_out in folds:  # each fold trains on the others: they need every class, checked before anything runs
        rest = task_rows[task_rows["source"] != held_out]
        lacking = [lab for lab in ds.labels if not (rest["target"] == lab).any()]
        if lacking:
            others = [s for s in present if s != held_out]
            raise DatasetError(
                f"fold {held_out!r}: with {held_out} held out, the other sources ({', '.join(others)}) have no "
                f"{', '.join(map(repr, lacking))} images to train on ({held_out} holds all of them); leave this fold "
                f"out with --fold (e.g. --fold {' --fold '.join(s for s in folds if s != held_out) or others[0]}), "
                f"or add a source with {', '.join(map(repr, lacking))} images to the dataset")
    return folds


FOLD_LOSS_WARN = 0.5
"""A fold is flagged when holding its source out removes more than this share of a class's images."""


def fold_losses(ds: Dataset, folds: list[str]) -> dict[str, list[str]]:
    """Per fold, a warning for each class whose images mostly come from the held-out source: the fold's model then
    trains on few of them, and its held-out score says as much about that as about an unseen hospital (with the
    Radiography DB held out, 87 % of the shared collection's normals go with it)."""
    task_rows = ds.df[ds.df["target"].isin(ds.labels)]
    out: dict[str, list[str]] = {}
    for held_out in folds:
        for lab in ds.labels:
            of_class = task_rows["target"] == lab
            total, lost = int(of_class.sum()), int((of_class & (task_rows["source"] == held_out)).sum())
            if total and lost / total > FOLD_LOSS_WARN:
                out.setdefault(held_out, []).append(
                    f"fold {held_out}: holding {held_out} out removes {lost / total:.0%} of the {lab!r} images "
                    f"({lost} of {total}); this fold's model trains on {total - lost} {lab!r} images, so its held-out "
                    f"score mostly measures that shortage, not only an unseen hospital")
    return out


def write_fold_dataset(ds: Dataset, held_out: str, out: Path, val_fraction: float, seed: int) -> DatasetDir:
    """The fold's dataset folder: the held-out source's task images are the test split; the other sources'
    images are split by patient into validation and training (all of them, no size cap)."""
    d = DatasetDir(out)
    df = ds.df.copy()
    params = types.SimpleNamespace(test_source=held_out, seed=seed, val_fraction=val_fraction, train_size=UNLIMITED)
    df["split"] = split_leave_source_out(df, ds.labels, params)
    roots = {name: root for name, root in ds.roots.items()}
    df["path"] = [str(Path(p).relative_to(roots[s])) if s in roots and Path(p).is_relative_to(roots[s]) else p
                  for s, p in zip(df["source"], df["path"])]
    info = dict(ds.info.raw)
    info["source_roots"] = {name: source_root_record(roots[name], d.root, bool(rec.get("synthetic")))
                            for name, rec in ds.info.sources.items()}
    cache = ds.cache()
    info["cache"] = ({"path": relative_or_absolute(cache.root, d.root), "absolute": str(cache.root.resolve()),
                      "short_side": cache.short_side} if cache is not None else None)
    info["protocol"] = {"name": "leave-source-out", "test_source": held_out, "seed": seed,
                        "description": f"crossval fold: every image of {held_out!r} is the test split; validation "
                                       f"({val_fraction:.0%} of patients) and training come from the other sources"}
    info["parent_dataset"] = relative_or_absolute(ds.dir.root, d.root)
    info["splits"] = {s: {c: int(((df["split"] == s) & (df["target"] == c)).sum()) for c in ds.labels}
                      for s in ("train", "val", "test")}
    d.root.mkdir(parents=True, exist_ok=True)
    write_json(d.info, info)
    atomic_write(d.manifest, df.to_csv(index=False))
    return d


def fold_train_config(cfg: CrossvalConfig, data: Path, out: Path, resume: bool) -> TrainConfig:
    """The fold's training options: exactly the crossval's, with the fold's dataset and run folder."""
    options = {f.name: getattr(cfg, f.name) for f in fields(TrainOptions)}
    return TrainConfig(**options, data=str(data), out=str(out), resume=resume)


def train_command(cfg: CrossvalConfig, data: Path, out: Path) -> str:
    """The `covid-cxr train` command line that trains a fold (for commands.sh)."""
    parts = ["covid-cxr", "train", "--data", str(data), "--out", str(out)]
    defaults = TrainOptions()
    for f in fields(TrainOptions):
        value = getattr(cfg, f.name)
        if f.name in ("progress", "workers", "device") or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _fold_status(folder: Path) -> str:
    run = RunDir(folder / "run")
    if (folder / "result.json").is_file():
        return "done"
    if run.calibration.is_file() and run.best.is_file():
        return "trained"
    if run.last.is_file():
        return "interrupted"
    return "new"


def score_fold(folder: Path, source: str, cfg: CrossvalConfig) -> dict:
    """Score the held-out source with the fold's model; writes predictions.csv and result.json (last)."""
    from covid_cxr.evaluation.split import load_split

    run = RunDir(folder / "run")
    d = load_split(run.root, "test", str(folder / "dataset"), "best", cfg.device)
    meta = d.predictor.meta
    out = d.predictor.outputs(d.pixels, cfg.batch_size, lungs=d.lungs)
    lp = meta.log_probs(out.logits)
    pred = meta.decide(lp)
    labels = list(meta.labels)
    rows = d.rows[["path", "source", "patient_id", "group", "label", "target"]].copy()
    for i, lab in enumerate(labels):
        rows[f"logit_{lab}"] = out.logits[:, i]
        rows[f"prob_{lab}"] = np.exp(lp[:, i])
    rows["log_odds"] = class_log_odds(lp, meta.positive_index) if meta.positive_index is not None else np.nan
    rows["predicted_label"] = [labels[k] for k in pred]
    rows["in_scope"] = (out.scope <= meta.gate.threshold) if out.scope is not None else True
    rows["scope_score"] = out.scope if out.scope is not None else np.nan
    rows["fold"] = source
    atomic_write(folder / "predictions.csv", rows.to_csv(index=False))
    result = {"fold": source, "held_out": source, "n": int(len(rows)), "threshold": meta.threshold,
              "threshold_text": meta.threshold_text(), "temperature": meta.temperature,
              "best_epoch": meta.epoch, "val_auc": meta.val_metrics.get("auc"),
              "train_sources": list(meta.data.sources) if meta.data else [],
              "n_train": meta.data.n_train if meta.data else None}
    write_json(folder / "result.json", result)
    return result


def eta_text(seconds_per_fold: list[float], left: int) -> str:
    """``; 2 folds took 6 min 10 s, about 9 min left`` from the folds timed so far (empty before the first)."""
    if not seconds_per_fold:
        return ""
    done = sum(seconds_per_fold)
    return (f"; {len(seconds_per_fold)} fold{'s' if len(seconds_per_fold) > 1 else ''} took {_duration(done)}, "
            f"about {_duration(done / len(seconds_per_fold) * left)} left")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def run_fold(cfg: CrossvalConfig, ds: Dataset, source: str, cv: Path) -> dict:
    """Prepare, train (or resume) and score one fold."""
    from covid_cxr.training import train

    folder = fold_dir(cv, source)
    status = _fold_status(folder)
    if status != "new" and not cfg.resume:
        raise DatasetError(f"{folder} already holds a fold ({status}); pass --resume to continue it or choose another "
                           "--out")
    if status == "done":
        log.info("fold %s: done, skipped", source)
        return {**read_json(folder / "result.json", "fold result"), "skipped": True}
    data_dir = folder / "dataset"
    if not (data_dir / "manifest.csv").is_file():
        write_fold_dataset(ds, source, data_dir, cfg.val_fraction, cfg.seed)
    t0 = time.perf_counter()
    if status in ("new", "interrupted"):
        log.info("fold %s: training with %s held out (%s)", source, source, "resuming" if status == "interrupted"
                 else "new")
        train.run(fold_train_config(cfg, data_dir, folder / "run", resume=status == "interrupted"))
    log.info("fold %s: scoring the held-out images", source)
    result = score_fold(folder, source, cfg)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(folder / "result.json", result)
    return result


# ----------------------------------------------------------------------------- pooling


def per_source_table(pred: pd.DataFrame, labels: list[str], positive: str, bootstrap: int = 0, seed: int = 0) -> dict:
    """Per held-out source: images per class; the AUC when both classes are there, and the sensitivity and
    specificity at that fold's own (validation-chosen) threshold, each with its 95% CI (patient bootstrap for the
    AUC, Wilson for the rates); a "too few to judge" flag below :data:`MIN_PER_CLASS` images of a class; the share
    flagged out of scope."""
    negative = next((lab for lab in labels if lab != positive), "rest") if len(labels) == 2 else "rest"
    out = {}
    for src, g in pred.groupby("fold", sort=True):
        is_pos = (g["target"] == positive).to_numpy()
        called = (g["predicted_label"] == positive).to_numpy()
        s = subgroup_metrics(is_pos, called, g["log_odds"].to_numpy(dtype=np.float64), g["group"].to_numpy(),
                             (negative, positive), bootstrap, seed)
        out[str(src)] = {"n": int(len(g)), "per_class": {lab: int((g["target"] == lab).sum()) for lab in labels},
                         "auc": s["roc_auc"], "auc_ci95": s["roc_auc_ci95"],
                         "sensitivity": s["sensitivity"], "sensitivity_ci95": s["sensitivity_ci95"],
                         "specificity": s["specificity"], "specificity_ci95": s["specificity_ci95"],
                         "too_few_to_judge": s["too_few_to_judge"], "caveat": s["caveat"],
                         "in_scope": float(g["in_scope"].astype(bool).mean())}
    return out


def _flat_cis(row: dict) -> dict:
    """A row for a CSV: each ``x_ci95`` pair as ``x_ci95_low`` and ``x_ci95_high`` columns."""
    out = {}
    for k, v in row.items():
        if k.endswith("_ci95"):
            out[f"{k}_low"], out[f"{k}_high"] = (v[0], v[1]) if v else (None, None)
        else:
            out[k] = v
    return out


def pool(pred: pd.DataFrame, positive: str, bootstrap: int, seed: int) -> dict:
    """Pooled out-of-source numbers over every held-out image: AUC of the positive class with a patient-bootstrap
    CI, sensitivity at 95% specificity, and sensitivity/specificity at each fold's own threshold."""
    is_pos = (pred["target"] == positive).to_numpy().astype(int)
    scores = pred["log_odds"].to_numpy(dtype=np.float64)
    lp2 = np.stack([np.zeros(len(scores)), scores], 1)  # class_log_odds(lp2, 1) == scores
    auc = auc_with_ci(is_pos, lp2, pred["group"].to_numpy(), 1, bootstrap, seed)
    r = rates(is_pos.astype(bool), (pred["predicted_label"] == positive).to_numpy())
    in_scope = pred["in_scope"].astype(bool).to_numpy()
    return {"auc": auc["auc"], "ci95": auc["ci95"], "n": int(len(pred)), "n_positive": int(is_pos.sum()),
            "patients": int(pred["group"].nunique()),
            "sensitivity_at_95_specificity": sensitivity_at_specificity(is_pos, scores, 0.95),
            "sensitivity_at_fold_thresholds": r["sensitivity"], "specificity_at_fold_thresholds": r["specificity"],
            "in_scope": float(in_scope.mean()),
            "auc_in_scope_only": roc_auc(is_pos[in_scope], lp2[in_scope], 1) if in_scope.any() else None}


def fold_recalibrated(pred: pd.DataFrame, results: dict[str, dict]) -> pd.DataFrame:
    """``pred`` with each fold's log-odds shifted by that fold's own decision threshold (chosen on the fold's
    validation split, from its training sources), so that every fold model's operating point sits at 0: a
    per-fold recalibration of the intercept that uses no held-out label. Decisions are unchanged."""
    def shift(fold: str) -> float:
        t = (results.get(fold) or {}).get("threshold")
        return float(np.log(t / (1 - t))) if t is not None and 0 < t < 1 else 0.0

    return pred.assign(log_odds=pred["log_odds"] - pred["fold"].map(shift).astype(float))


def estimators(pooled: dict, per_source: dict, recalibrated: dict | None = None) -> dict:
    """The pooled AUC beside the mean of the per-fold AUCs (folds whose held-out source has both classes) and the
    pooled AUC after per-fold recalibration (:func:`fold_recalibrated`): pooling mixes the score scales of different
    fold models, and a fold that lost most of a class weighs in by its size."""
    judged = {s: r["auc"] for s, r in per_source.items() if r.get("auc") is not None and r["auc"] == r["auc"]}
    mean = round(float(np.mean(list(judged.values()))), 4) if judged else None
    out = {"pooled": pooled["auc"], "mean_of_folds": mean, "folds_with_both_classes": sorted(judged),
           "headline": "pooled",
           "why": "the pooled AUC ranks every held-out image against every other, as a hospital mixing patients "
                  "would, with no step that could flatter it; the mean of per-fold AUCs counts only folds with both "
                  "classes (a source with one class has no AUC of its own), so the two answer different questions; "
                  "the per-fold recalibrated pool aligns each fold model's validation threshold at 0 (no held-out "
                  "label used): a gap between it and the pooled AUC is the part of the pessimism that comes from "
                  "mixing fold models' score scales, which one deployed model does not have"}
    if recalibrated is not None:
        out["pooled_fold_recalibrated"] = recalibrated["auc"]
        out["pooled_fold_recalibrated_ci95"] = recalibrated.get("ci95")
        out["pooled_fold_recalibrated_sensitivity_at_95_specificity"] = recalibrated.get(
            "sensitivity_at_95_specificity")
    return out


def roc_png(pred: pd.DataFrame, positive: str, pooled: dict, path: Path, synthetic: bool) -> dict[str, list[str]]:
    """The pooled ROC curve and one per held-out source with enough images of both classes to judge; returns the
    sources drawn and those left out as too few."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from covid_cxr.figures import save_figure

    fig = Figure(figsize=(5.4, 5.4))
    ax = fig.add_subplot()
    y = (pred["target"] == positive).to_numpy()
    fpr, tpr, _ = roc_curve(y, pred["log_odds"])
    ci = pooled.get("ci95")
    ax.plot(fpr, tpr, color="black", linewidth=2, label=f"pooled, AUC {pooled['auc']:.3f}"
            + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
    drawn, too_few = [], []
    for src, g in pred.groupby("fold"):
        gy = (g["target"] == positive).to_numpy()
        if enough_to_judge(int(gy.sum()), int((~gy).sum())):
            f, t, _ = roc_curve(gy, g["log_odds"])
            ax.plot(f, t, linewidth=1, alpha=0.8, label=f"held out: {src}")
            drawn.append(str(src))
        elif gy.any() and (~gy).any():
            too_few.append(str(src))
    if too_few:  # a curve through 1-9 images of a class is noise drawn as a result
        ax.plot([], [], " ", label=f"not drawn (fewer than {MIN_PER_CLASS} of a class): {', '.join(too_few)}")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("out-of-source ROC: every image scored by a model\nthat never saw its source", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, synthetic)
    return {"drawn": drawn, "too_few": too_few}


def aggregate(cfg: CrossvalConfig, ds: Dataset, folds: list[str], cv: Path) -> dict:
    """Pool the finished folds' held-out predictions; write crossval.json, predictions.csv, per_source.csv, roc.png."""
    done = [s for s in folds if (fold_dir(cv, s) / "result.json").is_file()]
    missing = [s for s in folds if s not in done]
    if not done:
        raise DatasetError(f"no finished fold in {cv}; run `covid-cxr crossval` (or the lines of commands.sh)")
    pred = pd.concat([pd.read_csv(fold_dir(cv, s) / "predictions.csv", keep_default_na=False,
                                  dtype={"path": str, "source": str, "target": str, "label": str,
                                         "predicted_label": str, "fold": str, "patient_id": str}) for s in done],
                     ignore_index=True)
    pred["in_scope"] = pred["in_scope"].astype(str).str.lower().isin(("true", "1"))
    positive = ds.info.positive or ds.labels[-1]
    log.info("pooling %d held-out predictions of %d folds (%d bootstrap resamples)", len(pred), len(done), cfg.bootstrap)
    pooled = pool(pred, positive, cfg.bootstrap, cfg.seed)
    per_source = per_source_table(pred, ds.labels, positive, cfg.bootstrap, cfg.seed)
    synthetic = sorted(set(ds.info.synthetic_sources) & set(pred["source"]))
    results = {s: read_json(fold_dir(cv, s) / "result.json", "fold result") for s in done}
    recalibrated = pool(fold_recalibrated(pred, results), positive, cfg.bootstrap, cfg.seed)
    doc = {
        "disclaimer": DISCLAIMER, "covid_cxr_version": __version__,
        "protocol": {"by": cfg.by, "description": "leave-one-source-out: each fold trains on every other source "
                     f"(validation {cfg.val_fraction:.0%} of their patients) and scores every image of its held-out "
                     "source; predictions of all folds pooled; confidence interval from resampling patients",
                     "dataset": str(ds.dir.root.resolve()), "task": ds.info.task, "labels": ds.labels,
                     "positive_class": positive, "bootstrap": cfg.bootstrap, "folds": folds},
        "complete": not missing, "missing_folds": missing, "synthetic_sources": synthetic,
        "pooled": pooled, "per_source": per_source, "folds": results,
        "fold_warnings": fold_losses(ds, folds),
        "estimators": estimators(pooled, per_source, recalibrated),
        "training_options": {f.name: getattr(cfg, f.name) for f in fields(TrainOptions)},
    }
    write_json(cv / "crossval.json", doc)
    atomic_write(cv / "predictions.csv", pred.to_csv(index=False))
    table = pd.DataFrame([{"held_out": s, **_flat_cis({k: v for k, v in r.items() if k != "per_class"}),
                           **{f"n_{k}": v for k, v in r["per_class"].items()}} for s, r in per_source.items()])
    atomic_write(cv / "per_source.csv", table.to_csv(index=False))
    if pooled["auc"] == pooled["auc"]:
        roc_png(pred, positive, pooled, cv / "roc.png", bool(synthetic))
    return doc


def seed_runs(cfg: CrossvalConfig, cv: Path) -> list[tuple[CrossvalConfig, Path]]:
    """(options, folder) of each seed: the first seed is the crossval itself (so a one-seed crossval extends to
    more with --resume), seed ``--seed + k`` lives in ``CV/seeds/seed-<n>``."""
    out = [(cfg, cv)]
    for k in range(1, cfg.seeds):
        folder = cv / "seeds" / f"seed-{cfg.seed + k}"
        out.append((replace(cfg, seed=cfg.seed + k, seeds=1, out=str(folder), final=False), folder))
    return out


def across_seeds(cfg: CrossvalConfig, ds: Dataset, docs: list[dict], cvs: list[Path]) -> dict:
    """The seed-to-seed spread of the pooled out-of-source AUC, an interval covering seeds and patients (law of total
    variance: the mean patient-bootstrap variance plus the variance between seeds), and the seed ensemble (each
    image's log-odds averaged over the seeds, pooled like one crossval); the same spread for the pool after per-fold
    recalibration (``fold_recalibrated``), whose seed noise is smaller (it removes the fold models' scale mixing), so
    it compares training options better."""
    spread = _spread([d["pooled"]["auc"] for d in docs], [d["pooled"].get("ci95") for d in docs])
    preds = [pd.read_csv(c / "predictions.csv", keep_default_na=False, dtype={"path": str, "source": str,
                                                                             "target": str, "predicted_label": str})
             for c in cvs]
    merged = preds[0].copy()
    key = ["path", "source"]
    scores = pd.concat([p.set_index(key)["log_odds"].rename(i) for i, p in enumerate(preds)], axis=1)
    merged["log_odds"] = scores.mean(axis=1).reindex(pd.MultiIndex.from_frame(merged[key])).to_numpy()
    merged["in_scope"] = merged["in_scope"].astype(str).str.lower().isin(("true", "1"))
    positive = ds.info.positive or ds.labels[-1]
    ensemble = pool(merged, positive, cfg.bootstrap, cfg.seed)
    recal = [(d.get("estimators") or {}) for d in docs]
    recalibrated = None
    if all(e.get("pooled_fold_recalibrated") is not None for e in recal):
        r = _spread([e["pooled_fold_recalibrated"] for e in recal], [e.get("pooled_fold_recalibrated_ci95")
                                                                       for e in recal])
        recalibrated = {"auc": r.pop("values"), **r}
    return {"n": len(docs), "seeds": [cfg.seed + k for k in range(len(docs))],
            "pooled_auc": spread.pop("values"), **spread,
            "ensemble": {"auc": ensemble["auc"], "ci95": ensemble["ci95"],
                         "sensitivity_at_95_specificity": ensemble["sensitivity_at_95_specificity"]},
            "fold_recalibrated": recalibrated,
            "note": "headline: the mean over seeds with the interval covering seeds and patients; one seed's pooled "
                    "AUC alone moves by about the seed SD"}


def _spread(values: list[float], cis: list) -> dict:
    """Mean, seed SD, range and a 95 % interval covering seeds and patients (law of total variance: the mean
    patient-bootstrap variance, from each CI's width, plus the variance between seeds) of per-seed AUCs."""
    aucs = np.array(values, dtype=float)
    boot_var = [((ci[1] - ci[0]) / (2 * 1.959964)) ** 2 for ci in cis if ci]
    seed_sd = float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0
    total_sd = float(np.sqrt((np.mean(boot_var) if boot_var else 0.0) + seed_sd ** 2))
    mean = float(aucs.mean())
    return {"values": [round(float(a), 4) for a in aucs], "mean": round(mean, 4), "seed_sd": round(seed_sd, 4),
            "min": round(float(aucs.min()), 4), "max": round(float(aucs.max()), 4),
            "ci95_seeds_and_patients": [round(mean - 1.959964 * total_sd, 4), round(mean + 1.959964 * total_sd, 4)]}


def run(cfg: CrossvalConfig) -> dict:
    """Run (or resume) every fold of every seed, pool their held-out predictions, and with ``--final`` train the
    final model."""
    runs = seed_runs(cfg, Path(cfg.out))
    docs = []
    for k, (c, _) in enumerate(runs, 1):
        if len(runs) > 1:
            log.info("seed %d/%d (--seed %d)", k, len(runs), c.seed)
        docs.append(_run_folds(c))
    doc = docs[0]
    if len(runs) > 1 and all(d.get("pooled") for d in docs):
        ds = read_dataset(cfg.data, cfg.source_roots)
        doc["across_seeds"] = across_seeds(cfg, ds, docs, [c for _, c in runs])
        write_json(Path(cfg.out) / "crossval.json", {k: v for k, v in doc.items() if k not in ("out", "final")})
    if cfg.final and doc.get("pooled"):
        doc["final"] = train_final(cfg, Path(cfg.out))
    return doc


def _run_folds(cfg: CrossvalConfig) -> dict:
    """One seed's folds: prepare, train (or resume), score, pool."""
    ds = read_dataset(cfg.data, cfg.source_roots)
    if ds.info.positive is None:
        raise DatasetError(f"{ds.dir.root}: crossval needs a task with a positive class")
    cv = Path(cfg.out)
    cv.mkdir(parents=True, exist_ok=True)
    folds = plan_folds(ds, cfg.folds)
    for text in (w for ws in fold_losses(ds, folds).values() for w in ws):
        log.warning("%s", text)
    write_yaml(cv / "crossval_config.yaml", {**cfg.to_dict(), "data": str(Path(cfg.data).resolve())})
    lines = ["#!/bin/sh", "# One line per crossval fold; each is an ordinary training run. Run them anywhere the images "
             "(or the dataset's cache) can be read, e.g. one line per GPU or machine, copy each folds/<source>/run back, "
             "then run `covid-cxr crossval --resume` with the same options to score and pool them.", "set -e",
             'cd "$(dirname "$0")"']
    for s in folds:
        folder = fold_dir(cv, s)
        if not (folder / "dataset" / "manifest.csv").is_file():
            write_fold_dataset(ds, s, folder / "dataset", cfg.val_fraction, cfg.seed)
        lines.append(train_command(cfg, Path("folds") / s / "dataset", Path("folds") / s / "run"))
    atomic_write(cv / "commands.sh", "\n".join(lines) + "\n")
    if cfg.prepare_only:
        return {"out": str(cv), "prepared": folds, "commands": str(cv / "commands.sh"), "pooled": None,
                "per_source": {}, "complete": False, "missing_folds": folds}
    timed: list[float] = []  # seconds per fold trained in this call (not the ones found done)
    for k, s in enumerate(folds, 1):
        log.info("fold %d/%d: %s held out%s", k, len(folds), s, eta_text(timed, len(folds) - k + 1))
        start = time.monotonic()
        result = run_fold(cfg, ds, s, cv)
        if not result.get("skipped"):
            timed.append(time.monotonic() - start)
    doc = aggregate(cfg, ds, plan_folds(ds, ()), cv)
    doc["out"] = str(cv)
    return doc


def train_final(cfg: CrossvalConfig, cv: Path) -> dict:
    """The deployable model: trained on every image (validation for early stopping and calibration only), its
    performance estimate recorded as this crossval's."""
    from covid_cxr.training import train

    out = cv / "final"
    resume = RunDir(out).last.is_file() and not RunDir(out).calibration.is_file()
    if RunDir(out).calibration.is_file():
        return {"run": str(out), "note": "already trained"}
    options = {f.name: getattr(cfg, f.name) for f in fields(TrainOptions)}
    summary = train.run(TrainConfig(**options, data=cfg.data, out=str(out), resume=resume, all_images=True,
                                    estimate_from=str(cv), source_roots=cfg.source_roots))
    return {"run": str(out), "best_epoch": summary["best_epoch"], "threshold_text": summary.get("threshold_text")}


def format_summary(doc: dict) -> str:
    """A readable terminal summary."""
    if doc.get("pooled") is None:
        return (f"prepared {len(doc.get('prepared', []))} folds in {doc['out']}; train them with the lines of "
                f"{doc['commands']}, then run `covid-cxr crossval --resume` with the same options")
    p = doc["pooled"]
    lines = []
    if doc.get("synthetic_sources"):
        lines.append(f"SYNTHETIC DATA ({', '.join(doc['synthetic_sources'])})")
    ci = p.get("ci95")
    lines.append(f"pooled out-of-source AUC {p['auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, patients "
                                                                f"resampled)" if ci else "")
                 + f" on {p['n']} images ({p['n_positive']} positive) from {p['patients']} patients")
    lines.append(f"expect about this on a hospital the model has not seen; sensitivity at 95% specificity "
                 f"{p['sensitivity_at_95_specificity']:.3f}; at each fold's own threshold: sensitivity "
                 f"{p['sensitivity_at_fold_thresholds']:.3f}, specificity {p['specificity_at_fold_thresholds']:.3f}; "
                 f"{p['in_scope']:.0%} of held-out images in scope")
    lines.append(f"{'held-out source':<24}{'images':>7}  {'per class':<24}{'AUC (95% CI)':<19}{'sensitivity':<19}"
                 f"{'specificity':<19}{'in scope':>8}")
    for src, r in doc["per_source"].items():
        pc = ", ".join(f"{k} {v}" for k, v in r["per_class"].items())
        lines.append(f"{src:<24}{r['n']:>7}  {pc:<24}{with_ci(r['auc'], r.get('auc_ci95'), 2):<19}"
                     f"{with_ci(r['sensitivity'], r.get('sensitivity_ci95'), 2):<19}"
                     f"{with_ci(r['specificity'], r.get('specificity_ci95'), 2):<19}{r['in_scope']:>8.0%}"
                     + (f"  [{r['caveat']}]" if r.get("caveat") else ""))
    est = doc.get("estimators") or {}
    if est.get("mean_of_folds") is not None:
        lines.append(f"mean of per-fold AUCs {est['mean_of_folds']:.3f} over the {len(est['folds_with_both_classes'])} "
                     f"folds with both classes (pooled {est['pooled']:.3f}; the headline is the pooled one)")
    if est.get("pooled_fold_recalibrated") is not None:
        rci = est.get("pooled_fold_recalibrated_ci95")
        lines.append(f"pooled after per-fold recalibration (each fold's validation threshold moved to 0, no held-out "
                     f"label used): AUC {est['pooled_fold_recalibrated']:.3f}"
                     + (f" (95% CI {rci[0]:.3f}-{rci[1]:.3f})" if rci else "")
                     + "; the gap to the pooled AUC comes from mixing the fold models' score scales")
    seeds = doc.get("across_seeds")
    if seeds:
        lo, hi = seeds["ci95_seeds_and_patients"]
        ens = seeds["ensemble"]
        lines.append(f"{seeds['n']} seeds: pooled AUC {', '.join(f'{a:.3f}' for a in seeds['pooled_auc'])}; mean "
                     f"{seeds['mean']:.3f}, seed SD {seeds['seed_sd']:.3f}; 95% interval covering seeds and patients "
                     f"{lo:.3f}-{hi:.3f}; seed ensemble (log-odds averaged) AUC {ens['auc']:.3f}")
        rec = seeds.get("fold_recalibrated")
        if rec:
            lines.append(f"{seeds['n']} seeds after per-fold recalibration: mean {rec['mean']:.3f}, seed SD "
                         f"{rec['seed_sd']:.3f} (interval {rec['ci95_seeds_and_patients'][0]:.3f}-"
                         f"{rec['ci95_seeds_and_patients'][1]:.3f}): compare training options by it too")
    lines += [f"WARNING: {w}" for ws in doc.get("fold_warnings", {}).values() for w in ws]
    if doc.get("missing_folds"):
        lines.append(f"not finished: {', '.join(doc['missing_folds'])} (run them, then --resume)")
    if doc.get("final"):
        lines.append(f"final model (every image, estimate from this crossval): {doc['final']['run']}")
    lines += [f"written to {doc['out']}/crossval.json, predictions.csv, per_source.csv, roc.png", DISCLAIMER]
    return "\n".join(lines)

