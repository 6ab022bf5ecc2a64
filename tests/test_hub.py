"""Standard model formats: `export --format safetensors` and `--format hf` (weights, config.json, model card),
read back by covid_cxr.load_run with identical predictions."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_api import _phantom_images
from test_export import prob_atol, scope_atol

import covid_cxr
from covid_cxr import cli
from covid_cxr.deploy import hub
from covid_cxr.deploy.export import run as export_run
from covid_cxr.deploy.modelcard import front_matter, model_card
from covid_cxr.deploy.options import ExportConfig
from covid_cxr.errors import CheckpointError, ExportError
from covid_cxr.evaluation.options import EvalConfig
from covid_cxr.model import formats
from covid_cxr.model.checkpoint import read_checkpoint
from covid_cxr.model.meta import ModelMeta


@pytest.fixture(scope="module")
def evaluated(tiny_exported, tmp_path_factory) -> Path:
    """tiny_exported's files, evaluated on the test split (so the model card has results)."""
    from covid_cxr.evaluation import evaluate

    run = tmp_path_factory.mktemp("hub") / "tiny-run"
    shutil.copytree(tiny_exported, run)
    evaluate.run(EvalConfig(run=str(run), bootstrap=50, workers=1, device="cpu"))
    return run


@pytest.fixture(scope="module")
def hf_folder(evaluated) -> Path:
    """An hf export with model.onnx (the run's own export of the same checkpoint, copied in: one ONNX export)."""
    folder = hub.prepare_folder(evaluated / "hf", overwrite=False)
    for name in ("model.onnx", "model.json"):
        shutil.copy2(evaluated / name, folder / name)
    hub.export_hf(evaluated / "best.pt", folder, evaluated, onnx=True)
    return folder


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_hf_folder_holds_weights_config_card_and_onnx(hf_folder):
    assert sorted(p.name for p in hf_folder.iterdir()) == ["README.md", "config.json", "model.json", "model.onnx",
                                                          "model.safetensors"]


def test_hf_folder_predicts_identically_to_the_run(evaluated, hf_folder, phantom_dataset):
    paths = _phantom_images(phantom_dataset, 6)
    original = covid_cxr.load_run(evaluated, device="cpu").predict(paths)
    reloaded = covid_cxr.load_run(hf_folder, device="cpu").predict(paths)
    # exact: the same float32 weights (safetensors is lossless, loaded into the model's own parameters), the same
    # 6-image batch, kernels, process and thread count
    assert [r.to_dict() | {"source": ""} for r in reloaded] == [r.to_dict() | {"source": ""} for r in original]
    via_onnx = covid_cxr.load_run(hf_folder, backend="onnx", device="cpu").predict(paths)
    meta = covid_cxr.load_run(evaluated, device="cpu").meta
    for a, b in zip(original, via_onnx):  # torch vs ONNX Runtime: test_export's bounds (was abs=1e-5: T >= 5 only)
        assert a.probabilities["covid"] == pytest.approx(b.probabilities["covid"], abs=prob_atol(meta.temperature))
        if abs(a.scope_score - meta.gate.threshold) > scope_atol(meta.gate.threshold):  # not on the gate's edge
            assert a.in_scope == b.in_scope
    # Grad-CAM for the ONNX backend of an hf folder comes from its safetensors (same source checkpoint)
    assert covid_cxr.load_run(hf_folder, backend="onnx").explain(paths[0])[0].heatmap.max() <= 1.0


def test_config_json_describes_the_model(evaluated, hf_folder):
    meta = read_checkpoint(evaluated / "best.pt").meta
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["library_name"] == "covid-cxr" and config["arch"] == meta.arch == "densenet121"
    assert config["labels"] == list(meta.labels) and config["id2label"] == {"0": "normal", "1": "covid"}
    assert config["positive_class"] == "covid"
    assert config["decision"]["threshold"] == meta.threshold
    assert config["decision"]["threshold_log_odds"] == meta.threshold_log_odds
    assert config["temperature"] == meta.temperature
    assert config["preprocessing"]["size"] == meta.preprocess.size
    assert config["preprocessing"]["mean"] == list(meta.preprocess.mean)
    assert config["gate"]["threshold"] == meta.gate.threshold
    assert ModelMeta.from_dict(config["covid_cxr_meta"]) == meta
    assert config["files"]["onnx"] == "model.onnx"


