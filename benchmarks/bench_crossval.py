"""Which training options hold up on a hospital the model never saw? Out-of-source crossval on real X-rays.

For each configuration of training options this runs, on the real chest X-rays in ../shared/data/cxr:

* ``covid-cxr crossval --by source`` (one model per held-out source; every image scored by a model that
  never saw its source) -> pooled out-of-source AUC with a patient-bootstrap CI, per-source numbers,
  the share of held-out images the out-of-scope gate keeps in scope;
* an ordinary training run on the dataset's patient-level split -> the internal test AUC (what the
  tool used to report), to show the gap;
* the training time of both.

It then compares every configuration with the baseline on the *same* held-out images: the difference in
pooled AUC with a paired patient-bootstrap CI. Results go to OUT/results.json and a Markdown table
(printed, and written to OUT/results.md). Everything is resumable: rerun the same command and finished
folds and runs are skipped.

Usage::

    python benchmarks/bench_crossval.py --out /tmp/cvbench                      # every configuration
    python benchmarks/bench_crossval.py --out /tmp/cvbench --configs baseline clahe --image-size 128

This trains 6 models per configuration: expect tens of minutes per configuration on a 2-core CPU at 64 px.
Research use only, not a diagnostic device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr"
SOURCES = {"cohen": "cohen-covid-chestxray-dataset", "actualmed": "actualmed-covid-chestxray-dataset",
           "figure1": "figure1-covid-chestxray-dataset", "radiography": "covid19-radiography-database",
           "mooney": "chest-xray-pneumonia", "cxnet": "covid-cxnet", "openist": "openist-chest-xray"}
"""The seven collections in ../shared (``--sources five`` keeps the first five, the earlier tables' setting)."""
FIVE = ("cohen", "actualmed", "figure1", "radiography", "mooney")

TODAY = "today"
"""The configuration that trains with today's defaults (not pinned to v0.1's)."""

CONFIGS: dict[str, dict] = {
    "baseline": {},
    TODAY: {},
    "equalize": {"intensity": "equalize"},
    "clahe": {"intensity": "clahe"},
    "acquisition": {"acquisition_augment": True},
    "mixup": {"mixup": 0.4},
    "source-balanced": {"balance": "source"},
    "adversarial": {"adversarial": 0.3},
    "resnet18": {"arch": "resnet18"},
    "clahe+acquisition": {"intensity": "clahe", "acquisition_augment": True},
    "clahe+acquisition+mixup": {"intensity": "clahe", "acquisition_augment": True, "mixup": 0.4},
    "acquisition+mixup": {"acquisition_augment": True, "mixup": 0.4},
    "crop": {"lung_view": "crop"},
    "mask": {"lung_view": "mask"},
    "today+crop": {"lung_view": "crop"},
    "today+mask": {"lung_view": "mask"},
}
"""Name -> training options that differ from v0.1's defaults (the baseline); a name that starts with ``today``
differs from today's defaults instead. A lung view (``--lung-view``) trains with the segmenter given by ``--lungs``."""

V01 = {"intensity": "none", "acquisition_augment": False, "mixup": 0.0, "balance": "loss", "adversarial": 0.0,
       "arch": "densenet121"}
"""v0.1's defaults, pinned: the baseline stays the baseline when today's defaults change (acquisition
augmentation became the default by this benchmark's measurements)."""


def build_dataset(data_root: Path, out: Path, names: tuple[str, ...]) -> Path:
    from covid_cxr.data import manifest
    from covid_cxr.data.options import DataConfig

    if (out / "manifest.csv").is_file():
        return out
    manifest.build(DataConfig(sources=tuple((n, str(data_root / "sources" / SOURCES[n])) for n in names),
                              out=str(out), progress=False))
    return out


def train_options(args, name: str, extra: dict) -> dict:
    base = {"epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size, "weights": "none",
            "patience": args.patience, "seed": args.seed, "progress": False,
            **({} if name.startswith(TODAY) else V01)}
    base.update(extra)
    if extra.get("lung_view", "none") != "none":
        if not args.lungs:
            raise SystemExit(f"{name} needs --lungs LUNGS (a segmenter: benchmarks/bench_lungs.py trains one)")
        base["lungs"] = str(args.lungs)
    return base


def internal_run(dataset: Path, out: Path, options: dict) -> dict:
    """Train on the patient-level split and evaluate its test split (the internal number)."""
    from covid_cxr.evaluation import evaluate
    from covid_cxr.evaluation.options import EvalConfig
    from covid_cxr.paths import RunDir
    from covid_cxr.training import train
    from covid_cxr.training.options import TrainConfig

    run = RunDir(out)
    t0 = time.perf_counter()
    if not run.calibration.is_file():
        train.run(TrainConfig(data=str(dataset), out=str(out), resume=run.last.is_file(), **options))
    seconds = time.perf_counter() - t0
    metrics_file = run.eval_dir("test") / "metrics.json"
    if not metrics_file.is_file():
        evaluate.run(EvalConfig(run=str(out), bootstrap=1000))
    m = json.loads(metrics_file.read_text())
    return {"auc": m["metrics"]["roc_auc"], "ci95": m["ci95"].get("roc_auc"), "seconds": round(seconds, 1)}


def crossval_run(dataset: Path, out: Path, options: dict, seeds: int = 1) -> dict:
    from covid_cxr.training import crossval
    from covid_cxr.training.options import CrossvalConfig

    t0 = time.perf_counter()
    doc = crossval.run(CrossvalConfig(data=str(dataset), out=str(out), resume=True, bootstrap=1000, seeds=seeds,
                                      **options))
    doc["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return doc


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, n: int = 1000, seed: int = 0) -> dict:
    """AUC(b) - AUC(a) on the same held-out images, with a CI from resampling patients jointly."""
    from sklearn.metrics import roc_auc_score

    m = a[["path", "group", "target", "log_odds"]].merge(b[["path", "log_odds"]], on="path", suffixes=("_a", "_b"))
    y = (m["target"] == "covid").to_numpy()
    sa, sb = m["log_odds_a"].to_numpy(), m["log_odds_b"].to_numpy()
    diff = roc_auc_score(y, sb) - roc_auc_score(y, sa)
    from covid_cxr.evaluation.metrics import patient_resamples

    vals = []
    for idx in patient_resamples(m["group"].to_numpy(), n, seed):
        if y[idx].all() or not y[idx].any():
            continue
        vals.append(roc_auc_score(y[idx], sb[idx]) - roc_auc_score(y[idx], sa[idx]))
    return {"difference": float(diff), "ci95": [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))],
            "n": int(len(m))}


