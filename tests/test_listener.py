"""covid-cxr dicom listen: a C-STORE receiver that predicts each received radiograph and sends the SR and SC back;
a bounded queue (0xA700 when full), no crash and no result for a lateral view, a clean stop on SIGTERM, no instance
acknowledged and lost while it stops, and nothing of a header in its log or on its terminal."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from dicom_factory import make_cxr_dicom, make_lateral, phi_strings
from test_dicom_results import BARE_NAME, assert_identifies_only_by_name_and_id, assert_quiet_about, \
    leading_zero_uids

from covid_cxr.deploy.listener import OUT_OF_RESOURCES, UNREADABLE, Listener, reason_kind
from covid_cxr.deploy.options import ListenConfig

PATIENT = dict(patient_id="PIDL-50923", patient_name="NGUYỄN^THỊ-LAN", birth_date="19471102",
               accession="ACCL-31337", institution="Infirmary Of Quiet Corridors", referring="GRUMBLEWORTH^OTTO")
STORAGE = pydicom.uid.DigitalXRayImageStorageForPresentation


@pytest.fixture(scope="module")
def predictor(tiny_run):
    from covid_cxr.deploy.api import load_run

    return load_run(tiny_run, device="cpu")


def _study(folder: Path) -> tuple[Path, Path]:
    """A frontal and a lateral radiograph of one study of PATIENT."""
    study = pydicom.uid.generate_uid()
    frontal = folder / "frontal.dcm"
    lateral = folder / "lateral.dcm"
    make_cxr_dicom(frontal, **PATIENT, study_uid=study, size=(96, 80), label="covid")
    make_lateral(lateral, **PATIENT, study_uid=study, size=(96, 80))
    return frontal, lateral


def _scu(port: int, called: str = "COVIDCXR"):
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    return assoc


def _statuses(port: int, files: list[Path]) -> list[int]:
    assoc = _scu(port)
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def test_a_full_queue_answers_out_of_resources_and_a_lateral_view_gets_no_result(predictor, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    frontal, lateral = _study(tmp_path)
    out = tmp_path / "results"
    cfg = ListenConfig(run="unused", port=0, dicom_out=str(out), queue_size=1, max_instances=3)
    started, release = threading.Event(), threading.Event()
    with Listener(cfg, predictor) as listener:
        process = listener._process

        def slow(number, path, caller):  # hold the worker on the first instance
            started.set()
            assert release.wait(30)
            process(number, path, caller)

        listener._process = slow
        try:
            assert _statuses(listener.port, [lateral]) == [0]
            assert started.wait(30)  # the worker holds #1; the queue (1 place) is empty
            assert _statuses(listener.port, [frontal, frontal]) == [0, OUT_OF_RESOURCES]
            # waiting instances are on disk, not in memory
            assert sorted(p.name for p in listener.spool.iterdir()) == ["00000001.dcm", "00000002.dcm"]
        finally:
            release.set()
        deadline = time.monotonic() + 30
        while _statuses(listener.port, [frontal]) != [0]:  # as a PACS does: retry until the queue has room
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert listener.wait(30)  # --max-instances 3: stops by itself
        spool = listener.spool
    counts = listener.summary()
    assert counts["received"] == 3 and counts["processed"] == 3 and counts["no_result"] == 1
    assert counts["results"] == 2 and counts["refused"] >= 1
    assert not spool.exists()
    assert len(list(out.glob("sr-*.dcm"))) == 2 and len(list(out.glob("sc-*.dcm"))) == 2
    text = caplog.text
    assert re.search(r"instance #1 from TESTSCU: no result: a lateral view$", text, re.MULTILINE)
    assert "View Position" not in text  # the kind of reason, never a header value
    assert "refused with 0xA700 (out of resources)" in text
    for phi in phi_strings(PATIENT):
        assert phi not in text


def test_only_radiograph_storage_is_accepted(predictor, tmp_path):
    from pynetdicom import AE

    cfg = ListenConfig(run="unused", port=0, dicom_out=str(tmp_path / "out"))
    with Listener(cfg, predictor) as listener:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(pydicom.uid.SecondaryCaptureImageStorage)
        ae.add_requested_context(pydicom.uid.CTImageStorage)
        ae.add_requested_context(pydicom.uid.ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="COVIDCXR")
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assoc.release()
    assert accepted == {pydicom.uid.ComputedRadiographyImageStorage}


def test_orthanc_sends_a_study_and_gets_the_results_back_by_c_store(predictor, fresh_orthanc, tmp_path, caplog):
    """Orthanc C-STOREs a lateral and a frontal view to the listener; the lateral gets a log line and no result, the
    frontal's SR and SC come back into Orthanc by C-STORE, in its study, identifying the patient by name and ID."""
    caplog.set_level(logging.INFO)
    orthanc = fresh_orthanc
    frontal, lateral = _study(tmp_path)
    ids = {"frontal": orthanc.upload(frontal), "lateral": orthanc.upload(lateral)}
    cfg = ListenConfig(run="unused", port=0, send_to=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                       max_instances=2, callers=("ORTHANC",))
    with Listener(cfg, predictor) as listener:
        orthanc.add_modality("covidcxr", "COVIDCXR", "127.0.0.1", listener.port)
        orthanc.send_to_modality("covidcxr", [ids["lateral"], ids["frontal"]])
        assert listener.wait(30)
    counts = listener.summary()
    assert counts["results"] == 1 and counts["no_result"] == 1 and counts["send_failed"] == 0
    new = [i for i in orthanc.instances() if i not in ids.values()]
    assert len(new) == 2 and len(orthanc.get_json("/studies")) == 1
    source = pydicom.dcmread(frontal)
    for instance in new:
        stored = tmp_path / f"{instance}.dcm"
        stored.write_bytes(orthanc.instance_file(instance))
        assert_identifies_only_by_name_and_id(stored, PATIENT)
        ds = pydicom.dcmread(stored)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        if ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage:
            import highdicom as hd

            hd.sr.ComprehensiveSR.from_dataset(ds)
            refs = {r.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence[0]
                    .ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
            assert source.SOPInstanceUID in refs
    assert {pydicom.dcmread(tmp_path / f"{i}.dcm").Modality for i in new} == {"SR", "OT"}
    assert "no result: a lateral view" in caplog.text
    for phi in phi_strings(PATIENT):
        assert phi not in caplog.text
    assert not listener.out.exists()  # without --dicom-out the sent results are not kept


def test_results_can_go_back_by_stow_rs(predictor, fresh_orthanc, tmp_path):
    orthanc = fresh_orthanc
    frontal, _ = _study(tmp_path)
    cfg = ListenConfig(run="unused", port=0, stow=orthanc.dicomweb, max_instances=1)
    with Listener(cfg, predictor) as listener:
        assert _statuses(listener.port, [frontal]) == [0]
        assert listener.wait(30)
    assert listener.summary()["results"] == 1
    classes = sorted(orthanc.instance_tags(i)["SOPClassUID"] for i in orthanc.instances())
    assert classes == sorted([pydicom.uid.ComprehensiveSRStorage, pydicom.uid.SecondaryCaptureImageStorage])


def test_the_reason_in_the_log_is_a_kind_never_a_header_value():
    for error, kind in (("View Position is 'LL', a lateral view; covid-cxr reads frontal chest radiographs",
                         "a lateral view"),
                        ("Modality 'MR' is not a radiograph: covid-cxr reads chest radiographs", "not a radiograph"),
                        ("DICOM file (SECRET^STUDY) has no pixel data, so it is not an image", "not a radiograph"),
                        ("Body Part Examined is 'HAND OF QUILLFEATHER': covid-cxr reads chest radiographs",
                         "not a chest image"),
                        ("not a DICOM file (no 'DICM' marker at byte 128 ...)", "not a DICOM file"),
                        ("unreadable DICOM header: ValueError: bad value 'QUILLFEATHER^ARMAND'", UNREADABLE)):
        assert reason_kind(error) == kind
        assert "'" not in kind and "QUILLFEATHER" not in kind


def _fake_store(received: Path, caller: str = "TESTSCU"):
    """What pynetdicom hands a C-STORE handler: the association's caller and the received file."""
    return SimpleNamespace(assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title=caller)), dataset_path=received)


