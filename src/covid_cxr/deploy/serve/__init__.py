"""``covid-cxr serve``: the model behind an HTTP API and a one-page web app. Research use only.

* ``POST /v1/predict`` - multipart field ``file`` (PNG, JPEG or DICOM) -> probabilities, label,
  threshold, model and image details, the disclaimer; ``?heatmap=true`` adds a Grad-CAM overlay.
  With ``--api-key`` (or ``COVID_CXR_API_KEY``) it needs ``Authorization: Bearer KEY`` or ``X-API-Key``.
* ``GET /healthz`` - the model is loaded; backend, version, limits and the model's provenance.
* ``GET /`` - a self-contained page (no external resources) to drop an X-ray on.
* ``GET /report`` - the run's HTML report, when ``covid-cxr report`` has written one.
* ``GET /docs`` - Swagger UI over ``/openapi.json``, served from local files (works offline).

:func:`create_app` builds the app (model loaded once); :func:`run` serves it with uvicorn.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os

from covid_cxr.deploy.options import ServeConfig
from covid_cxr.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):
    # create_app is imported on first use: importing this package (for ServeConfig) stays cheap.
    if name == "create_app":
        from covid_cxr.deploy.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


API_KEY_ENV = "COVID_CXR_API_KEY"
"""The environment variable that gives the API key when ``--api-key`` is not set (a flag shows in ``ps``)."""


def with_env_key(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with its API key taken from :data:`API_KEY_ENV` when ``--api-key`` is not given.

    Raises:
        ConfigError: the variable holds an unusable key.
    """
    key = os.environ.get(API_KEY_ENV, "").strip()
    if cfg.api_key is not None or not key:
        return cfg
    try:
        return dataclasses.replace(cfg, api_key=key)
    except ConfigError as exc:
        raise ConfigError(f"{API_KEY_ENV}: {exc}".replace("--api-key ", "the key ")) from None


def run(cfg: ServeConfig) -> None:
    """Load the model and serve the app with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    from covid_cxr.deploy.serve.app import create_app

    cfg = with_env_key(cfg)
    app = create_app(cfg)
    if not _is_loopback(cfg.host):
        log.warning("serving on %s, beyond this machine: the app has no TLS (put it behind a proxy that adds it)%s. "
                    "Research use only, not a diagnostic device.", cfg.host,
                    "" if cfg.api_key else " and no API key (set COVID_CXR_API_KEY or --api-key)")
    # A backstop under the app's own limits: connections beyond it get uvicorn's 503 (health checks keep room).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", limit_concurrency=2 * cfg.max_uploads + 32)
