"""The FastAPI app: routes, upload handling and the bounded inference pool.

Each ``POST /v1/predict`` gets its own :class:`tempfile.TemporaryDirectory`; the upload is
streamed into it (:func:`covid_cxr.serve.uploads.receive_upload`), decoded and predicted in a
thread pool of ``workers`` threads (the event loop stays free for other requests; extra
requests queue), and the folder is removed when the request ends, whatever the outcome.
File names sent by clients are never used for paths and never logged (they may name patients).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import ServeConfig, make_config
from covid_cxr.errors import CovidCxrError, ImageReadError, UploadError
from covid_cxr.serve.engine import Engine
from covid_cxr.serve.uploads import ACCEPTED, FIELD, limit_text, receive_upload

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page loads nothing from anywhere: inline script and style, images from data:/blob: URLs."""


class ModelInfo(BaseModel):
    version: str = Field(description="covid-cxr version of this server")
    checkpoint: str = Field(description="checkpoint file name (best.pt or last.pt)")
    checkpoint_sha256: str
    backend: str = Field(description="torch or onnx")
    labels: list[str]
    positive_class: str | None = None
    threshold_text: str = Field(description="the decision rule, e.g. P(covid) >= 0.18")
    temperature: float = Field(description="softmax temperature from calibration (1.0: uncalibrated)")
    image_size: int = Field(description="model input side in pixels")
    preprocessing: str = ""
    trained_with: dict[str, str] | None = Field(None, description="versions recorded in the checkpoint")
    created: str = ""
    trained_on: dict | None = Field(None, description="task, sources (and whether any is synthetic), image counts")
    estimate: dict | None = Field(None, description="out-of-source performance estimate (from crossval), if recorded")
    out_of_scope_gate: bool = False
    onnx_file: str | None = None


class ImageInfo(BaseModel):
    width: int
    height: int


class HeatmapInfo(BaseModel):
    method: str
    target: str = Field(description="class whose evidence is shown")
    computed_with: str
    note: str


class Prediction(BaseModel):
    probabilities: dict[str, float] = Field(description="label -> probability; they sum to 1")
    label: str = Field(description="predicted label (threshold on the positive class for two classes)")
    log_odds: float | None = Field(None, description="log(P(positive) / P(other)), the unsaturated score")
    threshold: float | None = Field(description="threshold on P(positive class) (None: argmax)")
    threshold_text: str = Field(description="the decision rule in words, with the digits that matter")
    positive_class: str | None = Field(description="class the threshold applies to (None: argmax)")
    in_scope: bool | None = Field(None, description="False: the image is unlike the training images (flagged)")
    scope_score: float | None = Field(None, description="out-of-scope distance (higher: less like training)")
    scope_warning: str | None = None
    model: ModelInfo
    disclaimer: str
    image: ImageInfo
    heatmap_png_base64: str | None = Field(None, description="Grad-CAM overlay PNG, with ?heatmap=true")
    heatmap: HeatmapInfo | None = None


class Health(BaseModel):
    status: str
    model_loaded: bool
    backend: str
    version: str
    labels: list[str]
    checkpoint: str
    max_upload_mb: float
    workers: int
    disclaimer: str
    model: ModelInfo


_ERRORS = {
    400: {"description": "malformed multipart body"},
    413: {"description": "upload larger than the server's limit"},
    415: {"description": f"not multipart/form-data, or not a {ACCEPTED} file"},
    422: {"description": "no 'file' field, or an image that cannot be decoded"},
}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary", "description": f"the X-ray: {ACCEPTED}"}}}}}}}


def _page() -> str:
    try:
        return resources.files("covid_cxr.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CovidCxrError("covid_cxr/serve/static/index.html is missing from the installed package; reinstall "
                            "covid-cxr (the wheel must include package data serve/static/*.html)") from exc


async def _in_pool(pool: ThreadPoolExecutor, tmp: tempfile.TemporaryDirectory, fn, *args):
    """Run ``fn(*args)`` in ``pool``; clean ``tmp`` up when done, even if the request is cancelled meanwhile."""
    future = pool.submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        # A job already running cannot be stopped: remove its folder once it has finished with it.
        future.add_done_callback(lambda _: tmp.cleanup())
        raise


