"""``/docs`` without a network: Swagger UI's script, stylesheet and icon served by this app.

FastAPI's default ``/docs`` page loads Swagger UI from a CDN, so on an offline machine it is blank
(and ``/favicon.ico`` is a 404). Here the files come from the ``swagger-ui-bundle-v2`` package
(Swagger UI 5, which reads FastAPI's OpenAPI 3.1; Apache-2.0 licence, shipped in its wheel; it
installs the module ``swagger_ui_bundle``), only the four files the page needs are served (not the
bundle's demo page, which points at a public example API), Swagger UI's validator badge (a request
to a public validator) is off, and a Content-Security-Policy keeps the page to this server.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from covid_cxr.errors import CovidCxrError

log = logging.getLogger(__name__)

ASSET_PREFIX = "/docs/assets"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}
"""The files of Swagger UI the page loads, and their media types."""

DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Swagger UI's page may load from this server only (its own start-up script is inline)."""

_CACHE = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}


def swagger_ui_folder() -> Path:
    """Where the installed ``swagger-ui-bundle`` package keeps Swagger UI's files.

    Raises:
        CovidCxrError: the package (or one of the files) is missing.
    """
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError as exc:
        raise CovidCxrError("the swagger-ui-bundle-v2 package is missing, so /docs cannot be served offline; "
                            "reinstall covid-cxr (pip install -e .) or pip install swagger-ui-bundle-v2") from exc
    folder = Path(str(swagger_ui_path))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise CovidCxrError(f"{folder} lacks {', '.join(missing)}; pip install --force-reinstall swagger-ui-bundle-v2")
    version = re.fullmatch(r"swagger-ui-(\d+)\..*", folder.name)
    if version and int(version.group(1)) < 5:
        # the old swagger-ui-bundle package installs the same module with Swagger UI 4
        log.warning("%s cannot read OpenAPI 3.1: /docs will say 'Unable to render this definition'; "
                    "pip uninstall swagger-ui-bundle && pip install swagger-ui-bundle-v2", folder.name)
    return folder


def add_offline_docs(app: FastAPI, title: str) -> None:
    """Serve ``/docs`` (Swagger UI over ``app.openapi_url``), its assets and ``/favicon.ico`` from local files.

    ``app`` must be created with ``docs_url=None`` and ``redoc_url=None`` (ReDoc has no offline bundle here).
    """
    folder = swagger_ui_folder()
    page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - API docs",
                               swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css",
                               swagger_favicon_url="/favicon.ico",
                               swagger_ui_parameters={"validatorUrl": None}).body

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-store"})

    @app.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:  # a fixed list: never a path built from the request
            raise HTTPException(404, f"no such asset; /docs needs only {', '.join(ASSETS)}")
        return FileResponse(folder / name, media_type=ASSETS[name], headers=_CACHE)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(folder / "favicon-32x32.png", media_type="image/png", headers=_CACHE)
