"""The FastAPI app: routes, the checks before an upload is read, upload handling and the bounded inference pools.

A ``POST /v1/predict`` passes, in order: the per-client rate limit (429), the API key (401), the
admission limits (503: at most ``max_uploads`` requests at once, of which at most ``max_heatmaps``
with a heatmap), then its upload is streamed into its own :class:`tempfile.TemporaryDirectory`
(:func:`covid_cxr.deploy.serve.uploads.receive_upload`; 408 when the client stalls or trickles), decoded and
predicted in a pool of ``concurrency`` threads (the event loop stays free for other requests; extra
requests queue). Requests with a heatmap run in a one-thread pool of their own, so Grad-CAM never
holds up plain predictions. The folder is removed when the request ends, whatever the outcome.

What is logged: one line per request (kind of file, size, dimensions, outcome, time) and one line per
refusal. Never image bytes, DICOM tags, client file names (they may name patients) or API keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import make_config
from covid_cxr.deploy.options import ServeConfig
from covid_cxr.deploy.serve.docs import add_offline_docs
from covid_cxr.deploy.serve.engine import Engine, dicom_values_unchecked
from covid_cxr.deploy.serve.guards import CLOSE, KEY_HEADER, ApiKey, RateLimiter, Slots
from covid_cxr.deploy.serve.uploads import ACCEPTED, FIELD, discard_body, limit_text, receive_upload
from covid_cxr.errors import CovidCxrError, ImageReadError, UploadError

log = logging.getLogger(__name__)

PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page loads nothing from anywhere: inline script and style, images from data:/blob: URLs."""

REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
"""The run's report is one self-contained HTML file: inline style, images as data: URLs, no script."""


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
    explanation: str = Field(description="the decision in one sentence: P(positive) against the threshold and how "
                                         "the threshold was chosen; 'out of scope: ...' first when flagged")
    threshold_reason: str = Field(description="how the threshold was chosen, e.g. 'set to catch 95 % of covid "
                                              "cases on validation'")
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
    concurrency: int = Field(description="predictions running at once")
    max_uploads: int = Field(description="prediction requests admitted at once (more: 503)")
    max_heatmaps: int = Field(description="requests with a heatmap admitted at once (more: 503)")
    api_key_required: bool = Field(description="POST /v1/predict needs Authorization: Bearer KEY or X-API-Key")
    rate_limit_per_minute: int | None = Field(description="requests a minute per client address (None: no limit)")
    report_url: str | None = Field(description="the run's HTML report, when `covid-cxr report` has written it")
    disclaimer: str
    model: ModelInfo


_ERRORS = {
    400: {"description": "malformed multipart body"},
    401: {"description": "the server needs an API key and the request has none, or a wrong one"},
    408: {"description": "the upload stalled or took longer than the server's limit"},
    413: {"description": "upload larger than the server's limit"},
    415: {"description": f"not multipart/form-data, or not a {ACCEPTED} file"},
    422: {"description": "no 'file' field, an image that cannot be decoded, or no heatmap for its shape"},
    429: {"description": "too many requests from this address (see Retry-After)"},
    503: {"description": "the server is busy (see Retry-After)"},
}
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary", "description": f"the X-ray: {ACCEPTED}"}}}}}}}


def _page() -> str:
    try:
        return resources.files("covid_cxr.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CovidCxrError("covid_cxr/deploy/serve/static/index.html is missing from the installed package; reinstall "
                            "covid-cxr (the wheel must include package data deploy/serve/static/*.html)") from exc


async def _in_pool(pool: ThreadPoolExecutor, tmp: tempfile.TemporaryDirectory, fn, *args):
    """Run ``fn(*args)`` in ``pool``; clean ``tmp`` up when done, even if the request is cancelled meanwhile."""
    future = pool.submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        # A job already running cannot be stopped: remove its folder once it has finished with it.
        future.add_done_callback(lambda _: tmp.cleanup())
        raise


