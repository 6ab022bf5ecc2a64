"""The test PACS itself: the synthetic DICOM factory, and the Orthanc fixture's REST, DICOMweb and DICOM sides."""

from __future__ import annotations

import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import PHI_FIELDS, SOP_CLASSES, DicomUids, make_cxr_dicom, make_lateral, phi_strings
from orthanc import INSTALL_HINT, Orthanc, OrthancError, missing_reason, parse_multipart, run_orthanc

PATIENT = {"patient_id": "PX-ORTH-7731", "patient_name": "Quillfeather^Ottoline", "birth_date": "19581123",
           "accession": "ACC-ORTH-55", "institution": "Orthanc Test Infirmary", "referring": "Marbleton^Rufus"}
DICOM_JSON = "application/dicom+json"


# ----------------------------------------------------------------------------- the DICOM factory


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_factory_writes_a_dicom_file_with_its_iod_attributes(tmp_path: Path, modality: str) -> None:
    path = tmp_path / "a.dcm"
    uids = make_cxr_dicom(path, modality=modality, **PATIENT)
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)  # not force=True: a file without its meta header would fail here
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASSES[modality] == uids.sop_class_uid
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.study_uid, uids.series_uid,
                                                                             uids.sop_uid)
    type1 = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
             "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
             "PhotometricInterpretation", "ImageType", "PixelData"]
    type2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
             "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer",
             "InstanceNumber", "PatientOrientation", "BodyPartExamined", "ViewPosition"]
    if modality == "DX":
        type1 += ["PresentationIntentType", "ImageLaterality", "PixelIntensityRelationship",
                  "PixelIntensityRelationshipSign", "RescaleIntercept", "RescaleSlope", "RescaleType",
                  "PresentationLUTShape", "BurnedInAnnotation", "ImagerPixelSpacing", "WindowCenter",
                  "WindowWidth"]
        type2 += ["AnatomicRegionSequence", "DetectorType", "AcquisitionContextSequence", "ContentDate",
                  "ContentTime"]
    assert [k for k in type1 if k not in ds or ds[k].value in (None, "", b"")] == []
    assert [k for k in type2 if k not in ds] == []
    pixels = ds.pixel_array
    assert pixels.shape == (256, 256) and pixels.dtype == np.uint16 and pixels.max() < 4096


def make_and_read(path: Path, **kwargs) -> np.ndarray:
    make_cxr_dicom(path, **{**PATIENT, **kwargs})
    return pydicom.dcmread(path).pixel_array


