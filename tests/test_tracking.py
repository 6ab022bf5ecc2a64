"""Experiment logs beside metrics.jsonl: `train --log tensorboard` (read back with TensorBoard's own event reader)
and `--log mlflow` (a recording stand-in for the mlflow module: the real one is not a test dependency)."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from covid_cxr.errors import ConfigError
from covid_cxr.training import tracking
from covid_cxr.training.options import TrainConfig


class FakeMlflow(types.ModuleType):
    """Records the mlflow calls covid-cxr makes."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls: list[tuple] = []
        self.uri = None

    def set_tracking_uri(self, uri):
        self.uri = uri
        self.calls.append(("set_tracking_uri", uri))

    def get_tracking_uri(self):
        return self.uri

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_id=None, run_name=None):
        self.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "run-123"))

    def log_params(self, params):
        self.calls.append(("log_params", dict(params)))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", dict(metrics), step))

    def set_tags(self, tags):
        self.calls.append(("set_tags", dict(tags)))

    def log_artifact(self, path):
        self.calls.append(("log_artifact", Path(path).name))

    def end_run(self, status="FINISHED"):
        self.calls.append(("end_run", status))


@pytest.fixture(scope="module")
def logged_run(phantom_dataset, tmp_path_factory):
    """Two epochs at 32 px with --log tensorboard --log mlflow: (run folder, the fake mlflow's calls)."""
    from covid_cxr.training.train import run

    fake = FakeMlflow()
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "mlflow", fake)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run(TrainConfig(data=str(phantom_dataset), out=str(out), epochs=2, image_size=32, batch_size=16,
                                  weights="none", progress=False, patience=0, logs=("tensorboard", "mlflow")))
    return out, fake.calls, summary


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_epoch_metrics(logged_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'covid-cxr[track]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, summary = logged_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/loss", "val/auc", "lr", "time/epoch_seconds"} <= scalars
    records = _records(run)
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("lr", "lr")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2]
        # TensorBoard stores float32: 2^-24 = 6e-8 relative rounding; rel 1e-6 leaves 17x
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert {"options/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])
    assert any("tensorboard events in" in w for w in summary["experiment_logs"])


def test_mlflow_gets_params_metrics_per_epoch_and_the_run_files(logged_run):
    run, calls, _ = logged_run
    names = [c[0] for c in calls]
    assert names[:4] == ["set_tracking_uri", "set_experiment", "start_run", "log_params"]
    assert calls[0][1] == (run / "mlruns").resolve().as_uri()
    params = calls[3][1]
    assert params["image_size"] == "32" and params["epochs"] == "2"
    metrics = [c for c in calls if c[0] == "log_metrics"]
    records = _records(run)
    assert [m[2] for m in metrics] == [1, 2]
    assert metrics[0][1]["val_auc"] == pytest.approx(records[0]["val_auc"])  # the same float, passed as is
    artifacts = {c[1] for c in calls if c[0] == "log_artifact"}
    assert {"calibration.json", "config.yaml", "metrics.jsonl", "learning_curves.png"} <= artifacts
    assert calls[-1] == ("end_run", "FINISHED")
    assert (run / tracking.MLFLOW_RUN_ID).read_text().strip() == "run-123"


def test_a_missing_package_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ModuleNotFoundError
    with caplog.at_level(logging.WARNING, logger="covid_cxr.training.tracking"):
        log = tracking.open_logs(("mlflow",), tmp_path, {"epochs": 1})
    assert log.sinks == []
    assert "--log mlflow skipped" in caplog.text and "pip install mlflow" in caplog.text
    log.epoch({"epoch": 1, "train_loss": 0.5})  # an empty log accepts everything
    log.close()


def test_only_rank_zero_opens_logs(tmp_path):
    from types import SimpleNamespace

    from covid_cxr.training.train import _open_experiment_log

    cfg = SimpleNamespace(logs=("tensorboard",))
    meta = SimpleNamespace(training={})
    worker = _open_experiment_log(cfg, SimpleNamespace(is_main=False), SimpleNamespace(root=tmp_path), meta, 1)
    assert worker.sinks == [] and not (tmp_path / "tensorboard").exists()


def test_scalar_names_and_unknown_logs():
    assert tracking.scalar_name("val_auc") == "val/auc"
    assert tracking.scalar_name("adv_loss") == "train/adversary_loss"
    assert tracking.scalar_name("epoch_seconds") == "time/epoch_seconds"
    with pytest.raises(ConfigError, match="--log wandb is not supported"):
        TrainConfig(data="d", out="o", weights="none", logs=("wandb",))
