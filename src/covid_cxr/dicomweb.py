"""A small DICOMweb client: QIDO-RS search, WADO-RS retrieve (streamed to disk), STOW-RS store.

Used by ``data build --source dicomweb=URL`` (search and retrieve) and ``predict --stow URL`` (store). It speaks
plain HTTP(S) through the standard library, so it adds no dependency, and it is written for a hospital's PACS:

- **Credentials** never appear in a log line, an error or an output file. They come from the environment
  (:data:`AUTH_ENV`: ``user:password`` for HTTP Basic, or ``Bearer TOKEN``) or from the URL's ``user:password@``
  part, which is taken out of the URL before anything prints it (:func:`split_credentials`).
- **Bounded memory**: an instance is streamed to a file in chunks and cut out of its multipart envelope on disk;
  a search answer larger than :data:`covid_cxr.limits.MAX_QIDO_BYTES` and an instance larger than the caller's
  limit are refused.
- **Paging**: searches ask for :data:`PAGE` results at a time (``limit``/``offset``) until a short page.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Sequence

from covid_cxr import __version__
from covid_cxr.errors import PacsError
from covid_cxr.limits import MAX_QIDO_BYTES

log = logging.getLogger(__name__)

AUTH_ENV = "COVID_CXR_DICOMWEB_AUTH"
"""Environment variable with the PACS credentials: ``user:password`` (HTTP Basic) or ``Bearer TOKEN``."""
PAGE = 500
"""Results asked for per QIDO-RS request."""
_CHUNK = 1 << 20
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_HEAD = 64 << 10
"""How far into a multipart answer its part headers may reach."""


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without ``user:password@``, those credentials or None). Only the first is ever printed."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    creds = urllib.parse.unquote(parts.username) + (
        ":" + urllib.parse.unquote(parts.password) if parts.password is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), creds


def _auth_header(auth: str | None) -> dict[str, str]:
    if not auth:
        return {}
    if auth[:7].lower() == "bearer ":
        return {"Authorization": "Bearer " + auth[7:].strip()}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode("utf-8")).decode("ascii")}


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type or "", re.I)
    return m.group(1).strip() if m else None


@dataclass(frozen=True)
class DicomWeb:
    """One DICOMweb service (its root, e.g. ``http://pacs:8042/dicom-web``)."""

    url: str
    auth: str | None = field(default=None, repr=False)
    """``user:password`` or ``Bearer TOKEN``; default: :data:`AUTH_ENV`, else the URL's ``user:password@``."""
    timeout: float = 60.0

    def __post_init__(self) -> None:
        url, creds = split_credentials(self.url.strip())
        if not re.match(r"^https?://[^/]", url):
            raise PacsError(f"DICOMweb URL {url!r} must start with http:// or https:// and name a host, e.g. "
                            "http://pacs.example.org:8042/dicom-web")
        object.__setattr__(self, "url", url.rstrip("/"))
        object.__setattr__(self, "auth", self.auth or os.environ.get(AUTH_ENV) or creds)

    # ------------------------------------------------------------------ HTTP

    def _open(self, path: str, *, accept: str, data: bytes | None = None, content_type: str | None = None,
              method: str | None = None):
        url = f"{self.url}/{path.lstrip('/')}"
        headers = {"User-Agent": f"covid-cxr/{__version__}", "Accept": accept, **_auth_header(self.auth)}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        shown = _UID.sub("<uid>", url.split("?")[0])  # study/series/instance UIDs never reach a message
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            body = _UID.sub("<uid>", exc.read(2000).decode("utf-8", "replace").strip())
            exc.close()
            hint = {401: f"; set {AUTH_ENV} to user:password or 'Bearer TOKEN'", 403: "; the account may not read "
                    "this PACS", 404: "; check the URL's DICOMweb root (e.g. .../dicom-web)"}.get(exc.code, "")
            raise PacsError(f"{shown}: the PACS answered HTTP {exc.code} {exc.reason}{hint}"
                            + (f" ({body[:300]})" if body else "")) from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            raise PacsError(f"cannot reach the PACS at {shown}: {getattr(exc, 'reason', exc)}; check the URL and "
                            "that the server runs") from None

    # ------------------------------------------------------------------ QIDO-RS

    def search(self, path: str, params: dict[str, str] | None = None, *, max_results: int | None = None
               ) -> list[dict]:
        """QIDO-RS ``GET {url}/{path}?params``, every page; each result is a DICOM JSON object (tag -> value)."""
        found: list[dict] = []
        offset = 0
        while True:
            query = {**(params or {}), "limit": str(PAGE), "offset": str(offset)}
            with self._open(f"{path}?{urllib.parse.urlencode(query)}", accept="application/dicom+json") as resp:
                raw = resp.read(MAX_QIDO_BYTES + 1)
            if len(raw) > MAX_QIDO_BYTES:
                raise PacsError(f"{self.url}/{path}: a search answer larger than {MAX_QIDO_BYTES} bytes; narrow the "
                                "search (a date range, a study description)")
            try:
                page = json.loads(raw) if raw.strip() else []
            except ValueError:
                raise PacsError(f"{self.url}/{path}: the answer is not DICOM JSON") from None
            if not isinstance(page, list) or not all(isinstance(r, dict) for r in page):
                raise PacsError(f"{self.url}/{path}: the answer is not a list of DICOM JSON objects")
            found += page
            if max_results is not None and len(found) >= max_results:
                return found[:max_results]
            if len(page) < PAGE:
                return found
            offset += len(page)

    # ------------------------------------------------------------------ WADO-RS

    def retrieve_instance(self, study: str, series: str, instance: str, dest: Path, *, max_bytes: int) -> int:
        """WADO-RS one instance into ``dest`` (written as ``dest.part``, renamed when complete); returns its size.

        The answer (``multipart/related`` with one ``application/dicom`` part, or a bare ``application/dicom``
        body) is streamed to disk; the part is cut out of its envelope on disk, so memory stays at one chunk.
        """
        for uid in (study, series, instance):
            if not re.fullmatch(r"[0-9.]{1,64}", uid):
                raise PacsError(f"the PACS listed a malformed UID {uid[:80]!r}; it cannot be retrieved")
        part = dest.with_name(dest.name + ".part")
        raw = dest.with_name(dest.name + ".download")
        path = f"studies/{study}/series/{series}/instances/{instance}"
        with self._open(path, accept='multipart/related; type="application/dicom"; transfer-syntax=*') as resp:
            ctype = resp.headers.get("Content-Type", "")
            size = 0
            with open(raw, "wb") as f:
                while chunk := resp.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes + _HEAD:
                        f.close()
                        raw.unlink()
                        raise PacsError(f"instance {_short(instance)} is larger than {max_bytes} bytes; refused")
                    f.write(chunk)
        try:
            if ctype.lower().startswith("multipart/"):
                _extract_single_part(raw, part, _boundary(ctype), instance)
            else:
                os.replace(raw, part)
        finally:
            raw.unlink(missing_ok=True)
        os.replace(part, dest)
        return dest.stat().st_size

    # ------------------------------------------------------------------ STOW-RS

    def store(self, files: Sequence[str | Path], study: str | None = None) -> dict:
        """STOW-RS the DICOM ``files`` (to ``{url}/studies`` or ``{url}/studies/{study}``).

        Returns ``{"stored": n, "failed": n}``; raises :class:`PacsError` when any instance was refused.
        """
        if not files:
            return {"stored": 0, "failed": 0}
        boundary = f"covid-cxr-{uuid.uuid4().hex}"
        body = bytearray()
        for f in files:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
            body += Path(f).read_bytes() + b"\r\n"
        body += f"--{boundary}--\r\n".encode("ascii")
        path = f"studies/{study}" if study else "studies"
        with self._open(path, accept="application/dicom+json", data=bytes(body), method="POST",
                        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}') as resp:
            raw = resp.read(MAX_QIDO_BYTES)
        try:
            answer = json.loads(raw) if raw.strip() else {}
        except ValueError:
            answer = {}
        failed = len(_seq(answer, "00081198"))
        stored = len(_seq(answer, "00081199")) if answer else len(files)
        if failed:
            raise PacsError(f"the PACS refused {failed} of {len(files)} instance(s) sent with STOW-RS to "
                            f"{self.url}/{path}")
        return {"stored": stored, "failed": failed}


def _seq(answer: dict, tag: str) -> list:
    value = answer.get(tag, {}) if isinstance(answer, dict) else {}
    return value.get("Value", []) if isinstance(value, dict) else []


def _short(uid: str) -> str:
    return uid if len(uid) <= 24 else f"...{uid[-16:]}"


def _extract_single_part(raw: Path, out: Path, boundary: str | None, instance: str) -> None:
    """Copy the body of the first part of the multipart file ``raw`` into ``out`` (chunked)."""
    if not boundary:
        raise PacsError(f"instance {_short(instance)}: a multipart answer without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    size = raw.stat().st_size
    with open(raw, "rb") as f:
        head = f.read(_HEAD)
        first = head.find(delim)
        body_at = head.find(b"\r\n\r\n", first) if first >= 0 else -1
        if first < 0 or body_at < 0:
            raise PacsError(f"instance {_short(instance)}: malformed multipart answer (no part header)")
        start = body_at + 4
        tail_at = max(start, size - _HEAD)
        f.seek(tail_at)
        tail = f.read()
        end_rel = tail.rfind(b"\r\n" + delim)
        if end_rel < 0:
            raise PacsError(f"instance {_short(instance)}: malformed or truncated multipart answer (no closing "
                            "boundary); run again to retry it")
        end = tail_at + end_rel
        inner = head.find(b"\r\n" + delim, start)
        if tail.count(b"\r\n" + delim) > 1 or inner not in (-1, end):
            raise PacsError(f"instance {_short(instance)}: the PACS returned several parts for one instance")
        f.seek(start)
        remaining = end - start
        with open(out, "wb") as o:
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                o.write(chunk)
                remaining -= len(chunk)


def dicom_json_value(obj: dict, tag: str, default: str = "") -> str:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, as text ('' when absent); a person name
    gives its Alphabetic form."""
    v = obj.get(tag) if isinstance(obj, dict) else None
    values = v.get("Value") if isinstance(v, dict) else None
    if not values:
        return default
    first = values[0]
    if isinstance(first, dict):
        first = first.get("Alphabetic", "")
    return str(first)


__all__ = ["AUTH_ENV", "DicomWeb", "dicom_json_value", "split_credentials"]