def test_factory_pixels_look_like_a_chest_and_covid_adds_opacities(tmp_path: Path) -> None:
    normal = make_and_read(tmp_path / "normal.dcm", label="normal", seed=3).astype(np.int64)
    covid = make_and_read(tmp_path / "covid.dcm", label="covid", seed=3).astype(np.int64)
    h, w = normal.shape
    # dark air in the top corners, lungs (left and right of the midline) darker than the mediastinum
    corners = np.concatenate([normal[:16, :16].ravel(), normal[:16, -16:].ravel()])
    mediastinum = normal[h // 3: 2 * h // 3, w // 2 - 8: w // 2 + 8]
    lungs = np.concatenate([normal[h // 3: h // 2, w // 4 - 8: w // 4 + 8].ravel(),
                            normal[h // 3: h // 2, 3 * w // 4 - 8: 3 * w // 4 + 8].ravel()])
    assert corners.mean() < lungs.mean() < mediastinum.mean()
    # the same seed draws the same anatomy: covid differs by brighter (opaque) patches only
    brighter = covid - normal > 300
    assert brighter.sum() > 200
    assert (normal - covid > 300).sum() < brighter.sum() // 20
    assert not np.array_equal(make_and_read(tmp_path / "other.dcm", label="normal", seed=4), normal)


def test_factory_options(tmp_path: Path) -> None:
    mono2 = make_and_read(tmp_path / "m2.dcm", seed=1).astype(np.int64)
    mono1 = make_and_read(tmp_path / "m1.dcm", seed=1, photometric="MONOCHROME1").astype(np.int64)
    assert np.array_equal(mono1, 4095 - mono2)
    assert pydicom.dcmread(tmp_path / "m1.dcm").PresentationLUTShape == "INVERSE"
    eight = make_and_read(tmp_path / "b8.dcm", bits=8, size=(200, 160))
    assert eight.dtype == np.uint8 and eight.shape == (200, 160)
    assert np.array_equal(make_and_read(tmp_path / "r.dcm", seed=1), mono2)  # the same seed, the same pixels
    make_lateral(tmp_path / "lat.dcm", **PATIENT)
    lat = pydicom.dcmread(tmp_path / "lat.dcm")
    assert (lat.ViewPosition, lat.PatientOrientation) == ("LL", ["P", "F"])
    with pytest.raises(ValueError, match="modality"):
        make_cxr_dicom(tmp_path / "x.dcm", modality="CT", **PATIENT)
    with pytest.raises(ValueError, match="label"):
        make_cxr_dicom(tmp_path / "x.dcm", label="tuberculosis", **PATIENT)


def test_phi_strings_lists_every_identifier_the_file_carries(tmp_path: Path) -> None:
    make_cxr_dicom(tmp_path / "a.dcm", **PATIENT)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    strings = phi_strings(ds)
    assert strings == phi_strings(PATIENT)
    assert [k for k in PHI_FIELDS if str(ds[k].value) not in strings] == []
    assert {"Quillfeather", "Ottoline", "Marbleton", "Rufus", "1958-11-23", "PX-ORTH-7731"} <= set(strings)
    raw = (tmp_path / "a.dcm").read_bytes()
    assert [s for s in strings if s.replace("-", "").encode() not in raw and s.encode() not in raw] == []
    make_cxr_dicom(tmp_path / "b.dcm", extra_phi=False, **PATIENT)
    plain = pydicom.dcmread(tmp_path / "b.dcm")
    assert "OtherPatientIDs" not in plain and "PatientAddress" not in plain
    assert phi_strings(plain) == phi_strings({**PATIENT, "extra_phi": False}) != strings


def test_highdicom_builds_an_sr_on_a_factory_image(tmp_path: Path) -> None:
    highdicom = pytest.importorskip("highdicom")
    make_cxr_dicom(tmp_path / "a.dcm", label="covid", **PATIENT)
    sr = _covid_sr(pydicom.dcmread(tmp_path / "a.dcm"))
    assert sr.PatientID == PATIENT["patient_id"]
    assert isinstance(sr, highdicom.sr.Comprehensive3DSR)


def _covid_sr(image: pydicom.Dataset):
    """A Comprehensive 3D SR (TID 1500) that says "COVID-19" about ``image``, the way a result would be stored."""
    import highdicom as hd
    from highdicom.sr import (CodedConcept, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                              MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
                              ObserverContext, QualitativeEvaluation, SourceImageForMeasurementGroup,
                              TrackingIdentifier)
    from pydicom.sr.codedict import codes

    device = ObserverContext(observer_type=codes.DCM.Device,
                             observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=hd.UID()))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="covid-cxr"),
        qualitative_evaluations=[QualitativeEvaluation(codes.DCM.Finding,
                                                       CodedConcept("840539006", "SCT", "COVID-19"))],
        source_images=[SourceImageForMeasurementGroup.from_source_image(image)])
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=CodedConcept("36572-6", "LN", "XR Chest Views"),
                               imaging_measurements=[group])
    return Comprehensive3DSR(evidence=[image], content=report, series_instance_uid=hd.UID(), series_number=99,
                             sop_instance_uid=hd.UID(), instance_number=1, manufacturer="covid-cxr")


# ----------------------------------------------------------------------------- the fixture's own plumbing


def test_missing_orthanc_gives_a_skip_reason_naming_the_packages(tmp_path: Path) -> None:
    reason = missing_reason(tmp_path / "Orthanc", tmp_path / "libOrthancDicomWeb.so")
    assert reason is not None and INSTALL_HINT in reason and "orthanc-dicomweb" in reason
    assert str(tmp_path / "Orthanc") in reason
    (tmp_path / "Orthanc").touch()
    (tmp_path / "libOrthancDicomWeb.so").touch()
    assert missing_reason(tmp_path / "Orthanc", tmp_path / "libOrthancDicomWeb.so") is None


def test_multipart_parser() -> None:
    body = (b"--xyz\r\nContent-Type: application/dicom\r\n\r\nA\r\n--xyz\r\n\r\nB\r\n--xyz\r\n\r\nB2--\r\n"
            b"\r\n--xyz--\r\n")
    parts = parse_multipart(body, 'multipart/related; type="application/dicom"; boundary="xyz"')
    assert [c for _, c in parts] == [b"A", b"B", b"B2--\r\n"]
    assert parts[0][0] == {"content-type": "application/dicom"}
    with pytest.raises(ValueError, match="boundary"):
        parse_multipart(body, "multipart/related")


@pytest.fixture
def needs_orthanc() -> None:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.slow  # starts and stops Orthanc several times (~3.5 s per clean stop)
def test_start_retries_when_its_port_is_taken_and_stops_cleanly(tmp_path: Path, monkeypatch,
                                                                 needs_orthanc) -> None:
    import orthanc as module

    blocker = socket.socket()
    blocker.bind(("", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    real = module._free_port
    ports = iter([taken])
    monkeypatch.setattr(module, "_free_port", lambda: next(ports, None) or real())
    try:
        with run_orthanc(tmp_path) as server:
            assert server.get_json("/system")["HttpPort"] != taken
            process = server.process
    finally:
        blocker.close()
    assert process.returncode == 0
    log = (tmp_path / "orthanc.log").read_text()
    assert "already in use" in log and log.count("Orthanc version") == 2


@pytest.mark.slow  # starts and stops Orthanc several times (~3.5 s per clean stop)
def test_a_start_that_fails_shows_the_log(tmp_path: Path, needs_orthanc) -> None:
    with pytest.raises(OrthancError, match=r'exited with status(.|\n)*"StableAge" must be an integer'):
        with run_orthanc(tmp_path / "bad", config={"StableAge": "soon"}):
            pass
    # a plugin that does not load is only a log line to Orthanc, but the fixture refuses to run without DICOMweb
    with pytest.raises(OrthancError, match="without its DICOMweb plugin(.|\n)*Inexistent path to plugins"):
        with run_orthanc(tmp_path / "noplugin", config={"Plugins": [str(tmp_path / "nonexistent-plugin.so")]}):
            pass


# ----------------------------------------------------------------------------- a real PACS


@dataclass
class Stored:
    server: Orthanc
    frontal: DicomUids
    lateral: DicomUids
    files: dict[str, bytes]
    """SOPInstanceUID -> file bytes."""
    ids: dict[str, str]
    """SOPInstanceUID -> Orthanc instance id."""


@pytest.fixture
def stored(fresh_orthanc: Orthanc, tmp_path: Path) -> Stored:
    """One study of PATIENT with a PA and a lateral DX series, uploaded to an emptied Orthanc."""
    frontal = make_cxr_dicom(tmp_path / "pa.dcm", label="covid", **PATIENT)
    lateral = make_lateral(tmp_path / "ll.dcm", study_uid=frontal.study_uid, seed=1, **PATIENT)
    files = {u.sop_uid: (tmp_path / name).read_bytes() for u, name in ((frontal, "pa.dcm"), (lateral, "ll.dcm"))}
    ids = {sop: fresh_orthanc.upload(raw) for sop, raw in files.items()}
    return Stored(fresh_orthanc, frontal, lateral, files, ids)


def test_rest_finds_the_uploaded_instances(stored: Stored, tmp_path: Path) -> None:
    server = stored.server
    assert sorted(server.instances()) == sorted(stored.ids.values())
    for sop, instance in stored.ids.items():
        tags = server.instance_tags(instance)
        assert tags["SOPInstanceUID"] == sop
        assert tags["PatientID"] == PATIENT["patient_id"] and tags["StudyInstanceUID"] == stored.frontal.study_uid
        assert server.instance_file(instance) == stored.files[sop]
    assert server.upload(tmp_path / "pa.dcm") == stored.ids[stored.frontal.sop_uid]  # already stored: same id
    with pytest.raises(OrthancError, match="404"):
        server.instance_tags("no-such-instance")


def test_qido_searches_studies_and_series(stored: Stored) -> None:
    server = stored.server
    studies = server.get_json(f"/dicom-web/studies?PatientID={PATIENT['patient_id']}", accept=DICOM_JSON)
    assert [s["0020000D"]["Value"] for s in studies] == [[stored.frontal.study_uid]]
    assert studies[0]["00100020"]["Value"] == [PATIENT["patient_id"]]
    assert server.get_json("/dicom-web/studies?PatientID=NOBODY", accept=DICOM_JSON) == []
    series = server.get_json(server.dicomweb + "/series?Modality=DX", accept=DICOM_JSON)
    print("QIDO-RS GET /dicom-web/series?Modality=DX ->\n" + json.dumps(series, indent=1))
    assert sorted(s["0020000E"]["Value"][0] for s in series) == sorted([stored.frontal.series_uid,
                                                                        stored.lateral.series_uid])
    assert {s["00080060"]["Value"][0] for s in series} == {"DX"}
    assert server.get_json(server.dicomweb + "/series?Modality=CT", accept=DICOM_JSON) == []
    instances = server.get_json(f"{server.dicomweb}/studies/{stored.frontal.study_uid}/instances",
                                accept=DICOM_JSON)
    assert sorted(i["00080018"]["Value"][0] for i in instances) == sorted(stored.ids)


def test_qido_keeps_names_outside_latin1(fresh_orthanc: Orthanc, tmp_path: Path) -> None:
    make_cxr_dicom(tmp_path / "u.dcm", patient_id="PX-UTF8-1", patient_name="Nguyễn^Thị Ánh",
                   institution="Ōsaka 病院")
    fresh_orthanc.upload(tmp_path / "u.dcm")
    [study] = fresh_orthanc.get_json("/dicom-web/studies?PatientID=PX-UTF8-1", accept=DICOM_JSON)
    assert study["00100010"]["Value"] == [{"Alphabetic": "Nguyễn^Thị Ánh"}]
    assert study["00080005"]["Value"] == ["ISO_IR 192"]


def test_wado_rs_retrieves_the_instance(stored: Stored) -> None:
    u = stored.lateral
    answer = stored.server.request(
        "GET", f"{stored.server.dicomweb}/studies/{u.study_uid}/series/{u.series_uid}/instances/{u.sop_uid}",
        accept='multipart/related; type="application/dicom"')
    assert answer.headers["content-type"].startswith("multipart/related")
    parts = parse_multipart(answer.body, answer.headers["content-type"])
    assert len(parts) == 1 and parts[0][0]["content-type"].startswith("application/dicom")
    ds = pydicom.dcmread(io.BytesIO(parts[0][1]))
    assert ds.SOPInstanceUID == u.sop_uid and ds.ViewPosition == "LL"
    original = pydicom.dcmread(io.BytesIO(stored.files[u.sop_uid]))
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_c_echo_and_c_store_to_orthanc(stored: Stored, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

    server = stored.server
    ae = AE(ae_title="COVIDCXR")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, server.log_tail()
    try:
        assert assoc.send_c_echo().Status == 0x0000
        uids = make_cxr_dicom(tmp_path / "c.dcm", seed=5, **PATIENT)
        assert assoc.send_c_store(pydicom.dcmread(tmp_path / "c.dcm")).Status == 0x0000
    finally:
        assoc.release()
    assert uids.sop_uid in {server.instance_tags(i)["SOPInstanceUID"] for i in server.instances()}


def test_send_to_modality_reaches_a_storage_scp(stored: Stored) -> None:
    from pynetdicom import AE, StoragePresentationContexts, evt

    received: list[str] = []

    def on_store(event) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="LISTENER")
    ae.supported_contexts = StoragePresentationContexts
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        stored.server.add_modality("listener", "LISTENER", "127.0.0.1", scp.server_address[1])
        assert stored.server.modalities() == ["listener"]
        stored.server.send_to_modality("listener", list(stored.ids.values()))
    finally:
        scp.shutdown()
    assert sorted(received) == sorted(stored.ids)
    with pytest.raises(OrthancError):
        stored.server.send_to_modality("nowhere", list(stored.ids.values()))


def test_an_sr_about_a_stored_image_joins_its_study(stored: Stored) -> None:
    pytest.importorskip("highdicom")
    image = pydicom.dcmread(io.BytesIO(stored.files[stored.frontal.sop_uid]))
    sr = _covid_sr(image)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    instance = stored.server.upload(buf.getvalue())
    tags = stored.server.instance_tags(instance)
    assert (tags["Modality"], tags["StudyInstanceUID"]) == ("SR", stored.frontal.study_uid)


def test_clear_empties_the_server(stored: Stored) -> None:
    stored.server.clear()
    assert stored.server.instances() == []
    assert stored.server.get_json("/dicom-web/studies", accept=DICOM_JSON) == []
