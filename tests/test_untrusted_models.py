"""Model files a user downloads or receives are checked by type and range before anything is built or served
(issue 18 N4-N6): a non-finite threshold or temperature, a gate with absurd sizes or a list of a million labels is a
one-line CheckpointError naming the field, never a silent every-image-normal model or a 40 GB allocation."""

from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.checkpoint import new_meta
from covid_cxr.model.meta import MAX_GATE_FEATURES, MAX_LABELS, ModelMeta

GATE = {"threshold": 3.8, "quantile": 0.99, "method": "m", "n_fit": 10, "n_val": 5, "dims": 8, "feature_dim": 64,
        "n_means": 2}


def _doc(**changes) -> dict:
    meta = new_meta("densenet121", ("normal", "covid"), "covid", PreprocessSpec(size=32), {}, None)
    return {**meta.to_dict(), "gate": dict(GATE), **changes}


@pytest.mark.parametrize("field,value", [("threshold_log_odds", float("nan")), ("threshold_log_odds", float("-inf")),
                                         ("threshold_log_odds", float("inf")), ("threshold_log_odds", "abc"),
                                         ("temperature", float("nan")), ("temperature", -1.0)])
def test_a_non_finite_threshold_or_temperature_is_refused(field, value):
    with pytest.raises(CheckpointError, match=field if field == "threshold_log_odds" else "temperature"):
        ModelMeta.from_dict(_doc(**{field: value}), where="model.json")


@pytest.mark.parametrize("field,value", [("threshold", float("nan")), ("threshold", float("inf")),
                                         ("quantile", float("nan")), ("feature_dim", 100_000),
                                         ("n_means", 100_000), ("feature_dim", 0), ("dims", -1), ("n_means", 2.5),
                                         ("feature_dim", "64")])
def test_gate_numbers_are_checked_before_any_tensor_exists(field, value):
    with pytest.raises(CheckpointError, match=field):
        ModelMeta.from_dict(_doc(gate={**GATE, field: value}), where="model.json")
    assert MAX_GATE_FEATURES >= 2048  # the widest backbone (resnet50) still fits


def test_a_million_labels_are_refused_without_building_anything():
    labels = [f"c{i}" for i in range(1_000_000)]
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=f"more than the {MAX_LABELS} allowed"):
        ModelMeta.from_dict(_doc(labels=labels, positive="c1"), where="model.json")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20  # the labels list itself, not a 10^6-class network


def test_an_onnx_model_json_with_a_nan_threshold_is_refused_at_load(tiny_exported, tmp_path):
    """The recipe of N4: model.json edited (its own sha updated) to threshold_log_odds NaN or a NaN gate threshold."""
    from covid_cxr.deploy.api import load_run

    for edit in ({"threshold_log_odds": float("nan")}, {"threshold_log_odds": float("-inf")},
                 {"gate": "nan-threshold"}):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_exported, run)
        doc = json.loads((run / "model.json").read_text())
        if edit.get("gate"):
            doc["meta"]["gate"]["threshold"] = float("nan")
        else:
            doc["meta"].update(edit)
        (run / "model.json").write_text(json.dumps(doc))  # json writes NaN / -Infinity, as the attack did
        assert hashlib.sha256((run / "model.onnx").read_bytes()).hexdigest() == doc["onnx"]["onnx_sha256"]
        with pytest.raises(CheckpointError, match="not a finite number"):
            load_run(run, backend="onnx")


def _safetensors_bytes(header_json: str) -> bytes:
    import struct

    raw = header_json.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 8


def test_a_safetensors_header_naming_a_tensor_twice_is_refused(tmp_path):
    """W8: JSON keeps the last of two equal keys silently; the header is refused instead, naming the key."""
    from covid_cxr.model.formats import read_safetensors_header

    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    ok = tmp_path / "ok.safetensors"
    ok.write_bytes(_safetensors_bytes(f'{{"head.weight":{entry},"head.bias":{entry.replace("0,4", "4,8")}}}'))
    assert set(read_safetensors_header(ok)) == {"head.weight", "head.bias"}
    twice = tmp_path / "twice.safetensors"
    twice.write_bytes(_safetensors_bytes(f'{{"head.weight":{entry},"head.weight":{entry.replace("0,4", "4,8")}}}'))
    with pytest.raises(CheckpointError, match="names 'head.weight' twice"):
        read_safetensors_header(twice)
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(_safetensors_bytes('{"__metadata__":' + "[" * 200_000 + "]" * 200_000 + "}"))
    with pytest.raises(CheckpointError, match="nested absurdly deep"):
        read_safetensors_header(deep)


