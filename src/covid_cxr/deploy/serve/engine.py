"""The model behind the web app: loaded once, shared by concurrent requests.

:class:`Engine` predicts with the same :class:`~covid_cxr.model.inference.Predictor` as ``covid-cxr predict``
(either backend) and explains with :func:`covid_cxr.model.gradcam.explain_array`.

Thread safety: a forward pass in inference mode does not change the model, so several threads may
predict with one model at once. Grad-CAM does change it while it runs (it attaches forward hooks and
needs gradients), so heatmaps use their own copy of the PyTorch model, one at a time under a lock.
With the ONNX backend the heatmap comes from the PyTorch checkpoint the graph was exported from
(checked by sha256), loaded on the first heatmap request: a graph has no gradients to take, and
serving without heatmaps never imports PyTorch.

Heatmaps are bounded: the overlay is drawn at most :data:`covid_cxr.model.gradcam.MAX_OVERLAY_SIDE` px on
its longer side, images more elongated than :data:`covid_cxr.model.gradcam.MAX_ASPECT` are refused before
any work (HTTP 422 saying why), and the PNG is shrunk until it fits :data:`HEATMAP_MAX_BYTES`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import io
import logging
import math
import re
import tempfile
import threading
from pathlib import Path

from PIL import Image

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.errors import CheckpointError, ImageReadError, UploadError
from covid_cxr.imaging.images import load_image, sha256_file
from covid_cxr.model.inference import BACKENDS, Predictor, load_predictor
from covid_cxr.model.onnx_model import read_onnx_meta
from covid_cxr.paths import locate_checkpoint

log = logging.getLogger(__name__)


def ensure_onnx(checkpoint: Path, onnx_path: str | Path | None, scratch: list[tempfile.TemporaryDirectory]) -> Path:
    """The ONNX file to serve for ``checkpoint``, exporting it when there is none.

    ``onnx_path`` given: exported there if missing; an existing file must come from ``checkpoint``.
    Not given: ``<checkpoint folder>/model.onnx``, exported there if missing; if that file comes from another
    checkpoint (or the folder is read-only), a fresh export goes to a temporary folder kept for the life of
    the app (appended to ``scratch``), and the run folder is left alone.

    Raises:
        CheckpointError: an explicit ``onnx_path`` was exported from a different checkpoint.
        ExportError: the export failed.
    """
    explicit = onnx_path is not None
    target = Path(onnx_path) if explicit else checkpoint.parent / "model.onnx"
    if target.is_file():
        try:
            source = read_onnx_meta(target)[1].get("source_checkpoint", {}).get("sha256")
        except CheckpointError:
            source = None
        want = sha256_file(checkpoint)
        if source == want:
            return target
        if explicit:
            raise CheckpointError(f"{target} was exported from another checkpoint (sha256 {source}, not {want} of "
                                  f"{checkpoint}); export {checkpoint} again with `covid-cxr export` or pass the "
                                  "matching --run/--checkpoint")
        log.warning("%s was exported from another checkpoint than %s; exporting to a temporary folder instead",
                    target, checkpoint)
    else:
        from covid_cxr.deploy.export import export_onnx

        try:
            log.info("no ONNX model at %s: exporting %s (once)", target, checkpoint)
            export_onnx(checkpoint, target)
            return target
        except OSError as exc:
            if explicit:
                raise
            log.warning("cannot write %s (%s); exporting to a temporary folder instead", target, exc)
    from covid_cxr.deploy.export import export_onnx

    scratch.append(tempfile.TemporaryDirectory(prefix="covid-cxr-onnx-"))
    target = Path(scratch[-1].name) / "model.onnx"
    export_onnx(checkpoint, target)
    return target


@functools.lru_cache(maxsize=1)
def _libc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def release_heap() -> None:
    """Hand freed heap pages back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    A heatmap allocates tens of MB (Grad-CAM activations, a matplotlib figure) in many small blocks; glibc keeps
    freed blocks in its arenas, so without this a busy server's resident memory ratchets up with every heatmap
    (the soak in benchmarks/bench_http.py measured +20% in two minutes). It takes up to tens of milliseconds,
    against the hundreds a heatmap takes.
    """
    trim = _libc_trim()
    if trim is not None:
        trim(0)


HEATMAP_MAX_BYTES = 2 * 2**20
"""Largest heatmap PNG a response carries (before base64); larger overlays are shrunk to fit."""


def fit_png(png: bytes, max_bytes: int = HEATMAP_MAX_BYTES) -> tuple[bytes, bool]:
    """``png`` shrunk (aspect kept) until it takes at most ``max_bytes``; and whether it was shrunk."""
    shrunk = False
    while len(png) > max_bytes:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as img:
            scale = min(0.9, 0.95 * math.sqrt(max_bytes / len(png)))
            small = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))),
                               Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "PNG", optimize=True)
        png, shrunk = buf.getvalue(), True
    return png, shrunk


_UNCHECKED = {"apps": 0, "before": None}
_UNCHECKED_LOCK = threading.Lock()


@contextlib.contextmanager
def dicom_values_unchecked():
    """While an app runs, pydicom does not validate element values as it reads them.

    pydicom's default (``WARN``) reports an invalid value by logging and warning *with the value*: a patient's
    name, a date, or - in a damaged file - pixel bytes would reach the server's log. The server only needs the
    pixel elements, which the decoder checks anyway. The setting is process-wide: it is counted, so several apps
    in one process (tests) overlap safely, and the previous mode comes back when the last one stops. Without
    pydicom (a lean ``[serve]`` install) there is nothing to set: DICOM uploads are refused with a hint.
    """
    try:
        from pydicom import config
    except ImportError:
        yield
        return

    with _UNCHECKED_LOCK:
        if _UNCHECKED["apps"] == 0:
            _UNCHECKED["before"] = config.settings.reading_validation_mode
            config.settings.reading_validation_mode = config.IGNORE
        _UNCHECKED["apps"] += 1
    try:
        yield
    finally:
        with _UNCHECKED_LOCK:
            _UNCHECKED["apps"] -= 1
            if _UNCHECKED["apps"] == 0:
                config.settings.reading_validation_mode = _UNCHECKED["before"]


def decode_upload(path: Path):
    """:func:`~covid_cxr.imaging.images.load_image` for a file a client sent: any failure is an :class:`ImageReadError`.

    An exception other than ImageReadError is a decoder bug (a parser that lets a library error through):
    the client still gets a 422, and the log gets one line with the exception type and where it was raised,
    never its message (it may quote the file's bytes).
    """
    try:
        return load_image(path)
    except ImageReadError:
        raise
    except Exception as exc:  # untrusted bytes: no decoder failure may become a 500
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else "?"
        log.warning("decoder bug: a %s upload raised %s at %s instead of ImageReadError (please report it)",
                    path.suffix.lstrip(".") or "file", type(exc).__name__, where)
        raise ImageReadError(path, f"the decoder failed ({type(exc).__name__})") from None


def _caption_name(filename: str) -> str:
    """A client's file name made safe for a Matplotlib title ('$' starts math mode there)."""
    return re.sub(r"[^\w.\- ()]+", "_", filename)[:80] or "upload"


class Engine:
    """A loaded model plus everything a response reports about it.

    Args:
        run: run folder or checkpoint file.
        backend: ``torch`` or ``onnx``.
        checkpoint: ``best`` or ``last`` (for a run folder).
        onnx_path: ONNX file for the ``onnx`` backend (see :func:`ensure_onnx`).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        onnx_threads: intra-op threads for ONNX Runtime on CPU (None: all CPUs this process may use).

    Raises:
        CheckpointError, RunError, ExportError: the model cannot be loaded.
    """

    def __init__(self, run: str | Path, backend: str = "torch", checkpoint: str = "best",
                 onnx_path: str | Path | None = None, device: str = "auto", onnx_threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._scratch: list[tempfile.TemporaryDirectory] = []
        self.run_dir, self.checkpoint = locate_checkpoint(run, checkpoint)
        self.checkpoint_sha256 = sha256_file(self.checkpoint)
        if backend == "onnx":
            onnx_file = ensure_onnx(self.checkpoint, onnx_path, self._scratch)
            self.predictor: Predictor = load_predictor(onnx_file, "onnx", device, threads=onnx_threads)
        else:
            self.predictor = load_predictor(self.checkpoint, "torch", device)
        self.meta = self.predictor.meta
        self.labels: list[str] = list(self.meta.labels)
        self._cam_model = None
        self._cam_lock = threading.Lock()

    @property
    def positive_class(self) -> str | None:
        """The class the threshold applies to (None: argmax over K classes)."""
        return self.meta.positive if self.meta.binary else None

    def model_info(self) -> dict:
        """What a response says about the model (including what it was trained on)."""
        meta = self.meta
        info = {"version": __version__, "checkpoint": self.checkpoint.name,
                "checkpoint_sha256": self.checkpoint_sha256, "backend": self.backend, "labels": self.labels,
                "positive_class": meta.positive, "threshold_text": meta.threshold_text(),
                "temperature": meta.temperature, "image_size": meta.preprocess.size,
                "preprocessing": meta.preprocess.describe(), "trained_with": meta.versions, "created": meta.created,
                "trained_on": meta.data.to_dict() if meta.data else None, "estimate": meta.estimate,
                "out_of_scope_gate": meta.gate is not None}
        if self.backend == "onnx":
            info["onnx_file"] = self.predictor.source.name
        return info

    def _cam(self):
        with self._cam_lock:
            if self._cam_model is None:
                model = self.predictor.torch_model()
                self._cam_model = copy.deepcopy(model) if self.backend == "torch" else model
            return self._cam_model

    @property
    def report(self) -> Path:
        """Where the run's HTML report is (``covid-cxr report`` writes it; it may not exist)."""
        return self.run_dir.report

    @staticmethod
    def check_heatmap(image) -> None:
        """Refuse (422, saying why) an image no heatmap is drawn for, before any work is done on it."""
        from covid_cxr.model.gradcam import check_aspect

        try:
            check_aspect(image, "upload")
        except ImageReadError as exc:
            raise UploadError(422, f"no heatmap for this image: {exc.reason}; or ask without heatmap=true for the "
                                   "prediction alone") from None

    def heatmap(self, image, filename: str = "", in_scope: bool | None = None) -> dict:
        """Grad-CAM overlay PNG (base64, at most :data:`HEATMAP_MAX_BYTES`) and what it shows, from the PyTorch
        checkpoint."""
        from covid_cxr.model.gradcam import CAVEAT, caption_for, explain_array, overlay_png

        self.check_heatmap(image)
        model = self._cam()
        with self._cam_lock:
            r = explain_array(model, self.meta, image, None, path="upload")
        buf = io.BytesIO()
        overlay_png(r["display"], r["heatmap"], buf, caption_for(_caption_name(filename), self.meta, r["log_probs"],
                                                                 r["target"], in_scope))
        png, shrunk = fit_png(buf.getvalue())
        target = self.labels[r["target"]]
        del r, buf  # the display image, heatmap and figure buffer: freed before the heap is trimmed
        release_heap()
        source = "the PyTorch checkpoint" + (" the ONNX graph was exported from (a graph has no gradients)"
                                             if self.backend == "onnx" else "")
        note = CAVEAT + (" The overlay was shrunk to fit the response size limit." if shrunk else "")
        return {"heatmap_png_base64": base64.b64encode(png).decode("ascii"),
                "heatmap": {"method": "Grad-CAM", "target": target, "computed_with": source,
                            "note": note}}

    def analyse(self, path: Path, heatmap: bool = False, filename: str = "") -> dict:
        """Decode an image file and answer as ``POST /v1/predict`` does.

        Raises:
            ImageReadError: the file cannot be decoded.
            UploadError: 422, a heatmap was asked for an image with an absurd aspect ratio.
        """
        image = decode_upload(path)
        if heatmap:
            self.check_heatmap(image)
        res = self.predictor.predict_arrays([image])[0]
        result = {"probabilities": res["probabilities"], "label": res["label"], "log_odds": res["log_odds"],
                  "threshold": self.meta.threshold if self.meta.binary else None,
                  "threshold_text": self.meta.threshold_text(), "positive_class": self.positive_class,
                  "in_scope": res["in_scope"], "scope_score": res["scope_score"],
                  "explanation": res["explanation"], "threshold_reason": self.meta.threshold_reason(),
                  "model": self.model_info(), "disclaimer": DISCLAIMER,
                  "image": {"width": int(image.shape[1]), "height": int(image.shape[0])}}
        if res["in_scope"] is False:
            result["scope_warning"] = ("this image is unlike the frontal chest X-rays the model was trained on; its "
                                       "output is not meaningful")
        if heatmap:
            result.update(self.heatmap(image, filename, res["in_scope"]))
        return result
