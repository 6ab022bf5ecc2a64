"""``covid-cxr export --quantize int8``: ONNX Runtime static int8 quantisation of an exported model, checked on
the run's own test split before it is kept.

* Calibration: validation images of the run's dataset, read through :meth:`covid_cxr.data.dataset.Dataset.pixels` and
  :func:`covid_cxr.imaging.pixels.finish` - the same model pixels and the same normalisation every backend uses.
* Method: ``quant_pre_process`` (shape inference and ORT's graph clean-up; measured ~2x faster int8 graphs than
  quantising the raw export), then ``quantize_static`` in QDQ format, uint8 activations, int8 weights per output
  channel in the 7-bit range [-64, 64] (``reduce_range=True``), MinMax calibration.
* Why 7-bit weights: on x86 CPUs without VNNI (AVX2 only) ONNX Runtime's uint8 x int8 kernels sum pairs of products
  in int16 (``vpmaddubsw``), which saturates once 2 * 255 * |w| > 32767; with VNNI (AVX512_VNNI, AVX_VNNI) the sums
  go straight to int32. With |w| <= 64 no pair can saturate (2 * 255 * 64 = 32640), so every x86 CPU computes the
  same integers and the int8 model predicts the same everywhere. Measured on an AVX2-only CPU (the 1-epoch test
  run): max |int8 - fp32| logit 0.054 with full-range int8 weights (0.034 of it quantisation, the rest saturation),
  0.040 with 7-bit weights, at the same speed (1.4x ORT fp32 at batch 1 and 16, 224 px DenseNet-121, 2 threads).
  uint8 weights (no saturation either) lose most of that speed-up (1.05x), and 7-bit weights per tensor are too
  coarse (0.082, in-scope flags flip).
* The out-of-scope gate (every node that feeds ``scope`` but not ``logits``: Mahalanobis distances with inverse
  covariances, square roots, medians) is left in float32: it is a handful of small ops, and distances of order
  10-100 compared against a fixed threshold are what 8-bit rounding would move. Only the shared backbone and the
  classifier are quantised. Measured on the 1-epoch test run (24 test images): with the gate quantised too, scores
  moved by up to 0.19 (median 0.04; threshold 1.54) and 1 of 24 in-scope flags flipped; with it in float32, up to
  0.10 (median 0.009) and none flipped.
* Check: ROC AUC of the fp32 and int8 graphs on the same test images (``roc_auc`` of :mod:`covid_cxr.evaluation.metrics`);
  a drop larger than ``max_auc_drop`` refuses the int8 model and writes nothing. Kept results go to
  ``model.int8.onnx`` + ``model.int8.json`` (loadable by :class:`~covid_cxr.model.onnx_model.OnnxModel`) and a
  ``quantization`` block in both JSON files.

PyTorch is not imported here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.errors import DatasetError, ExportError
from covid_cxr.evaluation.metrics import roc_auc
from covid_cxr.files import atomic_write, read_json, to_json
from covid_cxr.imaging.pixels import finish
from covid_cxr.machine import cpu_features, describe_cpu, has_int8_dot_product
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.onnx_model import OUTPUT_LOGITS, OUTPUT_LUNGS, OUTPUT_SCOPE, OnnxModel, onnx_meta_path
from covid_cxr.paths import RunDir

log = logging.getLogger(__name__)

MAX_AUC_DROP = 0.01
"""Largest accepted fall of test-split ROC AUC from the fp32 to the int8 graph."""
CALIBRATION_BATCH = 16
METHOD = ("onnxruntime quant_pre_process + quantize_static, QDQ, uint8 activations (MinMax calibration), int8 "
          "weights per channel in 7 bits (reduce_range: no int16 saturation on CPUs without VNNI); out-of-scope gate "
          "kept in float32")
MAX_DECISION_FLIPS = 0.02
"""Share of test images whose decision may differ between the fp32 and int8 graphs before the export warns."""
WEIGHT_QMAX = 64
"""Largest |int8 weight| ``reduce_range=True`` writes: 2 * 255 * 64 < 32767, so AVX2's int16 pair sums never
saturate and CPUs with and without VNNI compute the same integers."""


def int8_path(onnx_path: str | Path) -> Path:
    """``RUN/model.onnx`` -> ``RUN/model.int8.onnx`` (its metadata: ``model.int8.json``)."""
    return Path(onnx_path).with_suffix(".int8.onnx")


@dataclass
class QuantData:
    """Model pixels (N, S, S) uint8 for calibration (validation) and for the check (test)."""

    calibration: np.ndarray
    test: np.ndarray
    targets: np.ndarray
    dataset: str
    validation_total: int
    test_lungs: list | None = None
    """With a lung-view model, the test images' lung verdicts (their pixels are the lung view)."""