def test_an_instance_arriving_while_the_listener_stops_is_refused_never_acknowledged(predictor, tmp_path, caplog):
    """A handler that passed its first check, then spooled its instance while close() sent the worker its last item,
    answers 0xA700 (the sender keeps it and retries), never SUCCESS: nothing would process it, and the spool is
    removed. The handler is held between the two steps, so the order is forced, not hoped for."""
    frontal, _ = _study(tmp_path)
    listener = Listener(ListenConfig(run="unused", port=0, dicom_out=str(tmp_path / "out")), predictor).start()
    spooled, go = threading.Event(), threading.Event()
    spool = listener._spool

    def held(event, dest):
        refused = spool(event, dest)
        spooled.set()
        assert go.wait(30)
        return refused

    listener._spool = held
    received = tmp_path / "received.dcm"
    shutil.copy(frontal, received)
    statuses = []
    handler = threading.Thread(target=lambda: statuses.append(listener._on_store(_fake_store(received))))
    handler.start()
    try:
        assert spooled.wait(30)  # in the spool, not yet queued
        listener.close()  # stopped, the sentinel sent, the worker done, the spool removed
    finally:
        go.set()
        handler.join(30)
    assert statuses == [OUT_OF_RESOURCES]
    assert listener.queue.empty()  # nothing behind the sentinel
    counts = listener.summary()
    assert counts["received"] == 0 and counts["refused"] == 1 and counts["processed"] == 0
    assert not listener.spool.exists()
    assert "refused with 0xA700: the listener is stopping" in caplog.text


