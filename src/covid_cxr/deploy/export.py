"""``covid-cxr export``: the trained model as ONNX (``model.onnx`` + ``model.json``); safetensors and
Hugging Face-style folders are written by :mod:`covid_cxr.deploy.hub`.

* The graph takes ``image`` float32 (N, C, S, S) (the output of :func:`covid_cxr.imaging.pixels.finish`) and
  returns ``logits`` (N, K) and, when the model has an out-of-scope gate, ``scope`` (N,) distances;
  the batch axis is dynamic. Softmax, temperature, threshold and the gate's threshold stay outside the
  graph, in :class:`~covid_cxr.model.meta.ModelMeta`, so both backends share one definition of them.
* ``model.json`` is the model's :class:`~covid_cxr.model.meta.ModelMeta`, serialised, plus the export details
  (file sha256, opset, versions, the source checkpoint's sha256). It is read by
  :class:`covid_cxr.model.onnx_model.OnnxModel`.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (PyTorch's default since 2.9). It implements opset 18
and newer only; asked for 17 it would silently fall back to 18, so older opsets are refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covid_cxr import __version__
from covid_cxr.deploy.options import ExportConfig
from covid_cxr.errors import CovidCxrError, ExportError
from covid_cxr.files import atomic_write, to_json
from covid_cxr.imaging.images import sha256_file
from covid_cxr.model.checkpoint import load_model
from covid_cxr.model.networks import CxrNet
from covid_cxr.model.onnx_model import (INPUT_NAME, LUNG_INPUT_NAME, ONNX_META_FORMAT, OUTPUT_LOGITS, OUTPUT_LUNGS,
                                        OUTPUT_SCOPE, OnnxModel, onnx_meta_path)
from covid_cxr.paths import locate_checkpoint

log = logging.getLogger(__name__)

MIN_OPSET = 18
"""Lowest opset the torch.export-based exporter implements."""
VERIFY_ATOL = 1e-3
"""Largest allowed |ONNX Runtime - PyTorch| difference of logits (and gate scores, relative) in the post-export
check. A wrong graph is off by O(1); fp32 kernel differences are far smaller (3.9e-7 for an untrained 224 px
DenseNet-121)."""


class _Graph(nn.Module):
    """What the ONNX graph computes: logits, and the gate's distances when the model has a gate."""

    def __init__(self, model: CxrNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, lung_x: torch.Tensor | None = None):
        logits, features = self.model(x, with_features=True)
        out = [logits]
        if self.model.gate is not None:
            out.append(self.model.gate(features, x))
        if self.model.lungs is not None:  # the segmenter's P(lung) maps; the verdict is computed from them outside
            out.append(torch.sigmoid(self.model.lungs(lung_x)))
        return out[0] if len(out) == 1 else tuple(out)