def load_data(run: RunDir, meta: ModelMeta, data: str | None = None, source_roots=(),
              calibration_images: int = 256, workers: int | None = None, lungs=None) -> QuantData:
    """The validation (calibration, up to ``calibration_images`` spread evenly) and test pixels of the run's dataset.
    ``lungs``: the model's segmenter (:class:`~covid_cxr.imaging.pixels.LungMasker`), for a lung-view model.

    Raises:
        DatasetError: no dataset, other labels, an empty split, or images not where the dataset says (the message
            names ``--data`` / ``--source-root``).
    """
    from covid_cxr.data.dataset import read_dataset

    try:
        ds = read_dataset(run.dataset(data), source_roots)
        if tuple(ds.labels) != tuple(meta.labels):
            raise DatasetError(f"{ds.dir.root} has labels {ds.labels} but the model predicts {list(meta.labels)}; "
                               "pass --data with a dataset of the same task")
        val, test = ds.rows("val"), ds.rows("test")
        for name, rows in (("val", val), ("test", test)):
            if rows.empty:
                raise DatasetError(f"{ds.dir.manifest} has no {name!r} images of the task")
        n = min(calibration_images, len(val))
        picked = val.iloc[np.unique(np.linspace(0, len(val) - 1, n).round().astype(int))]
        calib = ds.pixels(picked, meta.preprocess, workers=workers, lungs=lungs)
        test_px, test_lungs = ds.pixels_and_lungs(test, meta.preprocess, workers=workers, lungs=lungs)
    except DatasetError as exc:
        raise DatasetError(f"--quantize int8 calibrates on the validation images and checks on the test images of "
                           f"the run's dataset: {exc}") from None
    return QuantData(calib, test_px, ds.targets(test), str(ds.dir.root), len(val), test_lungs)


