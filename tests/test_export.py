"""export: ONNX output equals PyTorch output, the batch axis is dynamic, the JSON carries the spec,
and broken or mismatched files are refused with CheckpointError."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from covid_cxr import predict
from covid_cxr.errors import CheckpointError
from covid_cxr.export import MIN_OPSET, OnnxModel, export_onnx, load_onnx, metadata_path
from covid_cxr.images import load_image, sha256_file
from covid_cxr.model import load_checkpoint, read_checkpoint
from covid_cxr.transforms import PreprocessSpec, preprocess

from conftest import REAL_SOURCES, make_gray, write_image

TOL = 1e-4
TEMPERATURE = 1.7
"""Not 1.0, so the test sees that the temperature travels from checkpoint to JSON to probabilities."""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """tiny_run's best.pt (with a temperature added) and its export: (checkpoint, onnx path, summary)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = read_checkpoint(tiny_run / "best.pt")
    ckpt["temperature"] = TEMPERATURE
    src = root / "calibrated.pt"
    torch.save(ckpt, src)
    out = root / "onnx" / "model.onnx"
    summary = export_onnx(src, out)
    return src, out, summary


@pytest.fixture(scope="module")
def both(exported):
    """(torch model, its meta, OnnxModel) for the same checkpoint."""
    src, out, _ = exported
    model, meta = load_checkpoint(src)
    return model, meta, load_onnx(out)


def test_export_writes_a_checked_graph_and_its_metadata(exported):
    src, out, summary = exported
    assert out.is_file() and metadata_path(out) == out.with_name("model.json") and metadata_path(out).is_file()
    assert not list(out.parent.glob(".*tmp*")), "temporary files left behind"
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    doc = json.loads(metadata_path(out).read_text())
    ckpt = read_checkpoint(src)
    assert PreprocessSpec.from_dict(doc["preprocess"]) == PreprocessSpec.from_dict(ckpt["preprocess"])
    assert doc["preprocess"] == ckpt["preprocess"]
    assert doc["labels"] == ckpt["labels"] == ["normal", "covid"]
    assert doc["threshold"] == ckpt["threshold"] and doc["temperature"] == TEMPERATURE
    assert doc["opset"] == summary["opset"] == MIN_OPSET
    assert doc["source_checkpoint"]["sha256"] == sha256_file(src)
    assert doc["source_checkpoint"]["path"] == str(src.resolve())
    assert {"covid_cxr", "torch", "onnx", "onnxruntime"} <= set(doc["versions"])
    assert doc["input"]["shape"] == ["batch", 3, 32, 32] and doc["output"]["shape"] == ["batch", 2]
    assert summary["max_abs_diff"] <= TOL and summary["image_size"] == 32