def create_app(run: str, backend: str = "torch", max_upload_mb: float = 20, workers: int = 2,
               checkpoint: str = "best", onnx_path: str | None = None, device: str = "auto") -> FastAPI:
    """Build the app; the model is loaded here, once.

    Args:
        run: run folder (or checkpoint file).
        backend: ``torch`` or ``onnx`` (``onnx_path``, default ``RUN/model.onnx``, exported if missing).
        max_upload_mb: upload limit in MB (2**20 bytes).
        workers: inference threads: images decoded and predicted at once.
        checkpoint: ``best`` or ``last``.
        onnx_path: ONNX file for the ``onnx`` backend.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: an invalid option.
        CheckpointError, ExportError: the model cannot be loaded or exported.
    """
    # the option checks, types and choices included (a direct ServeConfig(...) does not check Literal choices)
    make_config(ServeConfig, {"run": str(run), "backend": backend, "max_upload_mb": max_upload_mb, "workers": workers,
                              "checkpoint": checkpoint, "onnx_path": onnx_path, "device": device})
    page = _page()
    engine = Engine(run, backend=backend, checkpoint=checkpoint, onnx_path=onnx_path, device=device)
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="covid-cxr-infer")
    max_bytes = int(max_upload_mb * 2**20)

    app = FastAPI(title="covid-cxr", version=__version__,
                  description=f"COVID-19 chest X-ray classifier. **{DISCLAIMER}**")
    app.state.engine = engine
    app.state.pool = pool
    app.state.max_bytes = max_bytes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-store"})

    @app.get("/healthz", response_model=Health, summary="the model is loaded")
    def healthz() -> dict:
        eng = app.state.engine
        return {"status": "ok", "model_loaded": True, "backend": eng.backend, "version": __version__,
                "labels": eng.labels, "checkpoint": eng.checkpoint.name, "max_upload_mb": max_bytes / 2**20,
                "workers": int(workers), "disclaimer": DISCLAIMER, "model": eng.model_info()}

    @app.post("/v1/predict", response_model=Prediction, response_model_exclude_unset=True,
              summary="classify one chest X-ray", responses=_ERRORS, openapi_extra=_UPLOAD_BODY)
    async def predict(request: Request, heatmap: bool = False) -> dict:
        """Upload one image as multipart field ``file``: PNG, JPEG or DICOM, at most the server's limit.

        ``heatmap=true`` adds a Grad-CAM overlay (PNG, base64), computed with the PyTorch checkpoint.
        """
        start = time.perf_counter()
        tmp = tempfile.TemporaryDirectory(prefix="covid-cxr-upload-")
        handed_off = False
        try:
            upload = await receive_upload(request.headers, request.stream(), Path(tmp.name), max_bytes)
            try:
                result = await _in_pool(app.state.pool, tmp, app.state.engine.analyse, upload.path, heatmap,
                                        upload.filename)
            except asyncio.CancelledError:
                handed_off = True
                raise
        except UploadError as exc:
            log.info("refused upload: %d %s", exc.status, exc.message)
            raise HTTPException(exc.status, exc.message) from None
        except ImageReadError as exc:
            reason = exc.reason.replace(str(upload.path), "upload")  # Pillow names the file: not our paths
            log.info("undecodable %s upload (%d bytes): %s", upload.kind, upload.size, reason)
            raise HTTPException(422, f"cannot decode the uploaded {upload.kind.upper()} image: {reason}") from None
        finally:
            if not handed_off:
                tmp.cleanup()
        log.info("predicted a %s upload (%d bytes, %dx%d) as %s in %.0f ms%s", upload.kind, upload.size,
                 result["image"]["width"], result["image"]["height"], result["label"],
                 1000 * (time.perf_counter() - start), " with heatmap" if heatmap else "")
        return result

    log.info("serving %s (%s backend, %d workers, uploads up to %s). %s", engine.checkpoint, backend, workers,
             limit_text(max_bytes), DISCLAIMER)
    return app