def fmt(v, digits=3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def table(results: dict) -> str:
    lines = ["| configuration | options | pooled out-of-source AUC (95% CI) | vs baseline (95% CI) | sens. at 95% spec. "
             "| held-out in scope | internal test AUC (95% CI) | training time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["pooled"]
        d = r.get("vs_baseline")
        lines.append(
            f"| {name} | {', '.join(f'{k}={v}' for k, v in r['options'].items()) or 'v0.1 defaults'} | "
            f"{fmt(p['auc'])} ({fmt(p['ci95'][0])}-{fmt(p['ci95'][1])}) | "
            + (f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d else "-")
            + f" | {fmt(p['sensitivity_at_95_specificity'])} | {p['in_scope']:.0%} | "
            f"{fmt(r['internal']['auc'])} ({fmt((r['internal']['ci95'] or [None])[0])}-"
            f"{fmt((r['internal']['ci95'] or [None, None])[1])}) | {r['seconds']:.0f} |")
    per_source = ["", "Per held-out source (AUC; sensitivity/specificity at each fold's own threshold):", "",
                  "| configuration | " + " | ".join(next(iter(results.values()))["per_source"]) + " |",
                  "|---|" + "---|" * len(next(iter(results.values()))["per_source"])]
    for name, r in results.items():
        cells = []
        for s in r["per_source"].values():
            cells.append(f"AUC {fmt(s['auc'], 2)}, sens {fmt(s['sensitivity'], 2)}, spec {fmt(s['specificity'], 2)}")
        per_source.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = ["", "Across seeds (the headline: mean over seeds, interval covering seeds and patients) and estimators:", "",
             "| configuration | pooled AUC per seed | mean | seed SD | 95% interval (seeds + patients) | seed ensemble "
             "AUC (95% CI) | per-fold recalibrated pool per seed; mean (seed SD) | mean of per-fold AUCs (folds with "
             "both classes) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a, e = r.get("across_seeds"), r.get("estimators") or {}
        folds = f"{fmt(e.get('mean_of_folds'))} ({', '.join(e.get('folds_with_both_classes') or [])})"
        if not a:
            seeds.append(f"| {name} | {fmt(r['pooled']['auc'])} | - | - | - | - | "
                         f"{fmt(e.get('pooled_fold_recalibrated'))} | {folds} |")
            continue
        ens, rec = a["ensemble"], a.get("fold_recalibrated")
        recs = (f"{', '.join(fmt(v) for v in rec['auc'])}; {fmt(rec['mean'])} ({fmt(rec['seed_sd'])})" if rec
                else "-")
        seeds.append(f"| {name} | {', '.join(fmt(v) for v in a['pooled_auc'])} | {fmt(a['mean'])} | "
                     f"{fmt(a['seed_sd'])} | {fmt(a['ci95_seeds_and_patients'][0])}-"
                     f"{fmt(a['ci95_seeds_and_patients'][1])} | {fmt(ens['auc'])} ({fmt((ens['ci95'] or [None])[0])}-"
                     f"{fmt((ens['ci95'] or [None, None])[1])}) | {recs} | {folds} |")
    return "\n".join(lines + per_source + seeds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("COVID_CXR_TEST_DATA", str(DEFAULT_DATA)))
    ap.add_argument("--out", required=True, help="work folder (datasets, runs, results); reused on a rerun")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per fold (crossval --seeds): the seed spread is "
                    "reported beside the patient-bootstrap CI")
    ap.add_argument("--sources", choices=("seven", "five"), default="seven",
                    help="the seven collections in ../shared, or the five of the earlier tables")
    ap.add_argument("--no-internal", action="store_true", help="skip the internal-split run (out-of-source only)")
    ap.add_argument("--lungs", help="the lung segmenter for the lung-view configurations (lungs.pt)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = Path(args.data_root)
    if not (root / "inventory.csv").is_file():
        print(f"real chest X-rays not found at {root}; pass --data-root", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(SOURCES) if args.sources == "seven" else FIVE
    dataset = build_dataset(root, out / f"dataset-{args.sources}", names)
    tag = f"{args.sources}-s{args.image_size}-e{args.epochs}-seed{args.seed}" + (
        f"x{args.seeds}" if args.seeds > 1 else "")
    results_file = out / f"results-{tag}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in args.configs:
        extra = CONFIGS[name]
        options = train_options(args, name, extra)
        t0 = time.perf_counter()
        cv = crossval_run(dataset, out / f"cv-{tag}-{name}", options, args.seeds)
        internal = ({"auc": None, "ci95": None, "seconds": 0.0} if args.no_internal else
                    internal_run(dataset, out / f"internal-{tag}-{name}", options))
        seconds = sum((f.get("seconds") or 0) for f in cv["folds"].values()) + internal["seconds"]
        shown = {**({"(today's defaults)": True} if name.startswith(TODAY) else {}), **extra}
        results[name] = {"options": shown, "pooled": cv["pooled"],
                         "per_source": cv["per_source"], "internal": internal, "seconds": seconds,
                         "wall_seconds": round(time.perf_counter() - t0),
                         "estimators": cv.get("estimators"), "across_seeds": cv.get("across_seeds")}
        base_pred = out / f"cv-{tag}-baseline" / "predictions.csv"
        if name != "baseline" and base_pred.is_file():
            results[name]["vs_baseline"] = paired_difference(pd.read_csv(base_pred),
                                                             pd.read_csv(out / f"cv-{tag}-{name}" / "predictions.csv"))
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{name}: pooled out-of-source AUC {fmt(cv['pooled']['auc'])}, internal {fmt(internal['auc'])}",
              flush=True)
    md = (f"Out-of-source crossval on ../shared/data/cxr ({len(names)} sources: {', '.join(names)}; covid-vs-normal, "
          f"near-duplicates removed), DenseNet-121 unless stated, from scratch, {args.image_size} px, up to "
          f"{args.epochs} epochs (patience {args.patience}), seed {args.seed}"
          + (f" to {args.seed + args.seeds - 1} ({args.seeds} seeds per fold)" if args.seeds > 1 else "")
          + f". Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.python_version()}.\n\n" + table(results))
    (out / f"results-{tag}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