def test_meta_is_shaped_like_load_checkpoint(both, exported):
    _, meta, onnx_model = both
    for key in ("labels", "preprocess_spec", "threshold", "path"):
        assert key in onnx_model.meta
    assert onnx_model.meta["labels"] == meta["labels"]
    assert onnx_model.meta["preprocess_spec"] == meta["preprocess_spec"]
    assert onnx_model.meta["threshold"] == meta["threshold"]
    assert onnx_model.meta["temperature"] == meta["temperature"] == TEMPERATURE
    assert onnx_model.meta["path"] == str(exported[1])
    assert onnx_model.providers[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize("n", [1, 7])
def test_dynamic_batch_logits_match_torch(both, n):
    model, meta, onnx_model = both
    batch = torch.stack([preprocess(make_gray(30 + i, (40 + 3 * i, 36)), meta["preprocess_spec"]) for i in range(n)])
    with torch.inference_mode():
        expected = model(batch)
    got = onnx_model(batch)
    assert got.shape == expected.shape == (n, 2)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_probabilities_match_torch_on_synthetic_images(both):
    model, meta, onnx_model = both
    images = [make_gray(i, (40 + 5 * i, 60 - 2 * i)) for i in range(10)]
    expected = predict.predict_arrays(model, images, meta["preprocess_spec"], temperature=meta["temperature"])
    got = onnx_model.predict_arrays(images)
    assert got.shape == (10, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # the temperature is applied: untempered probabilities are different
    assert np.abs(predict.predict_arrays(model, images, meta["preprocess_spec"]) - got).max() > 1e-6


def test_onnx_model_is_a_drop_in_for_predict_images(both, tmp_path):
    model, meta, onnx_model = both
    paths = [write_image(tmp_path / f"{i}.png", 50 + i, (44, 52)) for i in range(3)]
    expected = pd.DataFrame(predict.predict_images(model, meta, paths, batch_size=2))
    got = pd.DataFrame(predict.predict_images(onnx_model, onnx_model.meta, paths, batch_size=2))
    assert list(got["path"]) == list(expected["path"])
    assert list(got["predicted_label"]) == list(expected["predicted_label"])
    np.testing.assert_allclose(got[["prob_normal", "prob_covid"]], expected[["prob_normal", "prob_covid"]], atol=TOL)


@pytest.mark.integration
def test_probabilities_match_torch_on_real_images(both, real_data):
    model, meta, onnx_model = both
    inventory = pd.read_csv(real_data / "inventory.csv", dtype=str).sort_values("relative_path")
    picked = inventory[inventory["source"].isin(REAL_SOURCES.values())].groupby("source").head(2)
    assert len(picked) == 10
    images = [load_image(real_data / rel) for rel in picked["relative_path"]]
    assert all(img.dtype == np.uint8 and img.ndim == 2 for img in images)
    expected = predict.predict_arrays(model, images, meta["preprocess_spec"], temperature=meta["temperature"])
    got = onnx_model.predict_arrays(images)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.fixture()
def copy_of_export(exported, tmp_path):
    _, out, _ = exported
    dst = tmp_path / "model.onnx"
    shutil.copy(out, dst)
    shutil.copy(metadata_path(out), metadata_path(dst))
    return dst


def test_missing_files_are_checkpoint_errors(copy_of_export, tmp_path):
    with pytest.raises(CheckpointError, match="not found.*covid-cxr export"):
        load_onnx(tmp_path / "absent.onnx")
    metadata_path(copy_of_export).unlink()
    with pytest.raises(CheckpointError, match=r"model\.json not found"):
        load_onnx(copy_of_export)


def test_corrupt_or_mismatched_files_are_checkpoint_errors(copy_of_export):
    meta_file = metadata_path(copy_of_export)
    doc = json.loads(meta_file.read_text())
    data = copy_of_export.read_bytes()

    copy_of_export.write_bytes(data[: len(data) // 3])  # truncated, metadata left as it was
    with pytest.raises(CheckpointError, match="does not match"):
        load_onnx(copy_of_export)

    copy_of_export.write_bytes(b"not an onnx graph at all")  # corrupt, with metadata that vouches for it
    meta_file.write_text(json.dumps({**doc, "onnx_sha256": hashlib.sha256(b"not an onnx graph at all").hexdigest()}))
    with pytest.raises(CheckpointError, match="ONNX Runtime cannot load"):
        OnnxModel(copy_of_export)

    meta_file.write_text("{ truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_onnx(copy_of_export)


def test_metadata_must_fit_the_graph(copy_of_export):
    meta_file = metadata_path(copy_of_export)
    doc = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**doc, "labels": ["a", "b", "c"]}))
    with pytest.raises(CheckpointError, match="3 labels"):
        load_onnx(copy_of_export)


def test_export_refuses_bad_inputs(exported, tmp_path):
    src, _, _ = exported
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=f"opset {MIN_OPSET - 1} is not supported"):
        export_onnx(src, tmp_path / "m.onnx", opset=MIN_OPSET - 1)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(src, tmp_path / "m.json")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        export_onnx(corrupt, tmp_path / "m.onnx")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("m.json"))
