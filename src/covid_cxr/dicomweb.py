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
_warned: dict[str, bool] = {}
_MAX_PAGES = 100_000
_HEAD = 64 << 10
"""How far into a multipart answer its part headers may reach."""


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without ``user:password@``, those credentials or None). Only the first is ever printed.

    The credentials end at the LAST ``@`` of the URL, so a password holding ``/``, ``#``, ``?`` or ``@`` (which
    :func:`urllib.parse.urlsplit` would read as the start of the path) is still taken out whole; a DICOMweb path
    has no ``@``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, None
    creds, _, tail = rest.rpartition("@")
    user, colon, password = creds.partition(":")
    clean = urllib.parse.unquote(user) + (":" + urllib.parse.unquote(password) if colon else "")
    return f"{scheme}://{tail}", clean


def _auth_header(auth: str | None) -> dict[str, str]:
    if not auth:
        return {}
    if auth[:7].lower() == "bearer ":
        return {"Authorization": "Bearer " + auth[7:].strip()}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode("utf-8")).decode("ascii")}


def _boundary(content_type: str) -> str | None:
    """The ``boundary`` parameter of a Content-Type (quoted or not, spaces allowed), parsed as RFC 2045 says."""
    from email.message import Message

    msg = Message()
    msg["content-type"] = content_type or ""
    value = msg.get_param("boundary")
    return str(value).strip() or None if value else None


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

    def shown(self, path: str = "") -> str:
        """How a request is named in messages: the service URL and the path with every UID replaced by <uid>
        (study, series and instance UIDs never reach a message; the host's address is kept)."""
        return self.url + ("/" + _UID.sub("<uid>", path.split("?")[0].lstrip("/")) if path else "")

    def _open(self, path: str, *, accept: str, data: bytes | None = None, content_type: str | None = None,
              method: str | None = None):
        url = f"{self.url}/{path.lstrip('/')}"
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"User-Agent": f"covid-cxr/{__version__}", "Accept": accept})
        if content_type:
            req.add_header("Content-Type", content_type)
        for k, v in _auth_header(self.auth).items():
            req.add_unredirected_header(k, v)  # never forwarded to the host a redirect points at
        if self.auth and self.url.startswith("http://") and not _warned.get(self.url):
            _warned[self.url] = True
            log.warning("%s: credentials are sent over plain http (unencrypted); use https where the PACS offers it",
                        self.url)
        shown = self.shown(path)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()  # its body may echo the request's patient data: never shown
            hint = {401: f"; set {AUTH_ENV} to user:password or 'Bearer TOKEN'", 403: "; the account may not read "
                    "this PACS", 404: "; check the URL's DICOMweb root (e.g. .../dicom-web)"}.get(exc.code, "")
            raise PacsError(f"{shown}: the PACS answered HTTP {exc.code} {exc.reason}{hint}") from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            raise PacsError(f"cannot reach the PACS at {shown}: {getattr(exc, 'reason', exc)}; check the URL and "
                            "that the server runs") from None

    # ------------------------------------------------------------------ QIDO-RS

    def search(self, path: str, params: dict[str, str] | None = None, *, max_results: int | None = None
               ) -> list[dict]:
        """QIDO-RS ``GET {url}/{path}?params``, every page (until an empty page: a server may cap a page below
        :data:`PAGE`); each result is a DICOM JSON object (tag -> value). A server that ignores ``offset`` (the
        same page again) ends the search instead of looping."""
        found: list[dict] = []
        seen: set[str] = set()
        offset = 0
        for _ in range(_MAX_PAGES):
            query = {**(params or {}), "limit": str(PAGE), "offset": str(offset)}
            try:
                with self._open(f"{path}?{urllib.parse.urlencode(query)}", accept="application/dicom+json") as resp:
                    raw = resp.read(MAX_QIDO_BYTES + 1)
            except (OSError, HTTPException):
                raise PacsError(f"{self.shown(path)}: the connection broke during a search; run again") from None
            if len(raw) > MAX_QIDO_BYTES:
                raise PacsError(f"{self.shown(path)}: a search answer larger than {MAX_QIDO_BYTES} bytes; narrow the "
                                "search (a date range, a study description)")
            try:
                page = json.loads(raw) if raw.strip() else []
            except ValueError:
                raise PacsError(f"{self.shown(path)}: the answer is not DICOM JSON") from None
            if not isinstance(page, list) or not all(isinstance(r, dict) for r in page):
                raise PacsError(f"{self.shown(path)}: the answer is not a list of DICOM JSON objects")
            keys = [json.dumps(r, sort_keys=True) for r in page]
            fresh = [r for r, k in zip(page, keys) if k not in seen]
            if not fresh:
                return found
            seen.update(keys)
            found += fresh
            if max_results is not None and len(found) >= max_results:
                return found[:max_results]
            offset += len(page)
        raise PacsError(f"{self.shown(path)}: more than {_MAX_PAGES} pages of results; narrow the search")

    # ------------------------------------------------------------------ WADO-RS

    def retrieve_instance(self, study: str, series: str, instance: str, dest: Path, *, max_bytes: int) -> int:
        """WADO-RS one instance into ``dest`` (written as ``dest.part``, renamed when complete); returns its size.

        The answer (``multipart/related`` with one ``application/dicom`` part, or a bare ``application/dicom``
        body) is streamed to disk; the part is cut out of its envelope on disk, so memory stays at one chunk.
        """
        for uid in (study, series, instance):
            if not re.fullmatch(r"[0-9.]{1,64}", uid):
                raise PacsError("the PACS listed a malformed UID; that instance cannot be retrieved")
        part = dest.with_name(dest.name + ".part")
        raw = dest.with_name(dest.name + ".download")
        path = f"studies/{study}/series/{series}/instances/{instance}"
        try:
            with self._open(path, accept='multipart/related; type="application/dicom"; transfer-syntax=*') as resp:
                ctype = resp.headers.get("Content-Type", "")
                size = 0
                with open(raw, "wb") as f:
                    while chunk := resp.read(_CHUNK):
                        size += len(chunk)
                        if size > max_bytes + _HEAD:
                            raise PacsError(f"an instance larger than {max_bytes} bytes; refused")
                        f.write(chunk)
            if ctype.lower().startswith("multipart/"):
                _extract_single_part(raw, part, _boundary(ctype), instance)
            else:
                os.replace(raw, part)
            if part.stat().st_size > max_bytes:
                raise PacsError(f"an instance larger than {max_bytes} bytes; refused")
            _check_dicom(part)
            os.replace(part, dest)
        except (OSError, HTTPException) as exc:
            raise PacsError(f"{self.shown(path)}: the connection broke during the retrieve "
                            f"({type(exc).__name__}); run again to resume") from None
        finally:
            raw.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
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
                            f"{self.shown(path)}")
        return {"stored": stored, "failed": failed}