def _config(run: str | Path | ServeConfig, options: dict) -> ServeConfig:
    # make_config checks types and choices too (a direct ServeConfig(...) does not check types)
    base = run.to_dict() if isinstance(run, ServeConfig) else {"run": str(run)}
    return make_config(ServeConfig, {**base, **options})


async def _refusal(body, exc: HTTPException) -> HTTPException:
    """``exc`` after the rest of the request body was read and dropped (:func:`discard_body`); the connection
    is closed after the answer only when the body could not be read to its end."""
    headers = dict(exc.headers or {})
    if await discard_body(body):
        headers.pop("Connection", None)
    else:
        headers.update(CLOSE)
    return HTTPException(exc.status_code, exc.detail, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Our error shape (``{"detail": "text"}``) for bad query parameters too, not FastAPI's list of dicts."""
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


def create_app(run: str | Path | ServeConfig, **options) -> FastAPI:
    """Build the app; the model is loaded here, once.

    Args:
        run: run folder (or checkpoint file), or a whole :class:`~covid_cxr.deploy.options.ServeConfig`.
        **options: any other :class:`~covid_cxr.deploy.options.ServeConfig` field (``backend``, ``concurrency``,
            ``max_upload_mb``, ``max_uploads``, ``max_heatmaps``, ``idle_timeout``, ``upload_timeout``,
            ``api_key``, ``rate_limit``, ``checkpoint``, ``onnx_path``, ``device``); ``host`` and ``port``
            are :func:`covid_cxr.deploy.serve.run`'s.

    Raises:
        ConfigError: an invalid option.
        CheckpointError, ExportError: the model cannot be loaded or exported.
        CovidCxrError: the web page or Swagger UI's files are missing from the installation.
    """
    cfg = _config(run, options)
    page = _page()
    engine = Engine(cfg.run, backend=cfg.backend, checkpoint=cfg.checkpoint, onnx_path=cfg.onnx_path,
                    device=cfg.device)
    max_bytes = int(cfg.max_upload_mb * 2**20)
    # python-multipart's parse warnings quote body bytes; our own one-line 400 says what went wrong without them.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with dicom_values_unchecked():
            yield

    app = FastAPI(title="covid-cxr", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  swagger_ui_oauth2_redirect_url=None,
                  description=f"COVID-19 chest X-ray classifier. **{DISCLAIMER}**")
    app.add_exception_handler(RequestValidationError, _validation_error)
    add_offline_docs(app, "covid-cxr")
    app.state.config = cfg
    app.state.engine = engine
    app.state.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="covid-cxr-infer")
    app.state.heatmap_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covid-cxr-heatmap")
    app.state.max_bytes = max_bytes
    app.state.uploads = Slots(cfg.max_uploads, "uploads")
    app.state.heatmaps = Slots(cfg.max_heatmaps, "heatmap requests", retry_after_s=5)
    app.state.limiter = RateLimiter(cfg.rate_limit) if cfg.rate_limit else None
    app.state.api_key = ApiKey(cfg.api_key) if cfg.api_key else None
    # In the OpenAPI schema (and Swagger UI's Authorize button) only when a key is required; checked below.
    security = [Security(HTTPBearer(auto_error=False, description="the server's API key")),
                Security(APIKeyHeader(name=KEY_HEADER, auto_error=False))] if cfg.api_key else []

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-store"})

    @app.get("/report", response_class=HTMLResponse, summary="the run's HTML report (when it has one)",
             responses={404: {"description": "the run has no report.html"},
                        401: {"description": "the server has an API key and the request did not carry it"}},
             dependencies=security)
    def report(request: Request) -> FileResponse:
        # It shows training radiographs and local paths: behind the key like predictions
        if app.state.api_key is not None:
            app.state.api_key.check(request.headers)
        if not engine.report.is_file():
            raise HTTPException(404, "this model's run has no report.html; write one with "
                                     "`covid-cxr report --run RUN`")
        return FileResponse(engine.report, media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-store"})

    @app.get("/healthz", response_model=Health, summary="the model is loaded")
    def healthz() -> dict:
        return {"status": "ok", "model_loaded": True, "backend": engine.backend, "version": __version__,
                "labels": engine.labels, "checkpoint": engine.checkpoint.name, "max_upload_mb": max_bytes / 2**20,
                "concurrency": cfg.concurrency, "max_uploads": cfg.max_uploads, "max_heatmaps": cfg.max_heatmaps,
                "api_key_required": cfg.api_key is not None, "rate_limit_per_minute": cfg.rate_limit or None,
                "report_url": "/report" if engine.report.is_file() else None, "disclaimer": DISCLAIMER,
                "model": engine.model_info()}

    @app.post("/v1/predict", response_model=Prediction, response_model_exclude_unset=True,
              summary="classify one chest X-ray", responses=_ERRORS, openapi_extra=_UPLOAD_BODY,
              dependencies=security)
    async def predict(request: Request, heatmap: bool = False) -> dict:
        """Upload one image as multipart field ``file``: PNG, JPEG, WebP or DICOM, at most the server's limit.

        ``heatmap=true`` adds a Grad-CAM overlay (PNG, base64), computed with the PyTorch checkpoint.
        """
        start = time.perf_counter()
        body = request.stream()
        try:
            if app.state.limiter is not None:
                app.state.limiter.check(request.client.host if request.client else "unknown")
            if app.state.api_key is not None:
                app.state.api_key.check(request.headers)
            app.state.uploads.take()
        except HTTPException as exc:
            log.info("refused a request: %d %s", exc.status_code, exc.detail.split(";")[0])
            raise await _refusal(body, exc) from None
        try:
            if heatmap:
                try:
                    app.state.heatmaps.take()
                except HTTPException as exc:
                    log.info("refused a heatmap request: %d (%d at once)", exc.status_code, cfg.max_heatmaps)
                    raise await _refusal(body, exc) from None
                try:
                    return await _predict(request, body, heatmap, start)
                finally:
                    app.state.heatmaps.release()
            return await _predict(request, body, heatmap, start)
        finally:
            app.state.uploads.release()

    async def _predict(request: Request, body, heatmap: bool, start: float) -> dict:
        tmp = tempfile.TemporaryDirectory(prefix="covid-cxr-upload-")
        handed_off = False
        try:
            try:
                upload = await receive_upload(request.headers, body, Path(tmp.name), max_bytes,
                                              cfg.idle_timeout, cfg.upload_timeout)
            except UploadError as exc:
                log.info("refused upload: %d %s", exc.status, exc.message.split(";")[0])
                refusal = HTTPException(exc.status, exc.message, headers=CLOSE)
                if exc.status == 408:  # a slow client: answer and close at once
                    raise refusal from None
                raise await _refusal(body, refusal) from None
            except ClientDisconnect:
                log.info("client disconnected during the upload; nothing was kept")
                raise HTTPException(400, "client disconnected") from None
            pool = app.state.heatmap_pool if heatmap else app.state.pool
            try:
                result = await _in_pool(pool, tmp, engine.analyse, upload.path, heatmap, upload.filename)
            except asyncio.CancelledError:
                handed_off = True
                raise
        except UploadError as exc:  # from the engine: no heatmap for this image
            log.info("refused a %s upload (%d bytes): %d %s", upload.kind, upload.size, exc.status,
                     exc.message.split(";")[0])
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

    log.info("serving %s (%s backend, %d predictions at once, %d uploads, uploads up to %s%s%s). %s",
             engine.checkpoint, cfg.backend, cfg.concurrency, cfg.max_uploads, limit_text(max_bytes),
             ", API key required" if cfg.api_key else "",
             f", {cfg.rate_limit} requests a minute per client" if cfg.rate_limit else "", DISCLAIMER)
    return app
