"""The covid-cxr command: help, option errors, the whole chain and the demo through main()."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.phantoms import generate_phantoms


@pytest.mark.parametrize("argv, expected", [
    ([], "data,train,evaluate,predict,explain,audit,report,export,serve,demo"),
    (["data", "build"], "--test-per-class"),
    (["train"], "--freeze-backbone"),
    (["evaluate"], "--split"),
    (["predict"], "--skip-unreadable"),
    (["demo"], "synthetic"),
])
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert expected in capsys.readouterr().out


def test_option_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "build", "--source", "bogus=/x", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown source 'bogus'" in capsys.readouterr().err
    assert main(["data", "build", "--source", f"cohen={tmp_path}"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["data", "build", "--source", f"cohen={tmp_path / 'nope'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--weights", "none"]) == 2
    assert "data build" in capsys.readouterr().err


def test_chain_build_train_evaluate_predict(tmp_path, capsys):
    src = tmp_path / "synthetic-phantoms"
    generate_phantoms(src, 20, size=64, seed=2)
    data, run = tmp_path / "ds", tmp_path / "run"
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 1\nimage_size: 32\nbatch_size: 8\nweights: none\n")
    assert main(["data", "build", "--source", f"folder={src}", "--out", str(data), "--test-per-class", "5",
                 "--no-progress", "--no-dedup"]) == 0
    assert "synthetic-phantoms" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(run), "--image-size", "40",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1
    assert "image_size: 40" in (run / "config.yaml").read_text()  # the flag overrides the YAML
    assert main(["evaluate", "--run", str(run), "--bootstrap", "50"]) == 0
    assert "precision    recall  f1-score   support" in capsys.readouterr().out
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run), str(src / "covid"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 20
    assert "not a diagnostic device" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-class", "24", "--epochs", "1", "--image-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "research use only" in text
    for name in ("classification_report.txt", "metrics.json", "confusion_matrix.png", "roc.png", "samples.png",
                 "class_distribution.png"):
        assert (out / "run" / "eval-test" / name).is_file(), name
    assert len(pd.read_csv(out / "predictions.csv")) == 8
    # a second demo into the same folder starts afresh instead of failing
    assert main(["demo", "--out", str(out), "--per-class", "24", "--epochs", "1", "--image-size", "32"]) == 0
    other = tmp_path / "notademo"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(other)]) == 2
    assert (other / "precious.txt").read_text() == "keep me"


def test_every_shipped_config_loads():
    from pathlib import Path

    from covid_cxr.config import DataConfig, TrainConfig, make_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        if path.name.startswith("data-"):
            cfg = make_config(DataConfig, {"sources": [["folder", "x"]], "out": "o"}, str(path))
        else:
            cfg = make_config(TrainConfig, {"data": "d", "out": "o"}, str(path))
        assert cfg.to_dict(), path