def _export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torchvision

    return {"covid_cxr": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _inputs(n: int, channels: int, size: int, lung_size: int | None, random: bool = False) -> tuple:
    """Example inputs of the graph: the image batch, and the lung batch for a model that carries a segmenter."""
    g = torch.Generator().manual_seed(0)
    make = (lambda *shape: torch.randn(*shape, generator=g)) if random else torch.zeros
    x = (make(n, channels, size, size),)
    return x + ((make(n, 1, lung_size, lung_size),) if lung_size else ())


def _to_onnx(graph: _Graph, channels: int, size: int, opset: int, outputs: list[str], lung_size: int | None = None):
    """ModelProto of ``graph`` for (N, C, size, size) float32 input (and (M, 1, L, L) lung input), N and M
    dynamic."""
    # torch.export specialises a dimension whose example size is 0 or 1, so trace with N=2.
    example = _inputs(2, channels, size, lung_size)
    names = [INPUT_NAME] + ([LUNG_INPUT_NAME] if lung_size else [])
    # each input its own batch size: a lung view feeds the lung branch alone first (one blank image beside it), and
    # an int8 graph would otherwise fix both to one size
    dims = tuple({0: torch.export.Dim(name.replace("image", "batch"), min=1, max=65536)} for name in names)
    try:
        program = torch.onnx.export(graph, example, None, dynamo=True, opset_version=opset,
                                    input_names=names, output_names=outputs, dynamic_shapes=dims,
                                    external_data=False, optimize=True, verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation raise many types
        raise ExportError(f"torch.onnx.export (dynamo) failed: {type(exc).__name__}: {exc}") from None
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked for opset {opset} but the exporter wrote opset {written}")
    return proto


def _max_differences(graph: _Graph, data: bytes, channels: int, size: int, outputs: list[str],
                     lung_size: int | None = None) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| of each output on a random batch of 3 (scope: relative)."""
    import onnxruntime as ort

    x = _inputs(3, channels, size, lung_size, random=True)
    with torch.inference_mode():
        expected = graph(*x)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [INPUT_NAME] + ([LUNG_INPUT_NAME] if lung_size else [])
    got = session.run(outputs, {n: t.numpy() for n, t in zip(names, x)})
    diffs = {}
    for name, e, g in zip(outputs, expected, got):
        e = e.numpy()
        if g.shape != e.shape:
            raise ExportError(f"ONNX output {name} has shape {g.shape}, PyTorch {e.shape}")
        scale = max(1.0, float(np.abs(e).max())) if name == OUTPUT_SCOPE else 1.0
        diffs[name] = float(np.abs(g - e).max() / scale)
    return diffs


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = MIN_OPSET) -> dict[str, Any]:
    """Export a covid-cxr checkpoint to ONNX plus its metadata JSON, after checking the graph against PyTorch.

    Writes ``out`` and ``out.with_suffix(".json")``, each atomically, the ONNX file first; the JSON records
    the ONNX file's sha256, so a stale pair is caught on load.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        ExportError: the export failed, the checker rejected the graph, or ONNX Runtime differs from PyTorch
            by more than :data:`VERIFY_ATOL` (nothing is written then).
    """
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported: the torch.export-based ONNX exporter writes opset "
                          f"{MIN_OPSET} or newer; pass --opset {MIN_OPSET}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: the ONNX file name must end in .onnx (its metadata goes to {out.stem}.json)")
    model, meta = load_model(checkpoint)
    spec = meta.preprocess
    lung_size = meta.lungs.size if meta.lungs else None
    outputs = ([OUTPUT_LOGITS] + ([OUTPUT_SCOPE] if model.gate is not None else [])
               + ([OUTPUT_LUNGS] if lung_size else []))
    log.info("exporting %s (%s, %d px, labels %s) to %s with opset %d", checkpoint, meta.arch, spec.size,
             list(meta.labels), out, opset)
    graph = _Graph(model).eval()
    proto = _to_onnx(graph, spec.channels, spec.size, opset, outputs, lung_size)
    log.info("checking the graph: onnx.checker, then ONNX Runtime against PyTorch on a random batch")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from None
    data = proto.SerializeToString()
    diffs = _max_differences(graph, data, spec.channels, spec.size, outputs, lung_size)
    if not all(d <= VERIFY_ATOL for d in diffs.values()):  # also catches NaN
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diffs} (> {VERIFY_ATOL}); the exported graph is "
                          "wrong, nothing was written")
    onnx_sha = hashlib.sha256(data).hexdigest()
    doc = {
        "format": ONNX_META_FORMAT,
        "meta": meta.to_dict(),
        "onnx": {
            "model_file": out.name, "onnx_sha256": onnx_sha,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", spec.channels, spec.size, spec.size],
                      "meaning": "covid_cxr.imaging.pixels.finish(model pixels): intensity standardisation and normalisation "
                                 "applied"},
            "outputs": {OUTPUT_LOGITS: "logits (batch, classes); probabilities = softmax(logits / temperature)",
                        **({OUTPUT_SCOPE: "out-of-scope distance (batch,); out of scope when above "
                                          "meta.gate.threshold"} if model.gate is not None else {}),
                        **({OUTPUT_LUNGS: "P(lung) per pixel (batch, L, L) of the lung input; out of scope unless "
                                          "covid_cxr.imaging.lung_masks.lung_checks finds two plausible lung fields"}
                           if lung_size else {})},
            **({"lung_input": {"name": LUNG_INPUT_NAME, "dtype": "float32", "shape": ["batch", 1, lung_size, lung_size],
                               "meaning": "covid_cxr.imaging.lung_masks.lung_input(model pixels, L): the whole image "
                                          "resized to L and standardised"}} if lung_size else {}),
            "opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "max_abs_diff_vs_torch": diffs,
            "versions": _export_versions(),
            "source_checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
        },
    }
    atomic_write(out, data)
    atomic_write(onnx_meta_path(out), to_json(doc))
    OnnxModel(out, device="cpu")  # the pair loads and its signature matches its metadata
    log.info("wrote %s (%d bytes) and %s; max difference vs torch %s", out, len(data), onnx_meta_path(out), diffs)
    return {"onnx": str(out), "json": str(onnx_meta_path(out)), "opset": opset, "outputs": outputs,
            "labels": list(meta.labels), "image_size": spec.size, "max_abs_diff": diffs, "onnx_sha256": onnx_sha,
            "bytes": len(data)}


def current_onnx(checkpoint: str | Path, out: str | Path, opset: int) -> dict[str, Any] | None:
    """The summary of ``out`` when it is a loadable export of this very checkpoint (same sha256) at ``opset``, else
    None. ``export --quantize int8`` quantises such a file as it is instead of exporting the same graph again."""
    out = Path(out)
    if not (out.is_file() and onnx_meta_path(out).is_file()):
        return None
    try:
        model = OnnxModel(out, device="cpu")
    except CovidCxrError as exc:
        log.info("not reusing %s: %s", out, exc)
        return None
    doc = model.export
    if doc.get("source_checkpoint", {}).get("sha256") != sha256_file(checkpoint) or doc.get("opset") != opset:
        return None
    spec = model.meta.preprocess
    return {"onnx": str(out), "json": str(onnx_meta_path(out)), "opset": opset, "outputs": list(model.session_outputs),
            "labels": list(model.meta.labels), "image_size": spec.size, "max_abs_diff": doc["max_abs_diff_vs_torch"],
            "onnx_sha256": doc["onnx_sha256"], "bytes": out.stat().st_size, "reused": True}


def run(cfg: ExportConfig) -> dict:
    """Export the run's checkpoint in ``cfg.format``: onnx, safetensors or hf (see :mod:`covid_cxr.deploy.hub`)."""
    from covid_cxr.deploy import hub

    run_dir, ckpt = locate_checkpoint(cfg.run, cfg.checkpoint)
    if cfg.format == "onnx" and cfg.quantize == "int8":
        from covid_cxr.deploy import quantize
        from covid_cxr.model.checkpoint import read_checkpoint

        # the dataset is read first: a moved dataset fails before anything is written
        meta = read_checkpoint(ckpt).meta
        masker = None
        if meta.preprocess.needs_lungs:  # the lung view's masks, by the segmenter the model carries
            from covid_cxr.model.inference import load_predictor

            masker = load_predictor(ckpt, "torch", "cpu").lung_masker()
        qdata = quantize.load_data(run_dir, meta, cfg.data, cfg.source_roots, cfg.calibration_images, lungs=masker)
        out = cfg.out or run_dir.onnx
        summary = current_onnx(ckpt, out, cfg.opset)
        if summary is None:
            summary = export_onnx(ckpt, out, cfg.opset)
        else:
            log.info("%s is already this checkpoint's export (opset %d): quantising it as it is", out, cfg.opset)
        return {"format": "onnx", **summary, "quantization": quantize.quantize_export(summary["onnx"], qdata,
                                                                                      cfg.max_auc_drop)}
    if cfg.format == "onnx":
        return {"format": "onnx", **export_onnx(ckpt, cfg.out or run_dir.onnx, cfg.opset)}
    if cfg.format == "safetensors":
        return hub.export_safetensors(ckpt, cfg.out or run_dir.root / hub.WEIGHTS_NAME)
    if cfg.format == "hf":
        folder = hub.prepare_folder(cfg.out or run_dir.root / "hf", cfg.overwrite)
        onnx = export_onnx(ckpt, folder / "model.onnx", cfg.opset) if cfg.hf_onnx else None
        return {**hub.export_hf(ckpt, folder, run_dir.root, onnx=onnx is not None), "onnx": onnx}
    raise ExportError(f"unknown export format {cfg.format!r}")  # pragma: no cover - the config refuses it


def _onnx_lines(summary: dict) -> list[str]:
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in summary["max_abs_diff"].items())
    verb = "kept" if summary.get("reused") else "wrote"
    return [f"{verb} {summary['onnx']} ({summary['bytes'] / 2**20:.1f} MB, opset {summary['opset']}, outputs "
            f"{', '.join(summary['outputs'])}) and {summary['json']}",
            f"checked against PyTorch on a random batch{' when it was exported' if summary.get('reused') else ''}: "
            f"max difference {diffs}"]


def format_summary(summary: dict) -> str:
    """What an export wrote, and how to use it."""
    fmt = summary.get("format", "onnx")
    if fmt == "safetensors":
        return (f"wrote {summary['safetensors']} ({summary['bytes'] / 2**20:.1f} MB, {summary['tensors']} tensors, "
                f"model description in its metadata) and {summary['json']}\n"
                f"use it with: covid_cxr.load_run({summary['safetensors']!r}) or covid-cxr predict --run "
                f"{summary['safetensors']} IMAGES...")
    if fmt == "hf":
        lines = [f"wrote {summary['folder']}/: {', '.join(summary['files'])} ({summary['bytes'] / 2**20:.1f} MB)"]
        if summary.get("onnx"):
            lines += _onnx_lines(summary["onnx"])[1:]
        lines.append("model card results: " + ("internal test split (eval-test/metrics.json)"
                                               if summary["evaluation"] == "eval-test/metrics.json"
                                               else summary["evaluation"])
                     + ("; out-of-source estimate from crossval" if summary.get("estimate") else ""))
        lines.append(f"use it with: covid_cxr.load_run({summary['folder']!r}) or covid-cxr predict --run "
                     f"{summary['folder']} IMAGES..." + (" [--backend onnx]" if summary.get("onnx") else ""))
        return "\n".join(lines)
    lines = _onnx_lines(summary) + [f"use it with: covid-cxr predict --backend onnx --run "
                                    f"{Path(summary['onnx']).parent} IMAGES..."]
    q = summary.get("quantization")
    if q:
        scope = (f"; in-scope flags agree on {100 * q['in_scope_agree']:.1f}%" if "in_scope_agree" in q else "")
        lines += [f"wrote {q['onnx']} ({q['bytes'] / 2**20:.1f} MB, int8, calibrated on {q['calibration_n']} validation "
                  f"images) and {q['json']}",
                  f"test ROC AUC int8 {q['int8_auc']:.4f} vs fp32 {q['fp32_auc']:.4f} ({q['auc_difference']:+.4f}) on "
                  f"{q['test_n']} images; decisions agree on {100 * q['decisions_agree']:.1f}%{scope}",
                  *[f"warning: {w}" for w in q.get("warnings", [])],
                  f"use it with: covid-cxr predict --backend onnx --run {q['onnx']} IMAGES..."]
    return "\n".join(lines)
