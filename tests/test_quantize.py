"""export --quantize int8: the int8 graph is written with its check in model.json, predicts like fp32 (the gate's
in-scope flags included), loads wherever an .onnx file does, and is refused (leaving no int8 file) when the test
AUC drops by more than the bar."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from covid_cxr.deploy import quantize
from covid_cxr.deploy.options import ExportConfig
from covid_cxr.errors import ConfigError, DatasetError, ExportError
from covid_cxr.files import read_json, write_json
from covid_cxr.machine import CPU_FLAGS
from covid_cxr.model.inference import load_predictor
from covid_cxr.model.onnx_model import OnnxModel, onnx_meta_path
from covid_cxr.paths import RunDir

LOGIT_ATOL = 0.08
"""Largest |int8 - fp32| logit on the tiny run's test images, relative to the fp32 logits' spread (max - min, at
least 1). Derived from the quantisation step, not from one machine: each uint8 activation rounds with RMS error
1/(255 * sqrt(12)) ~ 0.0011 of its range; ~120 quantised layers in sequence (DenseNet-121) add up to ~0.012 of the
range, and the largest of 48 logits (24 images x 2) is ~2.8 sigma ~ 0.035. 0.08 is over 2x that (room for other
CPUs training a slightly different tiny model), and still ~10x below what a broken graph does (a wrong scale or zero
point moves a logit by O(spread)). That every CPU computes the same integers is checked by the weight range
(quantize.WEIGHT_QMAX), not by this bound."""
INT8_SCOPE_BAND = 0.25
"""In-scope flags of the int8 and fp32 graphs are compared for images whose fp32 score is farther than this share of
the gate's threshold from it. The gate itself stays float32, but it whitens the int8 backbone's features: their
quantisation noise (~1.2% of the tensor's range, LOGIT_ATOL's derivation) adds in quadrature to the feature distance,
and along directions where the one-epoch model's features vary 10-30x less than that range it is a sizeable share
of the distance: sqrt(1 + (0.012 x 30)^2) - 1 = 6% per such direction, more where several add up. There is no
model-independent bound (it depends on the spectrum of the features of whichever tiny model the CPU trained): scores
moved by up to 0.10 in quantize's note and by up to 0.19 (12% of the threshold 1.54) on another run, whose nearest
fp32 score sat 0.015 below the threshold. The band is 2x the larger; a broken gate (quantised, fed the wrong tensor)
moves scores by O(1) and flips flags outside it. (Was: every flag equal, which that run met by a margin of 0.015.)"""


def _clear_of_gate_edge(scope: np.ndarray, threshold: float) -> np.ndarray:
    return np.abs(scope - threshold) > INT8_SCOPE_BAND * threshold


def _copy_run(src, dst):
    dst.mkdir(parents=True)
    for name in ("best.pt", "config.yaml", "model.onnx", "model.json"):
        shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def quantized(tiny_exported, tmp_path_factory):
    """A copy of the exported tiny run, quantised (bar 1.0: a 1-epoch model's AUC on 24 images is noise), and the
    data it was checked on: (run folder, summary, QuantData)."""
    run = _copy_run(tiny_exported, tmp_path_factory.mktemp("int8") / "run")
    qd = quantize.load_data(RunDir(run), OnnxModel(run / "model.onnx", device="cpu").meta)
    summary = quantize.quantize_export(run / "model.onnx", qd, max_auc_drop=1.0)
    return run, summary, qd


def test_int8_file_and_its_check_are_written(quantized):
    run, summary, qd = quantized
    assert (run / "model.int8.onnx").is_file() and (run / "model.int8.json").is_file()
    # int8 weights are 1/4 of fp32's; the float32 gate (a 1024 x 1024 precision, 4 MiB) and scales keep it at 0.39
    # here; an unquantised graph would be ~1.0
    assert (run / "model.int8.onnx").stat().st_size < 0.6 * (run / "model.onnx").stat().st_size
    block = read_json(run / "model.json", "model.json")["quantization"]
    assert read_json(run / "model.int8.json", "int8 json")["quantization"] == block
    assert block["file"] == "model.int8.onnx" and "quantize_static" in block["method"]
    assert block["calibration_n"] == len(qd.calibration) == block["validation_n"] == 14
    assert block["test_n"] == len(qd.test) == 24
    assert 0 <= block["fp32_auc"] <= 1 and 0 <= block["int8_auc"] <= 1
    assert block["auc_difference"] == pytest.approx(block["int8_auc"] - block["fp32_auc"])  # same floats: exact
    assert block["gate_nodes_kept_fp32"] > 0
    fp32 = OnnxModel(run / "model.onnx", device="cpu")
    clear = _clear_of_gate_edge(fp32.forward_pixels(qd.test).scope, fp32.meta.gate.threshold)
    assert block["in_scope_agree"] >= clear.mean()  # flags may differ only near the gate's threshold
    assert "reduce_range" in block["method"]
    assert set(CPU_FLAGS) <= set(block["exported_on_cpu"]) and block["exported_on_cpu"]["name"]
    # the fp32 pair still loads (model.json changed, model.onnx did not)
    OnnxModel(run / "model.onnx", device="cpu")


def test_int8_predicts_like_fp32(quantized):
    run, _, qd = quantized
    fp32 = load_predictor(run / "model.onnx", "onnx", "cpu")
    int8 = load_predictor(run / "model.int8.onnx", "onnx", "cpu")  # --backend onnx --run RUN/model.int8.onnx
    assert int8.source.name == "model.int8.onnx" and int8.run is not None
    a, b = fp32.outputs(qd.test), int8.outputs(qd.test)
    spread = max(1.0, float(a.logits.max() - a.logits.min()))
    assert np.abs(a.logits - b.logits).max() <= LOGIT_ATOL * spread
    t = fp32.meta.gate.threshold
    clear = _clear_of_gate_edge(a.scope, t)
    assert clear.any()  # the comparison is not empty
    assert np.array_equal((a.scope <= t)[clear], (b.scope <= t)[clear])
    assert int8.meta.to_dict() == fp32.meta.to_dict()


def test_int8_weights_fit_7_bits_so_no_cpu_saturates(quantized):
    """Every int8 weight is within [-64, 64] (reduce_range): AVX2's int16 pair sums (2 * 255 * |w|) cannot saturate,
    so CPUs with and without VNNI compute the same integers. A check of the file, the same on every machine."""
    from onnx import numpy_helper

    run, _, _ = quantized
    model = onnx.load(str(run / "model.int8.onnx"))
    init = {i.name: i for i in model.graph.initializer}
    weights = [numpy_helper.to_array(init[n.input[0]]) for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in init and init[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weights
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= quantize.WEIGHT_QMAX
    assert 2 * 255 * quantize.WEIGHT_QMAX <= np.iinfo(np.int16).max


def test_the_gate_subgraph_is_found_and_holds_no_convolution(tiny_exported):
    model = onnx.load(str(tiny_exported / "model.onnx"))
    gate = set(quantize.gate_only_nodes(model))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert gate and "MatMul" in {ops[n] for n in gate}
    assert "Conv" not in {ops[n] for n in gate} and "Gemm" not in {ops[n] for n in gate}


def test_a_drop_beyond_the_bar_is_refused_and_leaves_no_int8_file(tiny_exported, tmp_path, monkeypatch):
    run = _copy_run(tiny_exported, tmp_path / "run")
    stale = run / "model.int8.onnx"
    stale.write_bytes(b"from an older export")
    onnx_meta_path(stale).write_text("{}")
    before = read_json(run / "model.json", "model.json")
    write_json(run / "model.json", {**before, "quantization": {"file": "model.int8.onnx"}})
    # the real quantisation is covered above; here the int8 graph is the fp32 one and the AUCs are given
    monkeypatch.setattr(quantize, "quantize_model", lambda fp32, out, *a, **k: shutil.copy(fp32, out) and
                        {"excluded_nodes": 0})
    monkeypatch.setattr(quantize, "_compare", lambda *a: {"fp32_auc": 0.9, "int8_auc": 0.885, "auc_difference": -0.015,
                                                          "test_n": 24})
    qd = quantize.QuantData(np.zeros((2, 32, 32), np.uint8), np.zeros((2, 32, 32), np.uint8), np.array([0, 1]),
                            "d", 2)
    with pytest.raises(ExportError, match=r"0\.8850 \(int8\) vs 0\.9000 \(fp32\).*0\.0150 > 0\.01"):
        quantize.quantize_export(run / "model.onnx", qd, max_auc_drop=0.01)
    assert not stale.exists() and not onnx_meta_path(stale).exists()
    assert read_json(run / "model.json", "model.json") == before  # the stale block went with the stale file
    OnnxModel(run / "model.onnx", device="cpu")
    # the same numbers under a looser bar are kept
    summary = quantize.quantize_export(run / "model.onnx", qd, max_auc_drop=0.02)
    assert stale.is_file() and summary["int8_auc"] == 0.885


def test_a_moved_dataset_says_how_to_point_at_it(tiny_exported, tmp_path):
    run = _copy_run(tiny_exported, tmp_path / "run")
    text = (run / "config.yaml").read_text()
    text = "\n".join(f"{ln.split(':')[0]}: {tmp_path / 'gone'}" if ln.startswith(("data:", "data_absolute:")) else ln
                     for ln in text.splitlines())
    (run / "config.yaml").write_text(text)
    meta = OnnxModel(run / "model.onnx", device="cpu").meta
    with pytest.raises(DatasetError, match="--quantize int8.*--data DATASET_DIR"):
        quantize.load_data(RunDir(run), meta)


def test_quantize_needs_the_onnx_format_and_a_sane_bar():
    with pytest.raises(ConfigError, match="--format onnx"):
        ExportConfig(run="r", format="safetensors", quantize="int8")
    with pytest.raises(ConfigError, match="--max-auc-drop"):
        ExportConfig(run="r", quantize="int8", max_auc_drop=-0.1)
    assert ExportConfig(run="r").quantize == "none"


@pytest.mark.slow
def test_export_command_writes_both_models(tiny_run, tmp_path):
    """The whole command: fp32 export, quantisation, check, summary text (a fresh export: ~1 min on 2 cores)."""
    from covid_cxr.deploy.export import format_summary, run

    dst = tmp_path / "run"
    dst.mkdir()
    for name in ("best.pt", "config.yaml"):
        shutil.copy2(tiny_run / name, dst / name)
    summary = run(ExportConfig(run=str(dst), quantize="int8", max_auc_drop=1.0))
    assert (dst / "model.onnx").is_file() and (dst / "model.int8.onnx").is_file()
    assert summary["quantization"]["test_n"] == 24
    text = format_summary(summary)
    assert "model.int8.onnx" in text and "test ROC AUC int8" in text


@pytest.mark.slow
def test_a_learned_model_keeps_its_auc_and_scope_under_the_default_bar(learned_phantom_run, tmp_path):
    """A model that has learned the phantoms (80 test images at 64 px): int8 is kept under the default 0.01 bar and
    its in-scope flags and decisions agree with fp32 on nearly every test image."""
    from covid_cxr.deploy.export import run

    dst = tmp_path / "run"
    dst.mkdir()
    for name in ("best.pt", "config.yaml"):
        shutil.copy2(learned_phantom_run / name, dst / name)
    q = run(ExportConfig(run=str(dst), quantize="int8", data=str(learned_phantom_run.parent / "dataset")))[
        "quantization"]
    assert q["test_n"] == 80 and q["max_auc_drop"] == 0.01
    # the export's own bar (quantize.MAX_AUC_DROP); agreement: a model that learned the phantoms keeps most images
    # far from both thresholds, so 4 of 80 may flip (quantize warns above 2%)
    assert q["fp32_auc"] - q["int8_auc"] <= 0.01
    assert q["in_scope_agree"] >= 0.95 and q["decisions_agree"] >= 0.95


def test_an_int8_model_served_on_a_cpu_across_the_vnni_line_warns(quantized, monkeypatch, caplog):
    """Loaded on a CPU whose int8 kernels differ from the exporting CPU's, the int8 model says so once (the fp32
    model, whose kernels do not depend on VNNI, says nothing)."""
    import covid_cxr.model.onnx_model as onnx_model

    run, _, _ = quantized
    exported = read_json(run / "model.int8.json", "int8 json")["quantization"]["exported_on_cpu"]
    assert set(CPU_FLAGS) <= set(exported) and exported["name"]
    if all(exported[f] is None for f in CPU_FLAGS):
        pytest.skip("this CPU's features cannot be read (not Linux x86): nothing to compare")
    other = dict(exported)
    vnni = bool(exported["avx512_vnni"] or exported["avx_vnni"] or exported["amx_int8"])
    for f in ("avx512_vnni", "avx_vnni", "amx_int8"):
        other[f] = not vnni
    monkeypatch.setattr(onnx_model, "cpu_features", lambda: other)
    with caplog.at_level("WARNING", logger="covid_cxr.model.onnx_model"):
        OnnxModel(run / "model.onnx", device="cpu")
        assert not caplog.records
        OnnxModel(run / "model.int8.onnx", device="cpu")
    assert len(caplog.records) == 1 and "same predictions" in caplog.records[0].getMessage()


def test_more_than_2_percent_flipped_decisions_is_a_warning_in_the_summary(quantized):
    from covid_cxr.deploy.export import format_summary

    _, summary, _ = quantized
    n = summary["test_n"]
    assert quantize.flip_warnings({**summary, "decisions_agree": 1.0, "in_scope_agree": 1.0}) == []
    ok = 1.0 - quantize.MAX_DECISION_FLIPS / 2  # under the bar: no warning
    assert quantize.flip_warnings({**summary, "decisions_agree": ok, "in_scope_agree": ok}) == []
    flipped = {**summary, "decisions_agree": 1.0 - 3 / n, "in_scope_agree": 1.0}
    (warning,) = quantize.flip_warnings(flipped)
    assert f"{100 * 3 / n:.1f}% of {n} test images" in warning
    fake = {"format": "onnx", "onnx": "r/model.onnx", "json": "r/model.json", "bytes": 1, "opset": 18,
            "outputs": ["logits"], "max_abs_diff": {"logits": 0.0},
            "quantization": {**flipped, "warnings": [warning]}}
    assert f"warning: {warning}" in format_summary(fake)


def test_the_int8_export_reuses_a_current_onnx_file_and_only_that(tiny_exported, tmp_path):
    """export --quantize int8 quantises a model.onnx exported from this very checkpoint at this opset as it is;
    a changed checkpoint or another opset gets a fresh export."""
    from covid_cxr.deploy.export import MIN_OPSET, current_onnx, format_summary

    run = _copy_run(tiny_exported, tmp_path / "run")
    summary = current_onnx(run / "best.pt", run / "model.onnx", MIN_OPSET)
    assert summary is not None and summary["reused"] and summary["outputs"][0] == "logits"
    assert summary["onnx_sha256"] == read_json(run / "model.json", "json")["onnx"]["onnx_sha256"]
    assert format_summary({"format": "onnx", **summary}).startswith(f"kept {run / 'model.onnx'}")
    assert current_onnx(run / "best.pt", run / "model.onnx", MIN_OPSET + 1) is None
    assert current_onnx(run / "best.pt", run / "absent.onnx", MIN_OPSET) is None
    with open(run / "model.onnx", "ab") as f:  # the pair no longer matches: export again
        f.write(b"\0")
    assert current_onnx(run / "best.pt", run / "model.onnx", MIN_OPSET) is None
    shutil.copy2(tiny_exported / "model.onnx", run / "model.onnx")
    assert current_onnx(run / "best.pt", run / "model.onnx", MIN_OPSET) is not None
    with open(run / "best.pt", "ab") as f:  # another checkpoint
        f.write(b"\0")
    assert current_onnx(run / "best.pt", run / "model.onnx", MIN_OPSET) is None
