"""``covid-cxr serve``: the model behind an HTTP API and a one-page web app. Research use only.

* ``POST /v1/predict`` - multipart field ``file`` (PNG, JPEG, WebP or DICOM) -> probabilities, label,
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
import errno
import ipaddress
import logging
import os
import socket

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


def free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` now (0: a port the system picks), checked before the model loads.

    Raises:
        ConfigError: the port is taken, not allowed, or the host is not an address of this machine.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address this machine can serve on ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's
        try:                                                          # lingering connections do not count
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use (another covid-cxr serve?); choose "
                                  "another with --port N, or --port 0 for any free port") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} needs administrator rights on this machine; use a port above "
                                  "1023, e.g. --port 8000") from None
            raise ConfigError(f"cannot serve on {host}:{port} ({exc.strerror or exc})") from None
        return probe.getsockname()[1]


def check_exposure(cfg: ServeConfig) -> None:
    """Refuse to serve beyond this machine without an API key, unless the user says so with --insecure-public.

    Raises:
        ConfigError: a non-loopback --host, no key, no --insecure-public.
    """
    if not _is_loopback(cfg.host) and cfg.api_key is None and not cfg.insecure_public:
        raise ConfigError(f"--host {cfg.host} serves beyond this machine, and no API key is set: anyone who reaches "
                          f"it could use the model. Set {API_KEY_ENV} (or --api-key), or pass --insecure-public if "
                          "the network is yours alone")


def uvicorn_options(cfg: ServeConfig) -> dict:
    """How uvicorn serves the app: proxy headers (X-Forwarded-For) only from --trust-proxy, never by default
    (uvicorn's own default trusts them from 127.0.0.1, so any local client could pose as many)."""
    return {"host": cfg.host, "port": cfg.port, "log_level": "info", "proxy_headers": cfg.trust_proxy is not None,
            "forwarded_allow_ips": cfg.trust_proxy or "",
            # a backstop under the app's own limits: connections beyond it get uvicorn's 503 (health checks keep room)
            "limit_concurrency": 2 * cfg.max_uploads + 32}


def run(cfg: ServeConfig) -> None:
    """Load the model and serve the app with uvicorn until interrupted (Ctrl-C). The port is checked first, so a
    taken port is said at once instead of after the model has loaded."""
    import uvicorn

    from covid_cxr.deploy.serve.app import create_app

    cfg = with_env_key(cfg)
    check_exposure(cfg)
    port = free_port(cfg.host, cfg.port)
    if port != cfg.port:
        log.info("--port 0: serving on port %d", port)
    cfg = dataclasses.replace(cfg, port=port)
    app = create_app(cfg)
    if not _is_loopback(cfg.host):
        log.warning("serving on %s, beyond this machine: the app has no TLS (put it behind a proxy that adds it)%s. "
                    "Research use only, not a diagnostic device.", cfg.host,
                    "" if cfg.api_key else " and no API key (set COVID_CXR_API_KEY or --api-key)")
    uvicorn.run(app, **uvicorn_options(cfg))
