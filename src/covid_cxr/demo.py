"""``covid-cxr demo``: the whole pipeline, offline, on synthetic phantoms.

Generates phantom chest X-rays (synthetic, not patients), then runs the same library
functions as the real workflow: data build -> train (from scratch) -> evaluate -> predict.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from covid_cxr import DISCLAIMER
from covid_cxr.config import DataConfig, EvalConfig, PredictConfig, TrainConfig
from covid_cxr.errors import CovidCxrError
from covid_cxr.evaluate import format_summary
from covid_cxr.phantoms import generate_phantoms

log = logging.getLogger(__name__)

PHANTOM_SOURCE = "synthetic-phantoms"


def run(out: str | Path, per_class: int = 160, image_size: int = 64, epochs: int = 8, seed: int = 0,
        progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the evaluation metrics. Refuses a non-empty ``out`` that is not a demo."""
    from covid_cxr import evaluate, manifest, predict, train

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "DEMO.txt").exists():
        raise CovidCxrError(f"{out} exists and is not a covid-cxr demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for old in (PHANTOM_SOURCE, "dataset", "run"):  # an earlier demo in this folder: start afresh
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "DEMO.txt").write_text("covid-cxr demo output on SYNTHETIC phantoms (not patients). " + DISCLAIMER + "\n")
    t0 = time.perf_counter()
    phantoms = out / PHANTOM_SOURCE
    generate_phantoms(phantoms, per_class, size=256, seed=seed)
    print(f"[1/4] generated {2 * per_class} synthetic phantom X-rays in {phantoms}")
    test_per_class = max(4, per_class // 4)
    data_cfg = DataConfig(sources=(("folder", str(phantoms)),), out=str(out / "dataset"),
                          test_per_class=test_per_class, val_fraction=0.15, train_size=2 * per_class,
                          seed=seed, progress=progress,
                          # Phantoms are distinct by construction but share one template, which the
                          # near-duplicate detector (tuned on real radiographs) can mistake for copies.
                          dedup=False)
    report = manifest.build(data_cfg)
    print("[2/4] " + manifest.format_report(report, data_cfg.out))
    train_cfg = TrainConfig(data=data_cfg.out, out=str(out / "run"), epochs=epochs, image_size=image_size,
                            batch_size=32, weights="none", lr=2e-3, warmup_epochs=0.5, patience=0, seed=seed,
                            progress=progress)
    summary = train.run(train_cfg)
    print(f"[3/4] trained DenseNet-121 from scratch for {summary['epochs_run']} epochs at {image_size} px; "
          f"best validation AUC {summary['best_val_auc']:.3f} (epoch {summary['best_epoch']})")
    result = evaluate.run(EvalConfig(run=train_cfg.out, split="test", bootstrap=500, seed=seed))
    print(format_summary(result))
    df, _ = manifest.read_manifest(data_cfg.out)
    sample = df[df["split"] == "test"]["path"].head(8).tolist()
    pred_out = out / "predictions.csv"
    predict.run(PredictConfig(run=train_cfg.out, inputs=tuple(sample), out=str(pred_out)))
    print(f"[4/4] predicted {len(sample)} test phantoms -> {pred_out}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Report: {result['output_dir']}/"
          f"classification_report.txt, metrics.json, confusion_matrix.png, roc.png, samples.png")
    print("These are SYNTHETIC phantoms: the numbers show the pipeline works, not that it detects COVID-19. "
          + DISCLAIMER)
    return result
