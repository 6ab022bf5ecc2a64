"""Experiment logs beside ``metrics.jsonl``: TensorBoard and MLflow (``covid-cxr train --log tensorboard``).

``metrics.jsonl`` stays the record every covid-cxr stage reads; these are views of the same numbers for
the tools people already use. Only rank 0 of a multi-process run writes them (the caller opens them
there only). A requested tool that is not installed is skipped with one warning: training never fails
because a dashboard is missing.

* TensorBoard: event files in ``RUN_DIR/tensorboard/`` (needs the ``tensorboard`` package; ``pip install
  'covid-cxr[track]'``): scalars ``train/*``, ``val/*``, ``lr``, ``time/*`` per epoch, the options as text,
  and the final summary (threshold, temperature, gate) as text. A resumed run drops the events of the
  epochs it trains again (``purge_step``).
* MLflow: a run in ``$MLFLOW_TRACKING_URI`` (default: ``RUN_DIR/mlruns``), experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``covid-cxr``): the options as params, the epoch metrics, and at the
  end calibration.json, config.yaml, metrics.jsonl and learning_curves.png as artifacts. ``--resume``
  continues the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run_id``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"
MAX_PARAM_CHARS = 500
"""MLflow's smallest limit on a parameter value across its versions."""

_GROUPS = {"train_": "train/", "val_": "val/", "adv_": "train/adversary_"}


def scalar_name(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: ``val_auc`` -> ``val/auc``, ``epoch_seconds`` -> ``time/epoch_seconds``."""
    if key in ("epoch_seconds", "train_images_per_second"):
        return f"time/{key}"
    for prefix, group in _GROUPS.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return key


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("epoch", "best_epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MAX_PARAM_CHARS]
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, options: dict, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        # purge_step: a resumed run trains epochs >= first_epoch again; their old events are dropped.
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=first_epoch if first_epoch > 1 else None)
        if first_epoch <= 1:
            self.writer.add_text("options", "```\n" + yaml.safe_dump(options, sort_keys=True) + "```", 0)

    def where(self) -> str:
        return f"tensorboard events in {self.dir} (view: tensorboard --logdir {self.dir})"

    def epoch(self, record: dict) -> None:
        step = int(record["epoch"])
        for k, v in _numbers(record).items():
            self.writer.add_scalar(scalar_name(k), v, step)
        self.writer.flush()

    def summary(self, summary: dict, files: list[Path]) -> None:
        text = "\n".join(f"* {k}: {v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
        self.writer.add_text("summary", text, int(summary.get("epochs_run") or 0))

    def close(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, options: dict, first_epoch: int):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "covid-cxr"))
        id_file = run_dir / MLFLOW_RUN_ID
        previous = id_file.read_text(encoding="utf-8").strip() if first_epoch > 1 and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_dir.resolve().name)
        if not previous:
            id_file.write_text(self.run.info.run_id + "\n", encoding="utf-8")
            mlflow.log_params(_flat(options))

    def where(self) -> str:
        return f"mlflow run {self.run.info.run_id} at {self.mlflow.get_tracking_uri()}"

    def epoch(self, record: dict) -> None:
        self.mlflow.log_metrics(_numbers(record), step=int(record["epoch"]))

    def summary(self, summary: dict, files: list[Path]) -> None:
        self.mlflow.set_tags({f"covid_cxr.{k}": str(v)[:MAX_PARAM_CHARS] for k, v in summary.items()
                              if not isinstance(v, (dict, list))})
        for f in files:
            if f.is_file():
                self.mlflow.log_artifact(str(f))

    def close(self, ok: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


SINKS = {"tensorboard": (_TensorBoard, "tensorboard", "pip install 'covid-cxr[track]' (or pip install tensorboard)"),
         "mlflow": (_MLflow, "mlflow", "pip install mlflow")}
"""--log name -> (sink class, the package it needs, how to install it)."""


class ExperimentLog:
    """The experiment logs of one training run (empty when none was asked for or installed)."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sinks]

    def where(self) -> list[str]:
        """One line per log: where it is and how to look at it."""
        return [s.where() for s in self.sinks]

    def epoch(self, record: dict) -> None:
        """One line of metrics.jsonl, as scalars at step ``record["epoch"]``."""
        for s in self.sinks:
            s.epoch(record)

    def summary(self, summary: dict, files: list[Path] = ()) -> None:
        """The training summary (and the run's files, for MLflow) at the end of training."""
        for s in self.sinks:
            s.summary(summary, list(files))

    def close(self, ok: bool = True) -> None:
        for s in self.sinks:
            try:
                s.close(ok)
            except Exception as exc:  # a dashboard must not turn a finished run into a failure
                log.warning("closing the %s log failed: %s", s.name, exc)


def open_logs(kinds: tuple[str, ...] | list[str], run_dir: str | Path, options: dict,
              first_epoch: int = 1) -> ExperimentLog:
    """Open the requested logs for ``run_dir``; a tool that is not installed is skipped with a warning.

    Args:
        kinds: names from :data:`SINKS` (``--log``).
        run_dir: the run folder.
        options: the resolved training options (logged once, as text or params).
        first_epoch: the first epoch this process trains (above 1 when resuming).
    """
    sinks = []
    for kind in dict.fromkeys(kinds):
        cls, package, install = SINKS[kind]
        try:
            sinks.append(cls(Path(run_dir), options, first_epoch))
        except ModuleNotFoundError as exc:
            log.warning("--log %s skipped: the %s package is not installed (%s); metrics.jsonl is written as always",
                        kind, exc.name or package, install)
    for s in sinks:
        log.info("experiment log: %s", s.where())
    return ExperimentLog(sinks)
