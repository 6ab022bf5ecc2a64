"""Receiving one uploaded image: a streaming multipart reader with a hard size limit, and content sniffing.

Starlette's own form parser spools every part into a temporary file in the system temp
folder before the endpoint runs, however large it is. :func:`receive_upload` instead feeds
the request body to python-multipart chunk by chunk, writes only the ``file`` field, and only
into the folder it is given (the request's :class:`tempfile.TemporaryDirectory`), and stops
reading as soon as the limit is passed, or when the client sends nothing for ``idle_timeout``
seconds or has not finished within ``upload_timeout`` seconds (HTTP 408: a client trickling
bytes holds a socket, a file handle and a temporary folder).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from covid_cxr.errors import UploadError
from covid_cxr.imaging.images import ACCEPTED as _KINDS
from covid_cxr.imaging.images import SNIFF_BYTES, sniff_bytes

log = logging.getLogger(__name__)

FIELD = "file"
"""The multipart field that carries the image."""
MAX_PARTS = 16
"""Most multipart fields a request may have (the page sends one): more are refused with HTTP 400 as they arrive."""

MULTIPART_OVERHEAD = 64 * 1024
"""Bytes a request body may carry beyond the file limit: boundaries, part headers, small fields."""

SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
"""Sniffed kind -> the ending the upload is stored under (so :func:`covid_cxr.imaging.images.load_image`
takes the right decoder; the client's file name is never used for a path)."""

ACCEPTED = f"{_KINDS} (DICOM: Part 10, with the 'DICM' marker at byte 128)"


@dataclass(frozen=True)
class Upload:
    """An uploaded image stored in the request's temporary folder."""

    path: Path
    """Where the bytes are, named ``upload.<png|jpg|dcm>`` after the sniffed kind."""
    kind: str
    """``png``, ``jpeg`` or ``dicom``."""
    size: int
    """Bytes."""
    filename: str
    """The name the client gave (for display only; may be empty)."""


def limit_text(max_bytes: int) -> str:
    """The limit as people read it: ``20 MB (20,971,520 bytes)``."""
    return f"{max_bytes / 2**20:.3g} MB ({max_bytes:,} bytes)"


def too_large(max_bytes: int) -> UploadError:
    return UploadError(413, f"the upload is larger than the {limit_text(max_bytes)} limit of this server; "
                            "send a smaller file (downscale or compress the image)")


class _FilePartWriter:
    """python-multipart callbacks that write field :data:`FIELD` to ``dest`` and drop every other part."""

    def __init__(self, dest: Path, max_bytes: int):
        self.dest = dest
        self.max_bytes = max_bytes
        self.size = 0
        self.filename = ""
        self.head = b""
        self.found = False
        self.parts = 0
        self._out: BinaryIO | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._disposition = b""
        self.parts += 1
        if self.parts > MAX_PARTS:  # each part costs parser work: 300,000 empty fields stalled the server
            raise UploadError(400, f"the request has more than {MAX_PARTS} multipart fields; send the image alone, "
                                   f"as multipart field '{FIELD}'")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]  # python-multipart refuses a part header over its own maximum

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != FIELD.encode():
            return
        if self.found:
            raise UploadError(422, f"send exactly one '{FIELD}' field; this request has several")
        self.found = True
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self._out = open(self.dest, "wb")  # noqa: SIM115 - closed in _part_end or close()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is None:
            return  # another field: not kept
        self.size += end - start
        if self.size > self.max_bytes:
            raise too_large(self.max_bytes)
        if len(self.head) < SNIFF_BYTES:
            self.head += data[start:min(end, start + SNIFF_BYTES - len(self.head))]
        self._out.write(data[start:end])

    def _part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def _timed(body: AsyncIterator[bytes], idle_timeout: float | None,
                 upload_timeout: float | None) -> AsyncIterator[bytes]:
    """``body``'s chunks, or 408 once no chunk came for ``idle_timeout`` s or ``upload_timeout`` s have passed."""
    loop = asyncio.get_running_loop()
    end = None if upload_timeout is None else loop.time() + upload_timeout
    chunks = body.__aiter__()
    while True:
        wait, total = idle_timeout, False
        if end is not None:
            left = end - loop.time()
            if wait is None or left < wait:
                wait, total = max(left, 0.0), True
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if total:
                raise UploadError(408, f"the upload took longer than this server's {upload_timeout:g} s limit; "
                                       "send the file in one go (or a smaller file)") from None
            raise UploadError(408, f"the upload stalled: nothing arrived for {idle_timeout:g} s; send the file "
                                   "in one go") from None
        yield chunk


