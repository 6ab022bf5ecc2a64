"""``covid-cxr dicom listen``: a DICOM C-STORE receiver that predicts each received chest radiograph and sends its
results back to the PACS (research use only; see docs/pacs-results.md).

* **Receiving** (pynetdicom, one thread per association): CR and DX image storage only (:data:`RADIOGRAPH_STORAGE`),
  in the transfer syntaxes this install can decode (:data:`TRANSFER_SYNTAXES`), and C-ECHO. Each instance is
  written to disk as it arrives (pynetdicom's chunked receive) and moved into a spool folder, so memory does not
  grow with the instances waiting; one larger than :data:`~covid_cxr.limits.MAX_DICOM_INSTANCE_BYTES` is refused.
* **A bounded queue** (``--queue-size``) between the receiving threads and one prediction worker: when it is full,
  the C-STORE is answered ``0xA700`` (out of resources) and the sender retries later, instead of the listener
  filling its disk or memory.
* **The worker** predicts (the ``predict`` path: :meth:`~covid_cxr.model.inference.Predictor.predict_files`), writes
  the SR and SC (:class:`~covid_cxr.deploy.dicom_results.ResultWriter`) and sends them with C-STORE
  (``--send-to``) and/or STOW-RS (``--stow``). An instance without a result (a lateral view, an unreadable file)
  gets a log line naming the kind of reason (:func:`reason_kind`), and the listener goes on. Log lines name an
  instance by its arrival number and the sender's AE title, never by anything in its header; pydicom's and
  highdicom's own complaints, which quote header values, are kept quiet
  (:func:`~covid_cxr.imaging.dicom_quiet.quiet_pydicom`).
* **Stopping**: SIGINT or SIGTERM (or ``--max-instances`` processed) stops accepting associations, finishes the
  instances already acknowledged (their senders were told they were stored), and removes the spool folder. An
  instance still arriving then is refused (0xA700), never acknowledged and dropped. A second Ctrl-C while it
  finishes abandons them; the spool (patient data) is removed all the same, and at exit if ``close`` never ran.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import queue
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

from covid_cxr import DISCLAIMER
from covid_cxr.deploy.dicom_results import NOT_DICOM, ResultWriter, stow
from covid_cxr.imaging.dicom_quiet import quiet_pydicom
from covid_cxr.deploy.options import ListenConfig
from covid_cxr.errors import PacsError
from covid_cxr.limits import MAX_DICOM_INSTANCE_BYTES

log = logging.getLogger(__name__)

RADIOGRAPH_STORAGE = ("1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
                      "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
                      "1.2.840.10008.5.1.4.1.1.1.1.1")  # Digital X-Ray Image Storage - For Processing
"""The storage SOP classes the listener accepts: chest radiographs, nothing else (no SC, no SR, no CT)."""
_CANDIDATE_SYNTAXES = ("ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian",
                       "ExplicitVRBigEndian", "JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless",
                       "JPEGLosslessSV1", "JPEGLSLossless", "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000",
                       "RLELossless")
RESULT_STORAGE = ("1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
                  "1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""C-STORE status "Refused: Out of Resources": the queue is full, or the listener is stopping; retry later."""
_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
"""C-STORE warnings (coercion, elements discarded): the instance was stored."""
_QUIET = ("pynetdicom", "highdicom")
"""Libraries whose INFO lines name UIDs and dataset details: only their warnings reach the log."""
REASON_KINDS = (("a lateral view", "a lateral view"), ("not a radiograph", "not a radiograph"),
                ("has no pixel data", "not a radiograph"), ("Body Part Examined", "not a chest image"),
                (NOT_DICOM, NOT_DICOM))
"""(words in a reader's error, the kind of reason the log names): the error itself may quote the header (View
Position 'LL', Body Part Examined 'PORT CHEST', a malformed value)."""
UNREADABLE = "unreadable or unsupported image"
"""The kind of reason of any other error."""
_UID_TEXT = re.compile(r"\b\d+(?:\.\d+){4,}\b")
"""What looks like a UID (five or more dotted numbers; an IPv4 address has four)."""