def test_an_oversized_or_altered_onnx_file_costs_no_memory(tiny_exported, tmp_path):
    """N8: a 3 GB sparse model.onnx beside a valid model.json is refused from its size (nothing read); a same-size
    file with other bytes is refused by a hash computed in 1 MiB chunks; an oversized or absurdly nested model.json is
    refused before it is parsed. Peak Python allocations stay small throughout."""
    from covid_cxr.limits import MAX_MODEL_JSON_BYTES, MAX_ONNX_BYTES
    from covid_cxr.model.onnx_model import OnnxModel

    run = tmp_path / "run"
    shutil.copytree(tiny_exported, run)
    tracemalloc.start()
    with open(run / "model.onnx", "r+b") as f:
        f.truncate(3 * 2**30)  # sparse: no disk used
    with pytest.raises(CheckpointError, match=f"more than the {MAX_ONNX_BYTES:,}"):
        OnnxModel(run / "model.onnx", device="cpu")
    with open(run / "model.onnx", "r+b") as f:
        f.truncate(64 * 2**20)  # within the cap, but not the exported bytes
    with pytest.raises(CheckpointError, match="sha256 differs"):
        OnnxModel(run / "model.onnx", device="cpu")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # chunks of 1 MiB, never the file
    shutil.copy2(tiny_exported / "model.onnx", run / "model.onnx")
    OnnxModel(run / "model.onnx", device="cpu")  # the restored pair loads
    with open(run / "model.json", "ab") as f:
        f.truncate(MAX_MODEL_JSON_BYTES + 1)
    with pytest.raises(CheckpointError, match="more than the"):
        OnnxModel(run / "model.onnx", device="cpu")
    (run / "model.json").write_text('{"meta":' + "[" * 200_000 + "]" * 200_000 + ', "onnx": {}}')
    with pytest.raises(CheckpointError, match="nested too deep"):
        OnnxModel(run / "model.onnx", device="cpu")


@pytest.mark.parametrize("edit,needle", [
    ({"format": "x"}, "format must be an integer"),
    ({"threshold_log_odds": 10**400}, "threshold_log_odds"),
    ({"preprocess": [1, 2]}, "preprocess must be an object"),
    ({"labels": "normal"}, "labels must be a list of class names"),
    ({"calibration": [1]}, "calibration must be an object"),
    ({"data": "x"}, "data must be an object"),
    ({"preprocess": "mean"}, "preprocess must be an object"),
])
def test_malformed_model_metadata_is_one_line_naming_the_field(edit, needle):
    """N10: each of these ended in 'unexpected error ... this is a bug' or a raw exception from load_run."""
    with pytest.raises(CheckpointError, match=needle):
        ModelMeta.from_dict(_doc(**edit), where="model.json")


@pytest.mark.parametrize("field,value", [("mean", "abc"), ("mean", [float("nan")] * 3), ("std", [1, 1]),
                                         ("size", 10**6), ("size", "32"), ("channels", 2), ("clahe_clip", float("inf")),
                                         ("base_short_side", 10**9)])
def test_preprocessing_numbers_are_checked_at_load_not_at_predict(field, value):
    """N10: `mean: "abc"` passed the load and failed at predict; every preprocessing number is checked at load."""
    doc = _doc()
    with pytest.raises(CheckpointError, match=field):
        ModelMeta.from_dict({**doc, "preprocess": {**doc["preprocess"], field: value}}, where="model.json")


def test_a_deep_or_wrongly_typed_dataset_json_is_one_line(tmp_path, phantom_dataset):
    """N10: dataset.json nested 200,000 deep, or with labels/source roots of the wrong type."""
    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.errors import DatasetError

    for text, needle in (("[" * 200_000 + "]" * 200_000, "nested too deep"),
                         (None, "labels must be a list"), ("src", "source_roots must be an object"),
                         ("rec", "source_roots.synthetic-phantoms must hold a path")):
        ds = tmp_path / f"ds{len(list(tmp_path.iterdir()))}"
        shutil.copytree(phantom_dataset, ds, ignore=shutil.ignore_patterns("cache"))
        info = json.loads((ds / "dataset.json").read_text())
        if text is None:
            info["labels"] = {"a": 1}
        elif text == "src":
            info["source_roots"] = ["x"]
        elif text == "rec":
            info["source_roots"]["synthetic-phantoms"] = {"path": 3}
        (ds / "dataset.json").write_text(text if text and text.startswith("[") else json.dumps(info))
        with pytest.raises(DatasetError, match=needle):
            read_dataset(ds)


