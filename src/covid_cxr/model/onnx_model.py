"""An exported model (``model.onnx`` + ``model.json``) run by ONNX Runtime: the file pair checked against each
other, a session set up for few shared cores, and the graph's inputs and outputs checked against the metadata.

No PyTorch: this is what ``pip install covid-cxr`` (without extras) runs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from covid_cxr.errors import CheckpointError, CovidCxrError
from covid_cxr.files import default_workers, read_json
from covid_cxr.imaging.lung_masks import cleaned_masks, lung_checks, lung_input
from covid_cxr.imaging.pixels import LUNG_BATCH, finish
from covid_cxr.limits import MAX_MODEL_JSON_BYTES, MAX_ONNX_BYTES, MAX_ORT_MEMORY_BYTES
from covid_cxr.machine import cpu_features, int8_cpu_note
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.results import Outputs

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_LOGITS = "logits"
OUTPUT_SCOPE = "scope"
LUNG_INPUT_NAME = "lung_image"
"""The second input of a model that carries a lung segmenter: (N, 1, L, L) float32,
:func:`covid_cxr.imaging.lung_masks.lung_input` of each image's model pixels."""
OUTPUT_LUNGS = "lungs"
"""(N, L, L) P(lung) per pixel, for such a model."""
ONNX_META_FORMAT = 2


def onnx_meta_path(model_path: str | Path) -> Path:
    """The JSON written beside an ONNX file: ``model.onnx`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def _read_onnx_doc(path: Path) -> dict:
    """The JSON beside ``path``, checked for its shape (``meta`` and ``onnx`` objects, an integer format)."""
    meta_file = onnx_meta_path(path)
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} not found: an ONNX model needs the metadata JSON that "
                              "`covid-cxr export` writes beside it; export the checkpoint again")
    try:
        doc = read_json(meta_file, "ONNX metadata", max_bytes=MAX_MODEL_JSON_BYTES)
    except CovidCxrError as exc:
        raise CheckpointError(f"{exc}; export the checkpoint again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict) or not isinstance(doc.get("onnx"), dict):
        raise CheckpointError(f"{meta_file} is not covid-cxr {ONNX_META_FORMAT} ONNX metadata (written by an older "
                              "covid-cxr?); export the checkpoint again with `covid-cxr export`")
    fmt = doc.get("format", 0)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise CheckpointError(f"{meta_file}: format must be an integer, got {str(fmt)[:40]!r}; export again")
    if fmt > ONNX_META_FORMAT:
        raise CheckpointError(f"{meta_file} was written by a newer covid-cxr; upgrade covid-cxr")
    return doc


def read_onnx_meta(path: Path) -> tuple[ModelMeta, dict]:
    """(the model's meta, the export details) from the JSON beside ``path``."""
    doc = _read_onnx_doc(path)
    return ModelMeta.from_dict(doc["meta"], where=str(onnx_meta_path(path))), doc["onnx"]


def _read_checked(path: Path, sha256: str | None) -> bytes:
    """The bytes of ``path`` once its size is within :data:`~covid_cxr.limits.MAX_ONNX_BYTES` and its sha256, computed
    in chunks (no more than 1 MiB in memory), equals the one recorded in its metadata."""
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes, more than the {MAX_ONNX_BYTES:,} an exported covid-cxr "
                              "model can be; it was not written by covid-cxr export: export again")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match {onnx_meta_path(path).name} (sha256 differs): the file "
                              "was changed or the pair comes from different exports; export again")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:  # changed while it was checked
        raise CheckpointError(f"{path} changed while it was being loaded; load it again")
    return data


def _providers(device: str, available: list[str]) -> list[str]:
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise CovidCxrError(f"device must be auto, cpu or cuda, got {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if str(device).startswith("cuda") and not has_cuda:
        raise CovidCxrError(f"device {device} asked for, but this onnxruntime has only {available}; install "
                            "onnxruntime-gpu or use --device cpu")
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_capped_arena: bool | None = None  # whether this process's capped CPU arena is registered (None: not tried yet)


def _cpu_arena_capped(ort) -> bool:
    """Register, once per process, the CPU arena that sessions share, capped at
    :data:`~covid_cxr.limits.MAX_ORT_MEMORY_BYTES` (ONNX Runtime's CPU arena settings are per process: an
    environment allocator). False when this onnxruntime cannot (then sessions use their own, uncapped arena)."""
    global _capped_arena
    if _capped_arena is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # extend strategy 1: grow by what is asked, not by doubling (a doubled chunk could pass the cap early)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": MAX_ORT_MEMORY_BYTES,
                                                                      "arena_extend_strategy": 1}))
            _capped_arena = True
        except Exception as exc:  # an onnxruntime without the API, or one already registered by the host program
            log.debug("ONNX Runtime CPU memory cap not set: %s", exc)
            _capped_arena = False
    return _capped_arena


