"""covid-cxr dicom listen: a C-STORE receiver that predicts each received radiograph and sends the SR and SC back;
a bounded queue (0xA700 when full), no crash and no result for a lateral view, a clean stop on SIGTERM."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from dicom_factory import make_cxr_dicom, make_lateral, phi_strings
from test_dicom_results import assert_identifies_only_by_name_and_id

from covid_cxr.deploy.listener import OUT_OF_RESOURCES, Listener
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
    assert re.search(r"instance #1 from TESTSCU: no result: View Position is 'LL', a lateral view", text)
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
    assert "no result: View Position is 'LL'" in caplog.text
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


def test_the_command_receives_and_stops_cleanly_on_sigterm(tiny_run, tmp_path):
    frontal, _ = _study(tmp_path)
    out = tmp_path / "results"
    env = {**os.environ, "COVID_CXR_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "covid_cxr.cli", "dicom", "listen", "--run", str(tiny_run),
                             "--port", "0", "--dicom-out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        deadline = time.monotonic() + 60
        lines = []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"listening as COVIDCXR on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
            assert line or proc.poll() is None, "".join(lines)
        assert port, "".join(lines)
        assert _statuses(port, [frontal]) == [0]
        deadline = time.monotonic() + 30
        while len(list(out.glob("*.dcm"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "received 1 instance(s): 1 with results," in stdout and "not a diagnostic device" in stdout
    assert "stopping" in stderr and "Traceback" not in stderr
    assert len(list(out.glob("sr-*.dcm"))) == 1 and len(list(out.glob("sc-*.dcm"))) == 1
    for phi in phi_strings(PATIENT):
        assert phi not in stdout + "".join(lines) + stderr
