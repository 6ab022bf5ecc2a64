"""A real PACS for tests: Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on free local ports.

The ``orthanc`` fixture (registered in conftest.py) starts one ``/usr/sbin/Orthanc`` per test session (per xdist
worker) with a temporary configuration, storage and index, the DICOMweb plugin enabled, and permissive DICOM
settings (any calling AET may C-ECHO/C-STORE/C-FIND; the called AET is not checked). ``fresh_orthanc`` is the same
server, emptied before the test. ``run_orthanc`` starts a private one (e.g. with other configuration keys).

HTTP goes through the standard library only, never through a proxy. When Orthanc or its DICOMweb plugin is not
installed, the fixtures skip with the apt command that installs them.

Orthanc 1.10.1 has no bind-address option: it listens on every interface (HTTP answers loopback clients only,
``RemoteAccessAllowed: false``; the DICOM port accepts anyone). It holds synthetic studies only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ORTHANC_BIN = Path(os.environ.get("COVID_CXR_ORTHANC", "/usr/sbin/Orthanc"))
"""The Orthanc server binary (Debian's ``orthanc`` package); ``$COVID_CXR_ORTHANC`` overrides it."""
DICOMWEB_PLUGIN = Path(os.environ.get("COVID_CXR_ORTHANC_DICOMWEB",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
"""Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb`` package); ``$COVID_CXR_ORTHANC_DICOMWEB`` overrides it."""
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb; .ci/run installs them"
DEFAULT_AET = "ORTHANC"
START_TIMEOUT = 30.0
"""Seconds Orthanc gets to answer ``GET /system``."""
_PORT_IN_USE = "privileged or already in use"
"""Orthanc's log line when its HTTP or DICOM port is taken (checked with 1.10.1): the start is retried."""

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never $http_proxy for 127.0.0.1


class OrthancError(RuntimeError):
    """Orthanc answered an HTTP error, or did not start."""


def missing_reason(binary: Path = ORTHANC_BIN, plugin: Path = DICOMWEB_PLUGIN) -> str | None:
    """Why Orthanc cannot be started here (a skip reason naming the Debian packages), or None."""
    missing = [str(p) for p in (binary, plugin) if not p.is_file()]
    if not missing:
        return None
    return f"Orthanc not installed ({', '.join(missing)} missing): {INSTALL_HINT}"


@dataclass(frozen=True)
class Response:
    """An HTTP answer: status, headers (names lower-cased) and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Orthanc:
    """A running Orthanc: where it listens and a few REST helpers (Orthanc's own API, not DICOMweb)."""

    url: str
    """``http://127.0.0.1:PORT``"""
    dicom_port: int
    aet: str
    workdir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def dicomweb(self) -> str:
        """Root of the DICOMweb API (QIDO-RS, WADO-RS, STOW-RS), without a trailing slash."""
        return self.url + "/dicom-web"

    def request(self, method: str, path: str, body: bytes | None = None, *, content_type: str | None = None,
                accept: str | None = None, timeout: float = 30.0) -> Response:
        """One HTTP request to ``url + path`` (or to ``path`` when it is a full URL).

        Raises:
            OrthancError: For an HTTP error status, with Orthanc's description of the error.
        """
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        full = path if path.startswith("http") else self.url + path
        req = urllib.request.Request(full, data=body, method=method, headers=headers)
        try:
            with _opener.open(req, timeout=timeout) as resp:
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:2000].decode("utf-8", "replace")
            raise OrthancError(f"{method} {full} -> HTTP {e.code}: {detail}") from None

    def get_json(self, path: str, **kwargs):
        return self.request("GET", path, accept=kwargs.pop("accept", "application/json"), **kwargs).json()

    def upload(self, dicom: Path | str | bytes) -> str:
        """Store one DICOM file (a path or its bytes) through ``POST /instances``; returns Orthanc's instance id.

        An instance already stored (same SOPInstanceUID) is not replaced; its id is returned."""
        data = dicom if isinstance(dicom, bytes) else Path(dicom).read_bytes()
        answer = self.request("POST", "/instances", data, content_type="application/dicom").json()
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload refused: {answer}")
        return answer["ID"]

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return self.get_json("/instances")

    def instance_tags(self, instance_id: str) -> dict:
        """``{keyword: value}`` of one instance (``/instances/{id}/simplified-tags``)."""
        return self.get_json(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        return self.request("GET", f"/instances/{instance_id}/file", accept="application/dicom").body

    def add_modality(self, name: str, aet: str, host: str = "127.0.0.1", port: int = 104) -> None:
        """Declare a remote DICOM node (e.g. a test's C-STORE listener) under ``name``."""
        spec = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        self.request("PUT", f"/modalities/{urllib.parse.quote(name)}", spec, content_type="application/json")

    def modalities(self) -> list[str]:
        return self.get_json("/modalities")

    def send_to_modality(self, name: str, instance_ids: Iterable[str], timeout: float = 60.0) -> dict:
        """C-STORE instances (or patients/studies/series, by Orthanc id) to a declared modality; waits for the end.

        Raises:
            OrthancError: When the transfer fails (Orthanc answers HTTP 500 with the DICOM error).
        """
        spec = json.dumps({"Resources": list(instance_ids), "Synchronous": True}).encode()
        return self.request("POST", f"/modalities/{urllib.parse.quote(name)}/store", spec,
                            content_type="application/json", timeout=timeout).json()

    def clear(self) -> None:
        """Delete every patient, so every study, series and instance."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def reset(self) -> None:
        """:meth:`clear`, and forget the modalities added with :meth:`add_modality`."""
        self.clear()
        for name in self.modalities():
            self.request("DELETE", f"/modalities/{urllib.parse.quote(name)}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body (a WADO-RS answer): ``[(headers, content), ...]``.

    Raises:
        ValueError: When ``content_type`` names no boundary or the body holds no part.
    """
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise ValueError(f"no boundary in {content_type!r}")
    # A delimiter is CRLF "--" boundary; the first one may open the body without its CRLF.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        parts.append((headers, content))
    if not parts:
        raise ValueError("multipart body holds no part")
    return parts


def _free_port() -> int:
    # Orthanc binds every interface (no bind-address option in 1.10.1), so ask for a port free on all of them.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _die_with_parent():
    """A ``preexec_fn`` that has the child SIGTERMed when pytest dies, even by SIGKILL (no Orthanc outlives its
    test run); None off Linux. libc is looked up here, in the parent: a dlopen between fork and exec can hang."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _config(workdir: Path, name: str, http_port: int, dicom_port: int, aet: str, extra: dict) -> dict:
    config = {
        "Name": name,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 8,  # default 50, for a 2-core CI machine
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        # Default Latin1: QIDO-RS answers then say ISO_IR 100 and drop the rest (1.10.1: "Nguyễn" came back "Nguyn")
        "DefaultEncoding": "Utf8",
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "UnknownSopClassAccepted": True,
        "DicomAssociationCloseDelay": 0,  # default 5 s: a test's C-STORE listener would see the association linger
        "StableAge": 2,  # default 60 s before a study is "stable"
        "SaveJobs": False,
        "SyncStorageArea": False,  # a temporary folder needs no fsync
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado", "Ssl": False},
    }
    config.update(extra)
    return config


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # Orthanc stops cleanly on SIGTERM
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _start_once(workdir: Path, aet: str, extra: dict, timeout: float) -> Orthanc | None:
    """Start Orthanc and wait until it answers; None when a port was taken meanwhile (the caller retries)."""
    http_port, dicom_port = _free_port(), _free_port()
    while dicom_port == http_port:
        dicom_port = _free_port()
    name = f"covid-cxr-test-{uuid.uuid4().hex[:12]}"  # tells our server from another one on a reused port
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(_config(workdir, name, http_port, dicom_port, aet, extra), indent=2))
    log_path = workdir / "orthanc.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0  # this start's lines, after earlier tries'
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(ORTHANC_BIN), str(config_path)], cwd=workdir, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent())
    server = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, aet, workdir, log_path, process)
    try:
        return _wait_ready(server, name, log_start, timeout)
    except BaseException:
        _stop(process)
        raise


def _wait_ready(server: Orthanc, name: str, log_start: int, timeout: float) -> Orthanc | None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            with open(server.log_path, "rb") as log:
                log.seek(log_start)
                if _PORT_IN_USE.encode() in log.read():
                    return None
            raise OrthancError(f"Orthanc exited with status {server.process.returncode} before answering; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        try:
            # Orthanc starts its DICOM server before its HTTP server: an answer here means both listen.
            ready = server.get_json("/system", timeout=2).get("Name") == name
        except (OSError, OrthancError, ValueError):
            ready = False
        if ready:
            # A plugin that does not load is only an error line in the log (1.10.1): Orthanc runs without it.
            if "dicom-web" in server.get_json("/plugins"):
                return server
            raise OrthancError(f"Orthanc started without its DICOMweb plugin ({DICOMWEB_PLUGIN}); "
                               f"log {server.log_path}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise OrthancError(f"Orthanc did not answer GET /system within {timeout:.0f} s; "
                               f"log {server.log_path}:\n{server.log_tail()}")
        time.sleep(0.1)


@contextmanager
def run_orthanc(workdir: Path, *, aet: str = DEFAULT_AET, config: dict | None = None,
                timeout: float = START_TIMEOUT, attempts: int = 5) -> Iterator[Orthanc]:
    """Run Orthanc until the block ends, in ``workdir`` (configuration, storage, index and ``orthanc.log``).

    Args:
        workdir: An empty folder of the test's.
        aet: Orthanc's application entity title.
        config: Configuration keys that replace the defaults (Orthanc 1.10.1 ignores unknown keys silently).
        timeout: Seconds a start gets to answer ``GET /system``.
        attempts: Starts tried when a chosen port is taken by someone else before Orthanc binds it.

    Raises:
        OrthancError: Orthanc exited or did not answer in time (the message holds the log's tail).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    for _ in range(attempts):
        server = _start_once(workdir, aet, config or {}, timeout)
        if server is not None:
            break
    if server is None:
        raise OrthancError(f"Orthanc found its ports taken {attempts} times; log {workdir / 'orthanc.log'}")
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """One Orthanc for the session (per xdist worker), with DICOMweb. Shared: use ``fresh_orthanc`` for an empty
    server, or unique UIDs and patient ids."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def fresh_orthanc(orthanc: Orthanc) -> Orthanc:
    """The session's Orthanc, emptied (no patient, no added modality) before the test."""
    orthanc.reset()
    return orthanc