def test_an_interrupted_close_still_removes_the_spool_and_the_results(predictor):
    from pydicom import config

    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    listener = Listener(ListenConfig(run="unused", port=0, stow="http://127.0.0.1:9/dicom-web"), predictor).start()
    assert config.settings.reading_validation_mode == config.IGNORE  # while it listens
    worker = listener._worker

    class Interrupted:
        def join(self):
            raise KeyboardInterrupt  # a second Ctrl-C while it finishes

    listener._worker = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        listener.close()
    listener.queue.put(None)
    worker.join(30)
    assert not listener.spool.exists() and not listener.out.exists()
    assert (config.settings.reading_validation_mode, config.settings.writing_validation_mode) == modes


class _Drain:
    """Reads a pipe to its end in a thread: a pipe nobody reads fills (64 KiB) and blocks the process writing it, and a
    bare readline() can wait for ever."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first match of ``pattern`` in a line, waiting at most ``timeout`` seconds (None: not seen, or the
        pipe closed)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    return None
                self._changed.wait(left)

    def text(self, timeout: float = 30) -> str:
        """Everything read, once the pipe is closed (the process has ended)."""
        self._thread.join(timeout)
        with self._changed:
            return "".join(self.lines)


@pytest.mark.slow  # a subprocess or a 512 px PSPNet or a full report: ~7-14 s; make test-slow runs it
def test_the_command_receives_and_stops_cleanly_on_sigterm(tiny_run, tmp_path):
    """The listener as a command, sent an instance whose Patient's Name has no '^' and whose UIDs have leading zeros
    (pydicom and highdicom warn about both, quoting them): it makes the results, stops on SIGTERM, and its terminal
    shows neither the name nor a UID."""
    from covid_cxr.deploy.dicom_results import quiet_pydicom

    source = tmp_path / "odd.dcm"
    uids = leading_zero_uids()
    patient = {**PATIENT, "patient_name": BARE_NAME}
    with quiet_pydicom():
        make_cxr_dicom(source, **patient, **uids, size=(96, 80), label="covid")
    out = tmp_path / "results"
    env = {**os.environ, "COVID_CXR_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.Popen([sys.executable, "-m", "covid_cxr.cli", "dicom", "listen", "--run", str(tiny_run),
                             "--port", "0", "--dicom-out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = _Drain(proc.stdout), _Drain(proc.stderr)
    try:
        m = stderr.wait_for(r"listening as COVIDCXR on 127\.0\.0\.1:(\d+)", timeout=60)
        assert m, "".join(stderr.lines)[-3000:]
        with quiet_pydicom():  # the sending side reads it too
            assert _statuses(int(m.group(1)), [source]) == [0]
        deadline = time.monotonic() + 30
        while len(list(out.glob("*.dcm"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    printed, logged = stdout.text(), stderr.text()
    assert proc.returncode == 0, logged[-3000:]
    assert "received 1 instance(s): 1 with results," in printed and "not a diagnostic device" in printed
    assert "stopping" in logged and "Traceback" not in logged
    assert len(list(out.glob("sr-*.dcm"))) == 1 and len(list(out.glob("sc-*.dcm"))) == 1
    assert_quiet_about(printed + logged, BARE_NAME, uids)
    for phi in phi_strings(patient):
        assert phi not in printed + logged