def test_an_onnx_runtime_failure_is_one_line(tiny_exported):
    """W7 (in part): whatever ONNX Runtime raises while running a graph (an allocation failure of an altered graph,
    a shape it refuses) is a CheckpointError naming the file, not a raw onnxruntime exception."""
    import numpy as np

    from covid_cxr.model.onnx_model import OnnxModel

    model = OnnxModel(tiny_exported / "model.onnx", device="cpu")
    with pytest.raises(CheckpointError, match="ONNX Runtime failed running model.onnx on a batch of 1"):
        model.run(np.zeros((1, 3, 5, 5), np.float32))  # ORT refuses the shape: a real ORT error, wrapped


def _graph_asking_for(src_run, run, n_floats: int) -> None:
    """W7's recipe: the exported graph with a ``ConstantOfShape([n_floats])`` branch added to its logits (times 0),
    and model.json's sha256 updated, so the pair loads and only running it asks for the memory."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shutil.copytree(src_run, run)
    model = onnx.load(str(run / "model.onnx"))
    g = model.graph
    for node in g.node:
        node.output[:] = ["w7_logits" if o == "logits" else o for o in node.output]
    g.initializer.extend([numpy_helper.from_array(np.array([n_floats], np.int64), "w7_shape"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "w7_zero")])
    g.node.extend([
        helper.make_node("ConstantOfShape", ["w7_shape"], ["w7_big"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["w7_big"], ["w7_sum"], keepdims=0),
        helper.make_node("Mul", ["w7_sum", "w7_zero"], ["w7_nothing"]),
        helper.make_node("Add", ["w7_logits", "w7_nothing"], ["logits"]),
    ])
    onnx.save(model, str(run / "model.onnx"))
    doc = json.loads((run / "model.json").read_text())
    doc["onnx"]["onnx_sha256"] = hashlib.sha256((run / "model.onnx").read_bytes()).hexdigest()
    (run / "model.json").write_text(json.dumps(doc))


def test_a_graph_asking_for_more_memory_than_the_cap_is_refused_unallocated(tiny_exported, tmp_path):
    """W7: an altered graph whose ConstantOfShape asks for 1 GiB more than ONNX Runtime may use here
    (limits.MAX_ORT_MEMORY_BYTES, 8 GiB) is refused by the capped arena before anything is allocated: one
    CheckpointError naming the file and the limit, and the process's peak RSS stays far below the request (before the
    cap, ORT allocated and filled all of it). The same graph asking for 4 MB runs: the cap refuses sizes, not graphs.
    Run in a child process, whose peak RSS is its own."""
    import subprocess
    import sys
    import textwrap

    from conftest import write_image
    from covid_cxr.limits import MAX_ORT_MEMORY_BYTES

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the child's own peak resident size")
    image = write_image(tmp_path / "x.png", seed=5, size=(64, 64))
    ask = MAX_ORT_MEMORY_BYTES + 2**30
    _graph_asking_for(tiny_exported, tmp_path / "big", ask // 4)
    _graph_asking_for(tiny_exported, tmp_path / "small", 2**20)
    script = textwrap.dedent("""
        import json, sys
        import onnxruntime as ort
        from covid_cxr.deploy.api import load_run
        from covid_cxr.errors import CheckpointError
        from covid_cxr.model import onnx_model
        out = {}
        for name in ("small", "big"):
            try:
                out[name] = load_run(sys.argv[1] + "/" + name, backend="onnx", device="cpu").predict([sys.argv[2]])[0].label
            except CheckpointError as exc:
                out[name] = "error: " + str(exc)
        out["capped"] = onnx_model._cpu_arena_capped(ort)
        # VmHWM: this program's own peak (ru_maxrss would count the forking pytest process's pages too)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        out["peak_rss"] = int(hwm.split()[1]) * 1024
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(image)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capped"] is True
    assert not out["small"].startswith("error"), out["small"]
    assert out["big"].startswith("error: model.onnx asked for more memory than ONNX Runtime may use here (8 GiB"), out
    assert "export again" in out["big"] and "\n" not in out["big"]
    # An interpreter with numpy, onnxruntime and the tiny model peaks at a few hundred MB; the request was 9 GiB.
    assert out["peak_rss"] < 2**30, out["peak_rss"]