def _provider_options(providers: list[str]) -> list:
    """The providers with their memory limits (CUDA: ``gpu_mem_limit`` per session)."""
    return [(p, {"gpu_mem_limit": str(MAX_ORT_MEMORY_BYTES)}) if p == "CUDAExecutionProvider" else p
            for p in providers]


class OnnxModel:
    """An exported model (``model.onnx`` + ``model.json``) run by ONNX Runtime.

    Args:
        path: the ONNX file written by ``covid-cxr export``.
        device: ``auto`` (CUDA when ONNX Runtime has it), ``cpu`` or ``cuda``.
        threads: intra-op threads on CPU; default: the CPUs this process may use.
        spinning: let idle intra-op threads busy-wait. Off by default: on few shared cores a spinning
            thread takes the CPU from the one everyone waits for (benchmarks/bench_infer.py measured ~2x
            lower latency without it on a 2-core VM).

    Raises:
        CheckpointError: missing or corrupt files, a pair that does not belong together, or a graph
            whose inputs and outputs do not match its metadata.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None, spinning: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model {path} not found; create it with `covid-cxr export --run RUN_DIR`")
        self.path = path
        doc = _read_onnx_doc(path)  # read once: meta, export details and the int8 check
        self.meta, self.export = ModelMeta.from_dict(doc["meta"], where=str(onnx_meta_path(path))), doc["onnx"]
        quantization = doc.get("quantization")
        self.quantization: dict = quantization if isinstance(quantization, dict) else {}
        data = _read_checked(path, self.export.get("onnx_sha256"))
        self.providers = _providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads) if threads else default_workers(limit=64)
        options.inter_op_num_threads = 1  # one sequential chain of convolutions: nothing to run in parallel
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
        if _cpu_arena_capped(ort):  # a graph cannot take more than MAX_ORT_MEMORY_BYTES (W7)
            options.add_session_config_entry("session.use_env_allocators", "1")
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=_provider_options(self.providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise CheckpointError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {exc}); "
                                  "export the checkpoint again") from None
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._check_signature()
        if "quantized_from" in self.export:
            note = int8_cpu_note(self.quantization.get("exported_on_cpu"), cpu_features())
            if note:
                log.warning("%s: %s", path.name, note)

    @property
    def session_outputs(self) -> list[str]:
        """The graph's output names, in order: ``logits`` and, with a gate, ``scope``."""
        return list(self._outputs)

    def _check_signature(self) -> None:
        spec, k = self.meta.preprocess, len(self.meta.labels)
        inputs = self.session.get_inputs()
        want = [OUTPUT_LOGITS] + ([OUTPUT_SCOPE] if self.meta.gate else []) + ([OUTPUT_LUNGS] if self.meta.lungs else [])
        want_in = [INPUT_NAME] + ([LUNG_INPUT_NAME] if self.meta.lungs else [])
        if [i.name for i in inputs] != want_in or self._outputs != want:
            raise CheckpointError(f"{self.path}: expected inputs {want_in} and outputs {want}, found "
                                  f"{[i.name for i in inputs]} and {self._outputs}; export again")
        if self.meta.lungs and list(inputs[1].shape[1:]) != [1, self.meta.lungs.size, self.meta.lungs.size]:
            raise CheckpointError(f"{self.path}: the lung input is {inputs[1].shape}, but its metadata says "
                                  f"{self.meta.lungs.size} px; export again")
        shape = list(inputs[0].shape[1:])
        if shape != [spec.channels, spec.size, spec.size] or self.session.get_outputs()[0].shape[-1] != k:
            raise CheckpointError(f"{self.path}: the graph takes {inputs[0].shape}, but its metadata says "
                                  f"{spec.channels}x{spec.size}x{spec.size} images and {k} labels; export again")

    def run(self, x: np.ndarray, lung_x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, K), scope (N,) or None) for a preprocessed float32 batch (N, C, S, S)."""
        out = self._run(x, lung_x)
        return out[0], (out[1] if self.meta.gate else None)

    def _run(self, x: np.ndarray, lung_x: np.ndarray | None = None) -> list[np.ndarray]:
        """Every output, in :attr:`session_outputs` order. ``lung_x``: the lung input of a model that carries a
        segmenter (zeros when not given: its lung output is then meaningless and unused)."""
        feeds = {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}
        if self.meta.lungs:  # without lung_x the lung branch is unused: one blank image (each input of a lung-view
            size = self.meta.lungs.size  # export has its own batch size; older exports get one per image)
            blank = 1 if self.meta.preprocess.needs_lungs else len(x)
            feeds[LUNG_INPUT_NAME] = (np.zeros((blank, 1, size, size), np.float32) if lung_x is None
                                      else np.ascontiguousarray(lung_x, dtype=np.float32))
        n = max(len(x), 0 if lung_x is None else len(lung_x))
        try:
            out = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types, allocation failures too
            text = str(exc)
            if "Available memory of" in text or "gpu_mem_limit" in text or "Failed to allocate" in text:
                raise CheckpointError(
                    f"{self.path.name} asked for more memory than ONNX Runtime may use here "
                    f"({MAX_ORT_MEMORY_BYTES / 2**30:.0f} GiB, covid_cxr.limits.MAX_ORT_MEMORY_BYTES) on a batch of "
                    f"{n}: a covid-cxr export at 224 px needs about 1 GiB for 32 images; use a smaller batch "
                    "(--batch-size), or this graph was altered or not exported by covid-cxr: export again") from None
            raise CheckpointError(f"ONNX Runtime failed running {self.path.name} on a batch of {n} "
                                  f"({type(exc).__name__}: {text[:200]}); a covid-cxr export runs in well under "
                                  "1 GB per image: this graph was altered or not exported by covid-cxr, export "
                                  "again") from None
        return out

    def lung_masks(self, images) -> np.ndarray:
        """(N, L, L) bool: the cleaned lung mask of each stage-1 image by the segmenter in the graph (its lung
        branch alone is fed: the image input gets one blank image)."""
        size, spec = self.meta.lungs.size, self.meta.preprocess
        blank = np.zeros((1, spec.channels, spec.size, spec.size), np.float32)
        out = []
        for start in range(0, len(images), LUNG_BATCH):
            lung_x = np.stack([lung_input(img, size) for img in images[start:start + LUNG_BATCH]])[:, None]
            probs = dict(zip(self._outputs, self._run(blank, lung_x)))[OUTPUT_LUNGS]
            out += list(cleaned_masks(probs))
        return np.stack(out) if out else np.zeros((0, size, size), bool)

    def lung_masker(self) -> "_OnnxLungMasker":
        """The graph's segmenter as a :class:`~covid_cxr.imaging.pixels.LungMasker`."""
        if not self.meta.lungs:
            raise CovidCxrError(f"{self.path.name} carries no lung segmenter")
        return _OnnxLungMasker(self)

    def forward_pixels(self, pixels: np.ndarray, batch_size: int = 32, lungs: list | None = None) -> Outputs:
        """Logits (and scope, and lung verdicts) for (N, S, S) uint8 model pixels; ``lungs``: for a lung-view model,
        the verdicts found when the pixels were made (the pixels are a crop, so the lungs are not looked for
        again)."""
        view = self.meta.preprocess.needs_lungs
        if view and lungs is not None and len(lungs) != len(pixels):
            raise ValueError(f"{len(lungs)} lung verdicts for {len(pixels)} images")
        given, lungs, logits, scopes = lungs, [], [], []
        for start in range(0, len(pixels), batch_size):
            part = pixels[start:start + batch_size]
            lung_x = (np.stack([lung_input(p, self.meta.lungs.size) for p in part])[:, None]
                      if self.meta.lungs and not view else None)
            out = dict(zip(self._outputs, self._run(finish(part, self.meta.preprocess), lung_x)))
            logits.append(out[OUTPUT_LOGITS])
            if OUTPUT_SCOPE in out:
                scopes.append(out[OUTPUT_SCOPE])
            if OUTPUT_LUNGS in out and not view:
                lungs += lung_checks(out[OUTPUT_LUNGS])
        k = len(self.meta.labels)
        return Outputs(logits=np.concatenate(logits) if logits else np.zeros((0, k), np.float32),
                       scope=(np.concatenate(scopes) if scopes else np.zeros(0, np.float32)) if self.meta.gate else None,
                       lungs=(given if view else lungs) if self.meta.lungs else None)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, providers={self.providers})"


class _OnnxLungMasker:
    """An exported model's segmenter as a :class:`~covid_cxr.imaging.pixels.LungMasker`."""

    def __init__(self, model: OnnxModel) -> None:
        self.model, self.size, self.key = model, model.meta.lungs.size, model.meta.lungs.segmenter_checksum

    def masks(self, images) -> np.ndarray:
        return self.model.lung_masks(list(images))
