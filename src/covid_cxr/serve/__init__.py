"""``covid-cxr serve``: the model behind an HTTP API and a one-page web app. Research use only.

* ``POST /v1/predict`` - multipart field ``file`` (PNG, JPEG or DICOM) -> probabilities, label,
  threshold, model and image details, the disclaimer; ``?heatmap=true`` adds a Grad-CAM overlay.
* ``GET /healthz`` - the model is loaded; backend and version.
* ``GET /`` - a self-contained page (no external resources) to drop an X-ray on.
* ``GET /docs`` - FastAPI's OpenAPI UI (its script comes from a CDN; offline, use ``/openapi.json``).

:func:`create_app` builds the app (model loaded once); :func:`run` serves it with uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging

from covid_cxr.config import ServeConfig

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):
    # create_app is imported on first use: importing this package (for ServeConfig) stays cheap.
    if name == "create_app":
        from covid_cxr.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(cfg: ServeConfig) -> None:
    """Load the model and serve the app with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    from covid_cxr.serve.app import create_app

    app = create_app(cfg.run, backend=cfg.backend, max_upload_mb=cfg.max_upload_mb, workers=cfg.workers,
                      checkpoint=cfg.checkpoint, onnx_path=cfg.onnx_path, device=cfg.device)
    if not _is_loopback(cfg.host):
        log.warning("serving on %s: the app has no authentication or TLS; put it behind a proxy that adds them. "
                    "Research use only, not a diagnostic device.", cfg.host)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
