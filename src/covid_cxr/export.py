"""``covid-cxr export``: the trained DenseNet-121 as ONNX, and an ONNX Runtime backend for prediction.

* :func:`export_onnx` - a checkpoint -> ``model.onnx`` (input ``image`` float32 (N, 3, S, S),
  output ``logits`` (N, K), dynamic batch axis) plus ``model.json`` beside it, which carries
  everything the graph does not: preprocessing spec, labels, threshold, temperature, versions
  and the source checkpoint's sha256.
* :class:`OnnxModel` / :func:`load_onnx` - the exported pair loaded with ONNX Runtime. It
  stands in for the PyTorch model in :mod:`covid_cxr.predict`: ``.meta`` is shaped like
  :func:`~covid_cxr.model.load_checkpoint`'s metadata, and calling it on a preprocessed batch
  returns logits, so ``predict.predict_arrays``/``predict_images`` run unchanged on it.

The graph outputs logits, not probabilities: softmax and temperature stay in
:func:`covid_cxr.predict.probabilities`, so both backends share one definition of them.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, PyTorch's
default since 2.9). The TorchScript-based exporter also handles DenseNet-121 here, but it is
deprecated and warns that it will be removed. The dynamo exporter implements opset 18 and
newer only: asked for 17 it silently falls back to 18 after a failed down-conversion, so
:func:`export_onnx` refuses opsets below :data:`MIN_OPSET` rather than write a different
opset than requested.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covid_cxr import __version__
from covid_cxr.errors import CheckpointError, CovidCxrError
from covid_cxr.images import sha256_file
from covid_cxr.model import load_checkpoint
from covid_cxr.transforms import PreprocessSpec

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET = 18
"""Lowest opset the torch.export-based exporter implements."""
DEFAULT_OPSET = 18
EXPORT_FORMAT = 1
VERIFY_ATOL = 1e-3
"""Largest allowed |ONNX Runtime - PyTorch| logit difference in the post-export check. A wrong graph
is off by O(1); fp32 kernel differences are far smaller (3.9e-7 for an untrained 224 px DenseNet-121)."""


class ExportError(CovidCxrError):
    """The model could not be exported, or the exported graph does not reproduce PyTorch."""


def metadata_path(model_path: str | Path) -> Path:
    """The JSON written beside an ONNX file: ``model.onnx`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torchvision

    return {"covid_cxr": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _trace_to_onnx(model: torch.nn.Module, size: int, opset: int):
    """ModelProto of ``model`` for (N, 3, size, size) float32 input, N dynamic."""
    # torch.export specialises a dimension whose example size is 0 or 1, so trace with N=2.
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), external_data=False, optimize=True,
                                    verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation raise many types
        raise ExportError(f"torch.onnx.export (dynamo) failed: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked for opset {opset} but the exporter wrote opset {written}")
    return proto


def _check_against_torch(model: torch.nn.Module, data: bytes, size: int) -> float:
    """Max |logit difference| between ONNX Runtime and PyTorch on a random batch of 3."""
    import onnxruntime as ort

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} != PyTorch output shape {expected.shape}")
    return float(np.abs(got - expected).max())


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export a covid-cxr checkpoint to ONNX (logits output, dynamic batch) plus its metadata JSON.

    Writes ``out`` and ``out.with_suffix(".json")``, each atomically (temp file, then rename), the
    ONNX file first; the JSON records the ONNX file's sha256, so a stale pair is caught on load.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by ``covid-cxr train``.
        out: the ONNX file to write, e.g. ``run/model.onnx``; its folder is created.
        opset: ONNX opset, at least :data:`MIN_OPSET`.

    Returns:
        A summary: ``onnx``, ``json`` (paths), ``opset``, ``input``/``output`` names and shapes,
        ``labels``, ``image_size``, ``max_abs_diff`` (ONNX Runtime vs. PyTorch logits on a random
        batch), ``onnx_sha256``, ``bytes``.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        ValueError: ``opset`` is below :data:`MIN_OPSET`.
        ExportError: the export failed, the checker rejected the graph, or ONNX Runtime's logits
            differ from PyTorch's by more than :data:`VERIFY_ATOL`.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: the torch.export-based ONNX exporter writes opset "
                         f"{MIN_OPSET} or newer (ONNX Runtime >= 1.14 reads it); pass --opset {MIN_OPSET}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: the ONNX file name must end in .onnx (its metadata goes to {out.stem}.json)")
    model, meta = load_checkpoint(checkpoint)
    spec: PreprocessSpec = meta["preprocess_spec"]
    labels = list(meta["labels"])
    log.info("exporting %s (%d px, labels %s) to %s with opset %d", checkpoint, spec.size, labels, out, opset)

    proto = _trace_to_onnx(model, spec.size, opset)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc
    data = proto.SerializeToString()
    max_diff = _check_against_torch(model, data, spec.size)
    if not max_diff <= VERIFY_ATOL:  # also catches NaN
        raise ExportError(f"ONNX Runtime logits differ from PyTorch by {max_diff:.3g} (> {VERIFY_ATOL}); "
                          "the exported graph is wrong, nothing was written")

    onnx_sha = hashlib.sha256(data).hexdigest()
    doc = {
        "format": EXPORT_FORMAT,
        "model_file": out.name,
        "onnx_sha256": onnx_sha,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", spec.channels, spec.size, spec.size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(labels)],
                   "meaning": "logits; probabilities = softmax(logits / temperature)"},
        "labels": labels,
        "preprocess": spec.to_dict(),
        "threshold": float(meta["threshold"]),
        "temperature": float(meta.get("temperature", 1.0)),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "max_abs_diff_vs_torch": max_diff,
        "versions": _export_versions(),
        "source_checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint),
                              "version": meta.get("version")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out, data)
    _atomic_write_bytes(metadata_path(out), (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    log.info("wrote %s (%d bytes) and %s; max |logit diff| vs torch %.2g", out, len(data), metadata_path(out),
             max_diff)
    return {"onnx": str(out), "json": str(metadata_path(out)), "opset": opset, "input": doc["input"],
            "output": doc["output"], "labels": labels, "image_size": spec.size, "max_abs_diff": max_diff,
            "onnx_sha256": onnx_sha, "bytes": len(data)}


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _read_metadata(path: Path) -> dict:
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} not found: an ONNX model needs the metadata JSON that "
                              f"`covid-cxr export` writes beside it; export the checkpoint again")
    try:
        doc = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_file} is not valid JSON ({exc}); export the checkpoint again") from exc
    required = ("labels", "preprocess", "threshold", "onnx_sha256")
    if not isinstance(doc, dict) or any(k not in doc for k in required):
        raise CheckpointError(f"{meta_file} is not covid-cxr ONNX metadata (needs keys {required})")
    if doc.get("format", 0) > EXPORT_FORMAT:
        raise CheckpointError(f"{meta_file} was written by a newer covid-cxr (format {doc['format']}); upgrade")
    return doc


class OnnxModel:
    """An exported model run by ONNX Runtime; a drop-in for the PyTorch model in :mod:`covid_cxr.predict`.

    Attributes:
        meta: like :func:`~covid_cxr.model.load_checkpoint`'s: ``labels``, ``preprocess_spec``
            (a :class:`PreprocessSpec`), ``preprocess`` (its dict), ``threshold``, ``temperature``,
            ``path``, plus ``opset``, ``versions``, ``source_checkpoint``.
        providers: the ONNX Runtime execution providers in use.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None, spinning: bool = False):
        """Load ``path`` (a ``.onnx`` file) and the ``.json`` beside it.

        Args:
            path: the ONNX file written by :func:`export_onnx`.
            device: ``"auto"`` (CUDA when ONNX Runtime has it, else CPU), ``"cpu"`` or ``"cuda"``.
            threads: intra-op threads for the CPU provider; default: the CPUs this process may use.
            spinning: let idle intra-op threads busy-wait for the next operator. Off by default:
                on few cores shared with other processes (the web server, PyTorch) a spinning
                thread takes the CPU from the thread everyone waits for; benchmarks/bench_infer.py
                measured 2 threads on a shared 2-core VM at ~2x lower latency without spinning,
                and no loss at 1 thread.

        Raises:
            CheckpointError: the ONNX file or its JSON is missing or corrupt, they do not belong
                together, or the graph's input/output do not match the metadata.
            ValueError: unknown ``device``, or ``cuda`` asked for but unavailable.
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model {path} not found; create it with `covid-cxr export`")
        doc = _read_metadata(path)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != doc["onnx_sha256"]:
            raise CheckpointError(f"{path} does not match {metadata_path(path).name} (sha256 differs): the "
                                  "file was changed or the pair comes from different exports; export again")
        self.providers = _providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads) if threads else _default_threads()
        options.inter_op_num_threads = 1  # one sequential chain of convolutions: nothing to run in parallel
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise CheckpointError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {exc}); "
                                  "export the checkpoint again") from exc
        try:
            spec = PreprocessSpec.from_dict(doc["preprocess"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{metadata_path(path)}: bad preprocess spec ({exc})") from exc
        self._check_signature(path, spec, len(doc["labels"]))
        self.meta: dict[str, Any] = {
            "labels": list(doc["labels"]),
            "preprocess": doc["preprocess"],
            "preprocess_spec": spec,
            "threshold": float(doc["threshold"]),
            "temperature": float(doc.get("temperature", 1.0)),
            "path": str(path),
            "opset": doc.get("opset"),
            "versions": doc.get("versions", {}),
            "source_checkpoint": doc.get("source_checkpoint", {}),
            "backend": "onnxruntime",
        }

    def _check_signature(self, path: Path, spec: PreprocessSpec, n_labels: int) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise CheckpointError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found "
                                  f"{[i.name for i in inputs]} and {[o.name for o in outputs]}")
        shape = list(inputs[0].shape[1:])
        if shape != [spec.channels, spec.size, spec.size] or outputs[0].shape[-1] != n_labels:
            raise CheckpointError(f"{path}: graph takes {inputs[0].shape} -> {outputs[0].shape}, but the metadata "
                                  f"says {spec.channels}x{spec.size}x{spec.size} images and {n_labels} labels")

    def eval(self) -> "OnnxModel":
        """No-op, for code written for ``nn.Module`` (an exported graph is always in inference mode)."""
        return self

    def __call__(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits (N, K) for a preprocessed float32 batch (N, 3, S, S), as a CPU tensor."""
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(logits)

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities (N, K) for decoded uint8 grayscale images (H, W).

        The same function as the PyTorch backend: :func:`covid_cxr.predict.predict_arrays`
        (``transforms.preprocess``, this graph, ``softmax(logits / temperature)``).
        """
        # Imported here: covid_cxr.predict imports this module for its ONNX backend.
        from covid_cxr.predict import predict_arrays

        return predict_arrays(self, images, self.meta["preprocess_spec"], "cpu", self.meta["temperature"])

    def __repr__(self) -> str:
        return f"OnnxModel({self.meta['path']!r}, providers={self.providers})"


def _providers(device: str, available: list[str]) -> list[str]:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ValueError(f"device cuda asked for, but this onnxruntime has only {available}; install "
                         "onnxruntime-gpu or use --device cpu")
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(path: str | Path, device: str = "auto", threads: int | None = None,
              spinning: bool = False) -> OnnxModel:
    """Load an exported model: a ``.onnx`` file, or a folder holding ``model.onnx`` (and its ``model.json``).

    Raises:
        CheckpointError: see :class:`OnnxModel`.
    """
    path = Path(path)
    return OnnxModel(path / "model.onnx" if path.is_dir() else path, device=device, threads=threads,
                     spinning=spinning)