class _PixelReader:
    """Calibration batches: model pixels through :func:`covid_cxr.imaging.pixels.finish`, as inference feeds them."""

    def __init__(self, pixels: np.ndarray, spec, input_name: str, lung_input: tuple[str, int] | None = None):
        self.pixels, self.spec, self.input_name, self.lung_input = pixels, spec, input_name, lung_input
        self.start = 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.pixels):
            return None
        batch = self.pixels[self.start:self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        feeds = {self.input_name: np.ascontiguousarray(finish(batch, self.spec), dtype=np.float32)}
        if self.lung_input:  # the segmenter's nodes stay float32 (lung_only_nodes): blank lung images suffice
            name, size = self.lung_input
            feeds[name] = np.zeros((len(batch), 1, size, size), np.float32)
        return feeds

    def rewind(self) -> None:
        self.start = 0


def gate_only_nodes(model) -> list[str]:
    """Names of the nodes that feed ``scope`` but not ``logits`` (the gate's own arithmetic)."""
    return _only_nodes(model, OUTPUT_SCOPE)


def lung_only_nodes(model) -> list[str]:
    """Names of the nodes that feed ``lungs`` but not ``logits`` (the segmenter a model carries): they stay float32,
    so the int8 graph finds the same lung fields, and crops the same lung view, as the fp32 one."""
    return _only_nodes(model, OUTPUT_LUNGS)


def _only_nodes(model, output: str) -> list[str]:
    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(node.input)
        return seen

    outputs = [o.name for o in model.graph.output]
    if output not in outputs:
        return []
    logits = ancestors(OUTPUT_LOGITS)
    return sorted(ancestors(output) - logits)


class _AxisNoise(logging.Filter):
    """Drops ORT's one warning per BatchNormalization layer that its rank-1 scale cannot be quantised per channel
    (it is quantised per tensor instead; DenseNet-121 has 121 such layers)."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and "is out-of-range for weight" in record.getMessage():
            self.dropped += 1
            return False
        return True


def quantize_model(fp32: Path, out: Path, pixels: np.ndarray, spec, keep_gate_fp32: bool = True) -> dict[str, Any]:
    """Write the int8 graph of ``fp32`` to ``out``, calibrated on ``pixels`` (model pixels, uint8).

    Returns:
        ``{"excluded_nodes": n}``: how many gate nodes stayed float32.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(_PixelReader, CalibrationDataReader):
        pass

    noise = _AxisNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    with tempfile.TemporaryDirectory(prefix="covid-cxr-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            # ONNX's own shape inference suffices for a CNN; the symbolic one fails on the gate's Unsqueeze nodes
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            model = onnx.load(str(pre))
            exclude = (gate_only_nodes(model) if keep_gate_fp32 else []) + lung_only_nodes(model)
            input_name = model.graph.input[0].name
            lung_input = None
            if len(model.graph.input) > 1:  # a model that carries a segmenter: (N, 1, L, L)
                lung = model.graph.input[1]
                lung_input = (lung.name, int(lung.type.tensor_type.shape.dim[2].dim_value))
            quantize_static(str(pre), str(out), Reader(pixels, spec, input_name, lung_input),
                            quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        except Exception as exc:  # onnxruntime.quantization raises many types
            raise ExportError(f"ONNX Runtime quantisation of {fp32} failed: {type(exc).__name__}: {exc}") from None
        finally:
            root.removeFilter(noise)
    if noise.dropped:
        log.debug("%d BatchNormalization scales quantised per tensor (ORT warns once per layer)", noise.dropped)
    return {"excluded_nodes": len(exclude)}


def _compare(fp32: OnnxModel, int8: OnnxModel, qd: QuantData) -> dict[str, Any]:
    meta = fp32.meta
    a = fp32.forward_pixels(qd.test, CALIBRATION_BATCH, lungs=qd.test_lungs)
    b = int8.forward_pixels(qd.test, CALIBRATION_BATCH, lungs=qd.test_lungs)
    lp_a, lp_b = meta.log_probs(a.logits), meta.log_probs(b.logits)
    auc_a, auc_b = roc_auc(qd.targets, lp_a, meta.positive_index), roc_auc(qd.targets, lp_b, meta.positive_index)
    block: dict[str, Any] = {
        "fp32_auc": auc_a, "int8_auc": auc_b, "auc_difference": auc_b - auc_a, "test_n": int(len(qd.test)),
        "decisions_agree": float(np.mean(meta.decide(lp_a) == meta.decide(lp_b))),
        "max_abs_probability_difference": float(np.abs(np.exp(lp_a) - np.exp(lp_b)).max()),
    }
    if a.scope is not None and meta.gate is not None:
        t = meta.gate.threshold
        block["in_scope_agree"] = float(np.mean((a.scope <= t) == (b.scope <= t)))
        block["max_scope_relative_difference"] = float(np.max(np.abs(a.scope - b.scope) / np.maximum(1.0, np.abs(a.scope))))
    if meta.lungs is not None:  # the int8 graph's own segmenter, fed the same images as the fp32 graph's
        from covid_cxr.imaging.lung_masks import check_lungs

        ma, mb = fp32.lung_masks(list(qd.test)), int8.lung_masks(list(qd.test))
        block["lung_masks_identical"] = float(np.mean([np.array_equal(x, y) for x, y in zip(ma, mb)]))
        block["lung_fields_agree"] = float(np.mean([check_lungs(x) == check_lungs(y) for x, y in zip(ma, mb)]))
    return block


def flip_warnings(block: dict[str, Any]) -> list[str]:
    """A warning when more than :data:`MAX_DECISION_FLIPS` of the test images change decision (or in-scope flag)
    between the fp32 and the int8 graph."""
    out = []
    for key, what in (("decisions_agree", "decide differently"), ("in_scope_agree", "flag scope differently")):
        flips = 1.0 - block.get(key, 1.0)
        if flips > MAX_DECISION_FLIPS:
            out.append(f"int8 and fp32 {what} on {100 * flips:.1f}% of {block['test_n']} test images (more than "
                       f"{100 * MAX_DECISION_FLIPS:.0f}%): compare both on your own images before serving the int8 "
                       "model")
    return out


def quantize_export(onnx_path: str | Path, qd: QuantData, max_auc_drop: float = MAX_AUC_DROP,
                    keep_gate_fp32: bool = True) -> dict[str, Any]:
    """Quantise an exported ``model.onnx``, check it on the test split and write ``model.int8.onnx`` + its JSON.

    Raises:
        ExportError: the int8 AUC is more than ``max_auc_drop`` below fp32 (or cannot be measured); nothing is
            written then, and an older ``model.int8.*`` beside it is removed (it no longer matches ``model.onnx``).
    """
    onnx_path = Path(onnx_path)
    out = int8_path(onnx_path)
    fp32 = OnnxModel(onnx_path, device="cpu")
    with tempfile.TemporaryDirectory(prefix="covid-cxr-int8-") as tmp:
        trial = Path(tmp) / out.name
        log.info("quantising %s on %d validation images", onnx_path, len(qd.calibration))
        details = quantize_model(onnx_path, trial, qd.calibration, fp32.meta.preprocess, keep_gate_fp32)
        data = trial.read_bytes()
        doc = read_json(onnx_meta_path(onnx_path), "ONNX metadata")
        block = {"method": METHOD, "file": out.name, "calibration_split": "val", "calibration_n": len(qd.calibration),
                 "validation_n": qd.validation_total, "test_split": "test", "dataset": qd.dataset,
                 "max_auc_drop": max_auc_drop, "gate_nodes_kept_fp32": details["excluded_nodes"],
                 "exported_on_cpu": {"name": describe_cpu(), **cpu_features()}}
        int8_doc = {**doc, "onnx": {**doc["onnx"], "model_file": out.name,
                                    "onnx_sha256": hashlib.sha256(data).hexdigest(), "max_abs_diff_vs_torch": None,
                                    "quantized_from": {"file": onnx_path.name,
                                                       "sha256": doc["onnx"]["onnx_sha256"]}}}
        atomic_write(onnx_meta_path(trial), to_json({**int8_doc, "quantization": block}))
        int8 = OnnxModel(trial, device="cpu")
        block.update(_compare(fp32, int8, qd))
    for warning in flip_warnings(block):
        block.setdefault("warnings", []).append(warning)
        log.warning("%s", warning)
    drop = block["fp32_auc"] - block["int8_auc"]
    if not (drop <= max_auc_drop):  # also NaN
        for stale in (out, onnx_meta_path(out)):
            stale.unlink(missing_ok=True)
        if "quantization" in doc:  # the block of an earlier int8 model, removed just now
            atomic_write(onnx_meta_path(onnx_path), to_json({k: v for k, v in doc.items() if k != "quantization"}))
        if math.isnan(drop):
            raise ExportError(f"int8 check: the test split's ROC AUC cannot be measured (fp32 {block['fp32_auc']}, "
                              f"int8 {block['int8_auc']}; a class is missing from {block['test_n']} test images); "
                              "the int8 model was not written")
        raise ExportError(f"int8 quantisation costs too much: test ROC AUC {block['int8_auc']:.4f} (int8) vs "
                          f"{block['fp32_auc']:.4f} (fp32) on {block['test_n']} images, a drop of {drop:.4f} > "
                          f"{max_auc_drop}; the int8 model was not written ({onnx_path.name} is kept)")
    atomic_write(out, data)
    atomic_write(onnx_meta_path(out), to_json({**int8_doc, "quantization": block}))
    atomic_write(onnx_meta_path(onnx_path), to_json({**doc, "quantization": block}))
    OnnxModel(out, device="cpu")
    log.info("wrote %s (%d bytes): test AUC %.4f int8 vs %.4f fp32", out, len(data), block["int8_auc"],
             block["fp32_auc"])
    dot = has_int8_dot_product(cpu_features())
    if dot is False:
        log.info("this CPU has no VNNI or AMX: expect int8 to run about 1.1-1.4x faster than fp32 ONNX Runtime here "
                 "(benchmarks/bench_infer.py measures it); on a CPU with VNNI it gains more, and predicts the same")
    elif dot:
        log.info("this CPU has VNNI or AMX: expect int8 to run about 1.5x faster than fp32 ONNX Runtime here "
                 "(measured 1.48-1.57x on 2 cores; benchmarks/bench_infer.py measures it); on a CPU without VNNI it "
                 "gains less (1.1-1.4x), and predicts the same")
    return {**block, "onnx": str(out), "json": str(onnx_meta_path(out)), "bytes": len(data)}