def _seq(answer: dict, tag: str) -> list:
    value = answer.get(tag, {}) if isinstance(answer, dict) else {}
    return value.get("Value", []) if isinstance(value, dict) else []


def _short(uid: str) -> str:
    return "<uid>"  # kept as a function: every message names an instance this way


def _check_dicom(path: Path) -> None:
    """A retrieved instance is a DICOM Part-10 file (``DICM`` at byte 128): an empty part, an HTML error page
    answered with 200, or a body cut short is never kept (the next run retrieves it again)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise PacsError("the PACS answered something that is not a DICOM file (empty, cut short or an error "
                        "page); run again to retry it")


def _delimiters(f, delim: bytes, start: int, most: int = 3) -> list[int]:
    """Positions (from ``start``) of ``delim`` in the open file ``f``, scanned in chunks (at most ``most``)."""
    found, pos, carry = [], start, b""
    f.seek(start)
    while len(found) < most:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        buf = carry + chunk
        base = pos - len(carry)
        i = buf.find(delim)
        while i >= 0 and len(found) < most:
            if base + i not in found:
                found.append(base + i)
            i = buf.find(delim, i + 1)
        carry = buf[-(len(delim) - 1):] if len(delim) > 1 else b""
        pos += len(chunk)
    return found


def _extract_single_part(raw: Path, out: Path, boundary: str | None, instance: str) -> None:
    """Copy the body of the only part of the multipart file ``raw`` into ``out`` (chunked; CRLF or LF line ends).
    Exactly one part is expected: an instance-level retrieve returns one instance."""
    if not boundary:
        raise PacsError(f"instance {_short(instance)}: a multipart answer without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    with open(raw, "rb") as f:
        head = f.read(_HEAD)
        first = head.find(delim)
        if first < 0:
            raise PacsError(f"instance {_short(instance)}: malformed multipart answer (no part header)")
        ends = [(head.find(sep, first), len(sep)) for sep in (b"\r\n\r\n", b"\n\n")]
        ends = [(i, n) for i, n in ends if i >= 0]
        if not ends:
            raise PacsError(f"instance {_short(instance)}: malformed multipart answer (no part header)")
        at, n = min(ends)
        start = at + n
        later = _delimiters(f, delim, start)
        if not later:
            raise PacsError(f"instance {_short(instance)}: malformed or truncated multipart answer (no closing "
                            "boundary); run again to retry it")
        f.seek(later[0] + len(delim))
        if f.read(2) != b"--":
            raise PacsError(f"instance {_short(instance)}: the PACS returned several parts for one instance")
        end = later[0]
        f.seek(end - 2)
        end -= {b"\r\n": 2}.get(f.read(2), 0) or (1 if _byte_before(f, end) == b"\n" else 0)
        f.seek(start)
        remaining = end - start
        with open(out, "wb") as o:
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                o.write(chunk)
                remaining -= len(chunk)


def _byte_before(f, pos: int) -> bytes:
    f.seek(pos - 1)
    return f.read(1)


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