DISCARD_BYTES = 8 * 2**20
"""Bytes of a refused request's body read and dropped before the refusal is sent (see :func:`discard_body`)."""
DISCARD_SECONDS = 1.0
"""Seconds spent at most reading and dropping a refused request's body."""


async def discard_body(body: AsyncIterator[bytes], max_bytes: int = DISCARD_BYTES,
                       seconds: float = DISCARD_SECONDS) -> bool:
    """Read and drop what is left of a refused request's body; True when it was read to its end.

    A server that answers without reading the body and closes the socket makes the kernel reset the
    connection, and a client still sending often sees the reset instead of the answer (a 503 or 413
    it could act on). Reading what arrives within ``seconds`` (at most ``max_bytes``) into nothing
    avoids that for ordinary clients, holds no file, and bounds what a slow client can cost.
    """
    received = 0
    try:
        async for chunk in _timed(body, None, seconds):
            received += len(chunk)
            if received > max_bytes:
                return False
        return True
    except UploadError:  # the time is up
        return False
    except Exception as exc:  # noqa: BLE001 - a client gone (Starlette's ClientDisconnect) or a broken stream
        log.debug("stopped discarding a refused body: %s", type(exc).__name__)
        return False


async def receive_upload(headers: Mapping[str, str], body: AsyncIterator[bytes], folder: Path,
                         max_bytes: int, idle_timeout: float | None = None,
                         upload_timeout: float | None = None) -> Upload:
    """Stream a ``multipart/form-data`` body into ``folder`` and check that field ``file`` is an image.

    Args:
        headers: the request headers (a mapping with lower-case keys, e.g. Starlette's ``Headers``).
        body: the request body in chunks (``request.stream()``).
        folder: where the file goes (the request's temporary folder); nothing is written elsewhere.
        max_bytes: largest accepted file; the body may be at most :data:`MULTIPART_OVERHEAD` longer.
        idle_timeout: seconds the body may send nothing (None: no limit).
        upload_timeout: seconds the whole body may take (None: no limit).

    Returns:
        The stored :class:`Upload`.

    Raises:
        UploadError: 413 (too large; raised as soon as the limit is passed, before the rest of the
            body is read), 415 (not multipart, or not a PNG/JPEG/WebP/DICOM file), 400 (malformed
            multipart), 408 (stalled or too slow; see above) or 422 (no ``file`` field, several, or an
            empty one). A client that disconnects raises the body iterator's own error (Starlette's
            ``ClientDisconnect``).
    """
    content_type = headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, f"send the image as multipart/form-data in a field named '{FIELD}' "
                               f"(e.g. curl -F {FIELD}=@image.png URL); got Content-Type {content_type!r}")
    max_body = max_bytes + MULTIPART_OVERHEAD
    declared = headers.get("content-length")
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses (found by fuzzing: a 500)
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_body:
        raise too_large(max_bytes)  # refuse before reading any of it

    raw = folder / "upload.bin"
    writer = _FilePartWriter(raw, max_bytes)
    parser = MultipartParser(params[b"boundary"], writer.callbacks())
    received = 0
    try:
        async for chunk in _timed(body, idle_timeout, upload_timeout):
            received += len(chunk)
            if received > max_body:
                raise too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        # The parser's own message quotes body bytes: those stay out of the answer and the logs.
        raise UploadError(400, "malformed multipart/form-data body (boundaries or part headers are broken); send "
                               f"the image as multipart field '{FIELD}', e.g. curl -F {FIELD}=@image.png URL"
                          ) from None
    finally:
        writer.close()

    if not writer.found:
        raise UploadError(422, f"the request has no '{FIELD}' field; send the image as multipart field '{FIELD}'")
    if writer.size == 0:
        raise UploadError(422, f"the '{FIELD}' field is empty")
    image_kind = sniff_bytes(writer.head)
    if image_kind is None:
        raise UploadError(415, f"the upload is not a {ACCEPTED} file (its first bytes match none of them)")
    path = raw.rename(folder / f"upload{SUFFIXES[image_kind]}")
    return Upload(path=path, kind=image_kind, size=writer.size, filename=writer.filename)