def reason_kind(error: str) -> str:
    """What kind of reason an instance has no result, in words that hold no header value: ``a lateral view``,
    ``not a radiograph``, ``not a chest image``, ``not a DICOM file`` or :data:`UNREADABLE`."""
    for words, kind in REASON_KINDS:
        if words in error:
            return kind
    return UNREADABLE


class _RedactUids(logging.Filter):
    """Writes ``<UID>`` for whatever looks like a UID in a record's message (pynetdicom warns ``Non-conformant
    'Affected SOP Instance UID' value '1.2.840.0123...'`` about what a sender sent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _UID_TEXT.sub("<UID>", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


@contextlib.contextmanager
def _pynetdicom_redacted():
    """:class:`_RedactUids` on every pynetdicom logger while inside (pynetdicom logs under its module names, and a
    logger's filter sees only its own records)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "pynetdicom" or n.startswith("pynetdicom.")]
    loggers = [logging.getLogger(n) for n in names]
    redact = _RedactUids()
    for logger in loggers:
        logger.addFilter(redact)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redact)


def transfer_syntaxes() -> list[str]:
    """The usual transfer syntaxes of radiographs that this install can decode (the others are not offered)."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    found = []
    for name in _CANDIDATE_SYNTAXES:
        ts = getattr(uid, name)
        try:
            if get_decoder(ts).is_available:
                found.append(ts)
        except NotImplementedError:
            continue
    return found


def send_cstore(files: Iterable[str | Path], destination: tuple[str, str, int], calling_ae: str,
                timeout: float = 30.0) -> int:
    """C-STORE ``files`` (our SRs and SCs) to ``destination`` (AE title, host, port) in one association; returns
    how many were stored.

    Raises:
        PacsError: no association (refused, unreachable) or an instance refused.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    aet, host, port = destination
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop in RESULT_STORAGE:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        raise PacsError(f"{aet}@{host}:{port} did not accept an association from {calling_ae} (refused, aborted or "
                        "unreachable); check the address and that it knows this AE title")
    stored = 0
    try:
        for f in files:
            status = assoc.send_c_store(Path(f))
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{aet}@{host}:{port} gave no answer to a C-STORE (timeout or aborted association)")
            if code != SUCCESS and code not in _WARNING_STATUSES:
                raise PacsError(f"{aet}@{host}:{port} refused a result with C-STORE status 0x{code:04X}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


class Listener:
    """The receiver, its queue and its prediction worker. :meth:`start`, then :meth:`wait`; :meth:`close` stops it.

    Args:
        cfg: the options.
        predictor: a loaded model (default: :func:`~covid_cxr.deploy.api.load_run` of ``cfg.run``).
    """

    def __init__(self, cfg: ListenConfig, predictor=None):
        if predictor is None:
            from covid_cxr.deploy.api import load_run

            predictor = load_run(cfg.run, cfg.backend, cfg.device, cfg.checkpoint)
        self.cfg = cfg
        self.predictor = predictor
        self.destination = cfg.destination
        self.spool = Path(tempfile.mkdtemp(prefix="covid-cxr-spool-"))
        self._own_out = cfg.dicom_out is None
        self.out = Path(tempfile.mkdtemp(prefix="covid-cxr-results-")) if self._own_out else Path(cfg.dicom_out)
        # The spool holds received instances, patient data: removed by close(), else at exit (a crash, a second
        # Ctrl-C); only SIGKILL or a power cut leaves it in the temporary folder.
        atexit.register(self._remove_temporary)
        self.writer = ResultWriter(predictor, self.out)
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.stopped = threading.Event()
        self.counts = {"received": 0, "refused": 0, "results": 0, "no_result": 0, "send_failed": 0, "processed": 0}
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._server = None
        self._worker: threading.Thread | None = None
        self._chunked: bool | None = None
        self._quiet = contextlib.ExitStack()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "Listener":
        """Bind and start receiving (in background threads)."""
        from pynetdicom import AE, _config, evt
        from pynetdicom.sop_class import Verification

        for name in _QUIET:
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        # For as long as it listens: pynetdicom's threads decode what arrives too, and pydicom and pynetdicom would
        # quote a UID they find odd.
        self._quiet.enter_context(quiet_pydicom())
        self._quiet.enter_context(_pynetdicom_redacted())
        self._chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True  # received data sets go to disk as they arrive, not into memory
        ae = AE(ae_title=self.cfg.ae_title)
        syntaxes = transfer_syntaxes()
        for sop in RADIOGRAPH_STORAGE:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(Verification)
        if self.cfg.callers:
            ae.require_calling_aet = list(self.cfg.callers)
        self._worker = threading.Thread(target=self._work, name="covid-cxr-listen-worker", daemon=True)
        self._worker.start()
        try:
            self._server = ae.start_server((self.cfg.host, int(self.cfg.port)), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            self.close()
            raise PacsError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc}; choose "
                            "another --port (0: any free port)") from None
        return self

    @property
    def port(self) -> int:
        """The TCP port it listens on (the one chosen for --port 0)."""
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Ask it to stop (safe from a signal handler); :meth:`wait` returns."""
        self.stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it is asked to stop (True) or ``timeout`` seconds pass (False)."""
        return self.stopped.wait(timeout)

    def close(self) -> None:
        """Stop accepting, finish the instances already acknowledged, remove the spool (and, without --dicom-out,
        the results, which were sent). Interrupted (a second Ctrl-C), it still removes them."""
        with self._lock:  # a handler enqueues under this lock: none can put an instance after the sentinel
            self.stopped.set()
        try:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            if self._worker is not None:
                self.queue.put(None)  # after every acknowledged instance: they are finished first
                self._worker.join()
                self._worker = None
        finally:
            if self._chunked is not None:
                from pynetdicom import _config

                _config.STORE_RECV_CHUNKED_DATASET = self._chunked
                self._chunked = None
            self._quiet.close()
            self._remove_temporary()
            atexit.unregister(self._remove_temporary)

    def _remove_temporary(self) -> None:
        """Remove the spool (patient data) and, without --dicom-out, the results folder."""
        shutil.rmtree(self.spool, ignore_errors=True)
        if self._own_out:
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- receiving (pynetdicom's association threads) --------------------------------------------------
    def _on_store(self, event) -> int:
        caller = str(getattr(event.assoc.requestor, "ae_title", "") or "?").strip()
        with self._lock:
            limit = self.cfg.max_instances
            if self.stopped.is_set() or (limit and self.counts["received"] >= limit):
                self.counts["refused"] += 1
                return OUT_OF_RESOURCES
            number = next(self._numbers)
            self.counts["received"] += 1
        spooled = self.spool / f"{number:08d}.dcm"
        try:
            refused = self._spool(event, spooled)
            if refused is None:
                with self._lock:  # close() sets stopped under it, then sends the sentinel
                    if self.stopped.is_set():
                        refused = "the listener is stopping; the sender may retry later"
                    else:
                        self.queue.put_nowait((number, spooled, caller))
                        return SUCCESS
            log.warning("instance #%d from %s refused with 0xA700: %s", number, caller, refused)
        except queue.Full:
            log.warning("instance #%d from %s refused with 0xA700 (out of resources): %d instances are waiting for "
                        "the prediction worker; the sender may retry later", number, caller, self.cfg.queue_size)
        except OSError as exc:
            log.error("instance #%d from %s refused with 0xA700: cannot spool it (%s)", number, caller,
                      exc.strerror or type(exc).__name__)
        spooled.unlink(missing_ok=True)
        with self._lock:
            self.counts["received"] -= 1
            self.counts["refused"] += 1
        return OUT_OF_RESOURCES

    @staticmethod
    def _spool(event, dest: Path) -> str | None:
        """Move the received data set to ``dest``; the reason to refuse it, or None."""
        try:
            received = Path(event.dataset_path)
        except AttributeError:  # pynetdicom was told elsewhere not to write data sets to disk
            dest.write_bytes(event.encoded_dataset())
            received = dest
        size = received.stat().st_size
        if size > MAX_DICOM_INSTANCE_BYTES:
            return f"{size:,} bytes, more than the {MAX_DICOM_INSTANCE_BYTES:,} accepted"
        if received != dest:
            shutil.move(received, dest)  # pynetdicom deletes its own file after this handler; it is ours now
        return None

    # -- the worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            number, path, caller = item
            try:
                self._process(number, path, caller)
            except Exception as exc:  # noqa: BLE001 - one instance must not stop the listener
                # The type only: a message could quote the instance's header.
                log.error("instance #%d from %s: no result (%s); the listener goes on", number, caller,
                          type(exc).__name__)
                log.debug("instance #%d", number, exc_info=True)
                with self._lock:
                    self.counts["no_result"] += 1
            finally:
                path.unlink(missing_ok=True)
                with self._lock:
                    self.counts["processed"] += 1
                    if self.cfg.max_instances and self.counts["processed"] >= self.cfg.max_instances:
                        self.stopped.set()

    def _process(self, number: int, path: Path, caller: str) -> None:
        row = self.predictor.predict_files([path], skip_unreadable=True)[0]
        done = self.writer.write(path, row)
        if done.reason:
            why = reason_kind(row["error"]) if row["error"] else done.reason  # ResultWriter's reasons quote nothing
            log.warning("instance #%d from %s: no result: %s", number, caller, why)
            with self._lock:
                self.counts["no_result"] += 1
            return
        if done.note:
            log.info("instance #%d: %s", number, done.note)
        try:
            sent = self._send(done.files)
        except PacsError as exc:
            log.error("instance #%d from %s: sending its results failed: %s%s", number, caller, exc,
                      "" if self._own_out else f" (they are in {self.out})")
            with self._lock:
                self.counts["send_failed"] += 1
            return
        finally:
            if self._own_out:
                for f in done.files:
                    f.unlink(missing_ok=True)
        log.info("instance #%d from %s: %d result instance(s) %s", number, caller, len(done.files), sent)
        with self._lock:
            self.counts["results"] += 1

    def _send(self, files: list[Path]) -> str:
        where = []
        if self.destination is not None:
            send_cstore(files, self.destination, self.cfg.ae_title)
            where.append(f"sent with C-STORE to {self.cfg.send_to}")
        if self.cfg.stow is not None:
            stow(files, self.cfg.stow)
            where.append("sent with STOW-RS")
        if not self._own_out:
            where.append(f"written to {self.out}")
        return ", ".join(where)

    def summary(self) -> dict:
        """Counts so far: received, refused, results, no_result, send_failed, processed."""
        with self._lock:
            return dict(self.counts)


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]):
    """SIGINT and SIGTERM call ``stop`` while inside (the main thread only: elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: stop())
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg: ListenConfig) -> dict:
    """Receive, predict and send back until SIGINT/SIGTERM or ``cfg.max_instances`` processed.

    Returns:
        The counts (:meth:`Listener.summary`), the AE title and port.
    """
    listener = Listener(cfg)
    listener.start()
    port = listener.port
    targets = [t for t in (f"C-STORE to {cfg.send_to}" if cfg.send_to else "",
                           "STOW-RS" if cfg.stow else "", f"folder {cfg.dicom_out}" if cfg.dicom_out else "") if t]
    log.info("listening as %s on %s:%d (CR/DX storage; results by %s); stop with Ctrl-C or SIGTERM. %s",
             cfg.ae_title, cfg.host, port, ", ".join(targets), DISCLAIMER)
    try:
        with _stop_on_signals(listener.stop):
            while not listener.wait(0.5):
                pass
            log.info("stopping: finishing the instances already received")
    finally:
        listener.close()
    return {**listener.summary(), "ae_title": cfg.ae_title, "port": port}


def format_summary(result: dict) -> str:
    """The counts in two lines, and the disclaimer."""
    return (f"received {result['received']} instance(s): {result['results']} with results, "
            f"{result['no_result']} without a result (see the log), {result['send_failed']} whose results could "
            f"not be sent; {result['refused']} refused (out of resources)\n{DISCLAIMER}")
