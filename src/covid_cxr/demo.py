"""``covid-cxr demo``: the whole pipeline, offline, on synthetic phantoms.

Generates phantom chest X-rays (synthetic, not patients) with their lung masks, then runs the same library
functions as the real workflow: data build -> lungs train (the lung segmenter) -> train (from scratch, carrying the
segmenter, on the default lung view) -> evaluate -> predict -> audit and report.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from covid_cxr import DISCLAIMER
from covid_cxr.config import CommandOptions, check_positive
from covid_cxr.errors import ConfigError, CovidCxrError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.phantoms import generate_phantoms

log = logging.getLogger(__name__)

PHANTOM_SOURCE = "synthetic-phantoms"


@dataclass(frozen=True, kw_only=True)
class DemoConfig(CommandOptions):
    """``covid-cxr demo``: the whole pipeline, offline, on synthetic phantom chest X-rays (not patients): data build
    -> train (from scratch, small images) -> evaluate -> predict -> report. A few minutes on a CPU."""

    out: str = "demo-output"
    """Output folder."""
    per_class: int = 160
    """Phantoms per class."""
    image_size: int = 64
    """Network input side."""
    epochs: int = 8
    """Training epochs."""
    seed: int = 0
    """Seed of the phantoms, the split and training."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.per_class < 20:
            raise ConfigError("--per-class must be at least 20")
        if not 32 <= self.image_size <= 256:
            raise ConfigError("--image-size must be between 32 and 256")
        check_positive("epochs", self.epochs)


def run(cfg: DemoConfig) -> dict:
    """Run the demo into ``cfg.out``; returns the evaluation metrics. Refuses a non-empty folder that is not a demo."""
    # the stages are imported when the demo runs, not when the CLI builds its --help
    from covid_cxr.data import manifest
    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.data.options import DataConfig
    from covid_cxr.deploy import predict
    from covid_cxr.deploy.options import PredictConfig
    from covid_cxr.evaluation import audit, evaluate, report
    from covid_cxr.evaluation.evaluate import format_summary
    from covid_cxr.evaluation.options import AuditConfig, EvalConfig, ReportConfig
    from covid_cxr.training import lungs, train
    from covid_cxr.training.options import LungsTrainConfig, TrainConfig

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "DEMO.txt").exists():
        raise CovidCxrError(f"{out} exists and is not a covid-cxr demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for old in (PHANTOM_SOURCE, "dataset", "lungs", "run"):  # an earlier demo in this folder: start afresh
        shutil.rmtree(out / old, ignore_errors=True)
    atomic_write(out / "DEMO.txt", "covid-cxr demo output on SYNTHETIC phantoms (not patients). " + DISCLAIMER + "\n")
    t0 = time.perf_counter()
    phantoms = out / PHANTOM_SOURCE
    generate_phantoms(phantoms, cfg.per_class, size=256, seed=cfg.seed, masks=True)
    print(f"[1/7] generated {2 * cfg.per_class} SYNTHETIC phantom X-rays in {phantoms}, with their lung masks")
    data_cfg = DataConfig(sources=(("folder", str(phantoms)),), out=str(out / "dataset"),
                          test_per_class=max(4, cfg.per_class // 4), val_fraction=0.15, train_size=2 * cfg.per_class,
                          seed=cfg.seed, progress=cfg.progress,
                          # Phantoms are distinct by construction but share one template, which the
                          # near-duplicate detector (tuned on real radiographs) can mistake for copies.
                          dedup=False)
    built = manifest.build(data_cfg)
    print("[2/7] " + manifest.format_report(built, data_cfg.out))
    lungs_cfg = LungsTrainConfig(data=data_cfg.out, out=str(out / "lungs"), image_size=64, epochs=8, width=8,
                                 seed=cfg.seed)
    print("[3/7] " + lungs.format_summary(lungs.run(lungs_cfg)))
    train_cfg = TrainConfig(data=data_cfg.out, out=str(out / "run"), epochs=cfg.epochs, image_size=cfg.image_size,
                            batch_size=32, weights="none", lr=2e-3, warmup_epochs=0.5, patience=0, seed=cfg.seed,
                            progress=cfg.progress, lungs=lungs_cfg.out)
    summary = train.run(train_cfg)
    print(f"[4/7] trained DenseNet-121 from scratch for {summary['epochs_run']} epochs at {cfg.image_size} px on "
          f"the {train_cfg.resolved_lung_view} lung view (the model carries the segmenter)")
    print(train.format_summary(summary))
    result = evaluate.run(EvalConfig(run=train_cfg.out, split="test", bootstrap=500, seed=cfg.seed))
    print("[5/7] " + format_summary(result))
    ds = read_dataset(data_cfg.out)
    sample = ds.rows("test")["path"].head(8).tolist()
    pred_out = out / "predictions.csv"
    pred = predict.run(PredictConfig(run=train_cfg.out, inputs=tuple(sample), out=str(pred_out), progress=False))
    print(f"[6/7] predicted {len(sample)} test phantoms -> {pred_out} ({pred['summary']})")
    audited = audit.run(AuditConfig(run=train_cfg.out, split="test", bootstrap=200, seed=cfg.seed))
    page = report.run(ReportConfig(run=train_cfg.out, split="test"))
    print("[7/7] shortcut audit: " + " ".join(audited["verdicts"][:2]))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Report: {page}")
    print("These are SYNTHETIC phantoms: the numbers show the pipeline works, not that it detects COVID-19. "
          + DISCLAIMER)
    return result