def test_model_card_front_matter_has_results_with_cis_and_protocol(evaluated, hf_folder):
    metrics = json.loads((evaluated / "eval-test" / "metrics.json").read_text())
    card = (hf_folder / "README.md").read_text()
    fm = _front_matter(card)
    assert fm["library_name"] == "covid-cxr" and "research-only" in fm["tags"] and "synthetic-data" in fm["tags"]
    assert fm["datasets"] == ["synthetic-phantoms (synthetic phantoms, covid-cxr)"]
    [result] = fm["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    assert result["dataset"]["args"]["images"] == metrics["protocol"]["images"]
    assert result["dataset"]["args"]["protocol"] == metrics["protocol"]["split_protocol"]["description"]
    by_type = {m["type"]: m for m in result["metrics"]}
    auc = by_type["roc_auc"]
    # the card rounds to 4 decimals (modelcard: round(v, 4)): <= 5e-5 off
    assert auc["value"] == pytest.approx(metrics["metrics"]["roc_auc"], abs=1e-4)
    assert auc["args"]["ci95"] == pytest.approx(metrics["ci95"]["roc_auc"], abs=1e-4)
    assert "resamples of patients" in auc["args"]["ci_method"]
    assert by_type["recall"]["value"] == pytest.approx(metrics["metrics"]["sensitivity"], abs=1e-4)
    for heading in ("## Intended use", "## Out-of-scope uses", "## Limitations", "## Evaluation", "## Training data"):
        assert heading in card
    assert covid_cxr.DISCLAIMER in card and "SYNTHETIC DATA" in card
    assert "| ROC AUC |" in card and "Out-of-source estimate: not measured" in card


def test_model_card_carries_the_crossval_estimate(evaluated):
    meta = read_checkpoint(evaluated / "best.pt").meta.replace(estimate={
        "source": "crossval", "crossval": "../cv", "pooled_auc": 0.71, "ci95": [0.64, 0.78],
        "protocol": "leave-one-source-out", "per_source": {"cohen": 0.69, "mooney": 0.74}})
    fm = front_matter(meta, None, "final")
    [result] = fm["model-index"][0]["results"]
    assert result["dataset"]["split"] == "held-out sources"
    assert result["metrics"][0]["value"] == 0.71 and result["metrics"][0]["args"]["ci95"] == [0.64, 0.78]
    card = model_card(meta, None, "not evaluated: no eval-test/metrics.json", "final", onnx=False)
    assert "ROC AUC 0.710 (95% CI 0.640-0.780)" in card and "cohen 0.690" in card
    assert "Internal test results: not evaluated" in card and "model.onnx" not in card.split("## Files")[1]


def test_export_refuses_to_mix_with_an_existing_folder_and_removes_a_stale_graph(evaluated, hf_folder, capsys):
    with pytest.raises(ExportError, match="--overwrite"):
        export_run(ExportConfig(run=str(evaluated), format="hf"))
    summary = export_run(ExportConfig(run=str(evaluated), format="hf", hf_onnx=False, overwrite=True,
                                      out=str(evaluated / "hf-no-onnx")))
    assert summary["onnx"] is None and "model.onnx" not in summary["files"]
    with pytest.raises(CheckpointError, match="no-hf-onnx"):
        covid_cxr.load_run(evaluated / "hf-no-onnx", backend="onnx")


def test_export_safetensors_on_the_command_line(evaluated, phantom_dataset, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    assert cli.main(["export", "--run", str(evaluated), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {out}") and "{" not in printed.out
    assert "onnxscript" not in printed.err
    header = formats.read_safetensors_header(out)
    meta = formats.safetensors_meta(out)
    assert meta == read_checkpoint(evaluated / "best.pt").meta
    assert json.loads(out.with_suffix(".meta.json").read_text())["meta"]["labels"] == ["normal", "covid"]
    assert {"net.features.conv0.weight", "head.weight"} <= set(header) and any(k.startswith("gate.") for k in header)
    paths = _phantom_images(phantom_dataset, 3)
    a = covid_cxr.load_run(evaluated, device="cpu").predict(paths)
    b = covid_cxr.load_run(out, device="cpu").predict(paths)
    assert [x.probabilities for x in a] == [x.probabilities for x in b]
    with pytest.raises(CheckpointError, match="onnx"):
        covid_cxr.load_run(out, backend="onnx")


def test_damaged_or_edited_exports_are_refused(hf_folder, tmp_path):
    bad = tmp_path / "hf"
    shutil.copytree(hf_folder, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 1000] ^= 0xFF  # one flipped bit pattern inside the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        covid_cxr.load_run(bad)
    shutil.copy2(hf_folder / "model.safetensors", weights)
    config = json.loads((bad / "config.json").read_text())
    config["covid_cxr_meta"]["threshold_log_odds"] = 3.0
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not describe"):
        covid_cxr.load_run(bad)
    not_ours = tmp_path / "plain.safetensors"
    not_ours.write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(CheckpointError, match="no covid-cxr model description"):
        covid_cxr.load_run(not_ours)
    assert np.isfinite(covid_cxr.load_run(hf_folder).meta.threshold)


def test_export_config_checks_names():
    from covid_cxr.errors import ConfigError

    with pytest.raises(ConfigError, match="must end in .safetensors"):
        ExportConfig(run="r", format="safetensors", out="x.onnx")
    with pytest.raises(ConfigError, match="must be one of onnx, safetensors, hf"):
        ExportConfig(run="r", format="torchscript")


@pytest.mark.slow
def test_export_on_the_command_line_prints_a_summary_and_no_exporter_chatter(tiny_run, tmp_path):
    """`covid-cxr export` (ONNX, then hf) in a fresh process: stdout is the summary, stderr only covid-cxr's own
    stage lines (cli.NOISY_LOGGERS silences onnxscript, torch.onnx and friends)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(tiny_run / "best.pt", run / "best.pt")
    src = str(Path(__file__).resolve().parents[1] / "src")
    for extra in ([], ["--format", "hf", "--out", str(tmp_path / "hf")]):
        proc = subprocess.run([sys.executable, "-m", "covid_cxr.cli", "export", "--run", str(run), *extra],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": src})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("wrote ") and "use it with:" in proc.stdout and "{" not in proc.stdout
        noise = [line for line in proc.stderr.splitlines() if line.strip() and " covid_cxr." not in line]
        assert noise == [], noise
        assert "onnxscript" not in proc.stderr.lower() and "Obtain model graph" not in proc.stdout + proc.stderr


def test_the_cards_scope_matches_the_training_data():
    """Children are named out of scope only when no training source had children; with pediatric training
    images (mooney) the card says instead why a child's output still means little. The report says the same."""
    from covid_cxr.deploy.modelcard import out_of_scope_uses
    from covid_cxr.imaging.pixels import PreprocessSpec
    from covid_cxr.model.meta import ModelMeta, TrainingData

    def meta(*sources):
        return ModelMeta(arch="densenet121", labels=("normal", "covid"), positive="covid",
                         preprocess=PreprocessSpec(size=32), data=TrainingData(task="covid-vs-normal", sources=sources))

    adults = out_of_scope_uses(meta("cohen", "radiography"))
    assert "children" in adults and "Children are in the training data" not in adults
    kids = out_of_scope_uses(meta("cohen", "mooney", "radiography"))
    assert "(other hospitals and scanners, lateral views" in kids
    assert "Children are in the training data (mooney: patients aged 1-5), but only in its non-COVID classes" in kids
    assert "children" in out_of_scope_uses(ModelMeta(arch="densenet121", labels=("normal", "covid"), positive="covid",
                                                     preprocess=PreprocessSpec(size=32)))  # nothing recorded


def test_overwrite_never_touches_a_folder_that_is_not_an_export(evaluated, tmp_path):
    """W2: --overwrite into a folder of the user's own files (README.md, config.json, model.onnx) is refused, naming
    what it would replace; the files are untouched. An earlier export's folder is still replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("README.md", "# my notes\n"), ("config.json", '{"mine": true}'), ("model.onnx", "x"),
                       ("model.json", "{}")):
        (mine / name).write_text(text)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    for hf_onnx in (True, False):
        with pytest.raises(ExportError, match=r"not written by covid-cxr export.*would replace or remove "
                                              r"config.json, README.md, model.onnx, model.json"):
            export_run(ExportConfig(run=str(evaluated), format="hf", overwrite=True, out=str(mine), hf_onnx=hf_onnx))
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    again = tmp_path / "again"
    export_run(ExportConfig(run=str(evaluated), format="hf", hf_onnx=False, out=str(again)))
    assert hub.is_hf_export(again)
    export_run(ExportConfig(run=str(evaluated), format="hf", hf_onnx=False, overwrite=True, out=str(again)))
