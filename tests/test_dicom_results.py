"""DICOM results for a PACS: predict --dicom-out writes a Comprehensive SR and a Secondary Capture per DICOM input,
in the source's study, carrying the patient's name and ID and nothing else of the source; --stow sends them."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import make_cxr_dicom, phi_strings

from conftest import write_image
from covid_cxr.cli import main
from covid_cxr.errors import ConfigError
from covid_cxr.imaging.images import sha256_file

NAME = "NGUYỄN^THỊ-LAN"
"""A name outside ASCII: it must come out exactly as the source stores it (UTF-8 there)."""
PATIENT = dict(patient_id="PIDX-40417", patient_name=NAME, birth_date="19580923", accession="ACCX-77121",
               institution="Hospital Of Secret Places", referring="QUILLFEATHER^ARMAND")


def _source(path: Path, **kwargs):
    return make_cxr_dicom(path, **{**PATIENT, "size": (96, 80), **kwargs})


def _outputs(folder: Path) -> tuple[list[Path], list[Path]]:
    return sorted(folder.glob("sr-*.dcm")), sorted(folder.glob("sc-*.dcm"))


def _band_and_image(pixels: np.ndarray, rows: int = 96, cols: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """The SC's text band and its image part (a rows x cols source, enlarged so its width is the SC's)."""
    height = round(rows * pixels.shape[1] / cols)
    assert 0 < height < pixels.shape[0]
    return pixels[:-height], pixels[-height:]


def _sr_items(sr) -> dict[str, object]:
    """Code meaning of each content item of the SR's root -> its value (text, code meaning, number or the item)."""
    found = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            found[name] = str(item.TextValue)
        elif item.ValueType == "CODE":
            found[name] = item.ConceptCodeSequence[0]
        elif item.ValueType == "NUM":
            found[name] = float(item.MeasuredValueSequence[0].NumericValue)
            found[name + " item"] = item
        else:
            found[name] = item
    return found


def assert_identifies_only_by_name_and_id(path: Path, source_kwargs: dict) -> None:
    """The file's bytes hold no PHI of the source but its patient's name and ID, and those only in (0010,0010) and
    (0010,0020)."""
    data = path.read_bytes()
    phi = phi_strings({**source_kwargs})
    name_parts = {NAME, *[p for p in NAME.split("^") if len(p) >= 3]}
    allowed = name_parts | {source_kwargs["patient_id"]}
    for value in phi:
        if value in allowed:
            continue
        for encoded in {value.encode("utf-8"), value.upper().encode("utf-8")}:
            assert encoded not in data, f"{value!r} found in {path.name}"
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == NAME and ds.PatientID == source_kwargs["patient_id"]
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.AccessionNumber == ""
    assert ds.ReferringPhysicianName == "" and ds.StudyDate == "" and "InstitutionName" not in ds
    assert "OtherPatientIDs" not in ds and "PatientAddress" not in ds
    del ds.PatientName, ds.PatientID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    rest = buf.getvalue()
    for value in phi:
        assert value.encode("utf-8") not in rest, f"{value!r} appears outside PatientName/PatientID in {path.name}"


def test_predict_writes_an_sr_and_an_sc_per_dicom_input_and_nothing_of_the_patient(tiny_run, tmp_path, capsys):
    src = tmp_path / "in" / "img0001.dcm"
    uids = _source(src, label="covid", seed=3)
    png = write_image(tmp_path / "in" / "plain.png", 1)
    out, csv = tmp_path / "dicom", tmp_path / "preds.csv"
    assert main(["predict", str(src), str(png), "--run", str(tiny_run), "--dicom-out", str(out), "--out", str(csv),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "DICOM results: 1 SR + 1 SC" in err and "no DICOM result for 1: not a DICOM file" in err
    (sr_path,), (sc_path,) = _outputs(out)
    rows = pd.read_csv(csv).set_index("path")
    assert rows.loc[str(png), "dicom_result"] == "no DICOM result: not a DICOM file"
    assert rows.loc[str(src), "dicom_result"] == f"{sr_path.name} {sc_path.name}"

    import highdicom as hd

    sr, sc = hd.sr.srread(sr_path), pydicom.dcmread(sc_path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    # filed in the source's study, as new series and instances; file names are the new SOP Instance UIDs
    for ds, path in ((sr, sr_path), (sc, sc_path)):
        assert ds.StudyInstanceUID == uids.study_uid and ds.StudyID == "1"
        assert ds.SeriesInstanceUID != uids.series_uid and ds.SOPInstanceUID != uids.sop_uid
        assert path.name.endswith(f"-{ds.SOPInstanceUID}.dcm")
        assert_identifies_only_by_name_and_id(path, PATIENT)
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.Modality == "SR"

    # the SR: numbers equal to predict's, the decision coded, the model's identity, the source referenced
    items = _sr_items(sr)
    row = rows.loc[str(src)]
    assert items["P(covid)"] == pytest.approx(row["prob_covid"], abs=1e-11)
    assert items["P(normal)"] == pytest.approx(row["prob_normal"], abs=1e-11)
    assert items["Decision threshold on P(covid)"] == pytest.approx(row["threshold"], abs=1e-11)
    in_scope = bool(row["in_scope"])
    assert items["Image in scope of the model"].CodeMeaning == ("Yes" if in_scope else "No")
    decision = items["Model decision"]
    assert decision.CodingSchemeDesignator == "99COVIDCXR"
    assert decision.CodeMeaning == (row["predicted_label"] if in_scope else "Out of scope: not a decision")
    assert items["Intended use"] == "research use only, not a diagnostic device"
    assert items["Algorithm Name"].startswith("covid-cxr densenet121")
    assert sha256_file(tiny_run / "best.pt") in items["Algorithm Version"]
    assert "Out-of-source performance estimate" not in items  # tiny_run has none
    ref = items["P(covid) item"].ContentSequence[0]
    assert ref.ValueType == "IMAGE" and ref.RelationshipType == "INFERRED FROM"
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uids.sop_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence
                  for i in s.ReferencedSOPSequence}
    assert evidence.StudyInstanceUID == uids.study_uid and referenced == {uids.sop_uid, sc.SOPInstanceUID}
    overlay = items["Grad-CAM overlay (research use only)"]
    assert overlay.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID

    # the SC: text burned into a band above the image, the Grad-CAM colours on it
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uids.sop_uid
    assert list(sc.PatientOrientation) == ["L", "F"] and "Grad-CAM" in sc.DerivationDescription
    pixels = sc.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape[:2]) >= 512
    band, image = _band_and_image(pixels)
    assert np.all(band == (255, 220, 0), axis=2).any(), "the yellow RESEARCH USE ONLY line is missing"
    from covid_cxr.deploy.api import load_run
    from covid_cxr.deploy.dicom_results import overlay_rgb

    cam = load_run(tiny_run, device="cpu").explain([src])[0]
    np.testing.assert_array_equal(image, overlay_rgb(cam.image, cam.heatmap))  # the image is the Grad-CAM overlay


def test_the_overlay_blends_the_heatmap_and_the_band_holds_the_text():
    from covid_cxr.deploy.dicom_results import BANNER, burn_in, overlay_rgb

    image = np.full((60, 50), 100, np.uint8)
    heat = np.zeros((60, 50), np.float32)
    heat[:30] = 1.0
    rgb = overlay_rgb(image, heat)
    assert rgb.shape == (768, 640, 3)
    assert np.ptp(rgb[:300].astype(int), axis=2).min() > 20  # colour where the heat is
    assert np.ptp(rgb[-300:].astype(int), axis=2).max() == 0 and (rgb[-300:] == 100).all()  # untouched elsewhere
    burned = burn_in(rgb, [BANNER, "a second line"])
    band = burned[:-768]
    assert band.shape[0] > 20 and (burned[-768:] == rgb).all()  # text above the image, never over it
    assert np.all(band == (255, 220, 0), axis=2).any() and np.all(band == (255, 255, 255), axis=2).any()
    narrow = burn_in(overlay_rgb(np.full((300, 40), 9, np.uint8), None), [BANNER])
    assert narrow.shape[1] == 512 and np.all(narrow[:60] == (255, 220, 0), axis=2).any()  # still legible width


def test_the_onnx_backend_writes_the_sc_without_a_heatmap_and_says_so(tiny_exported, tmp_path, capsys):
    src = tmp_path / "x.dcm"
    _source(src)
    out = tmp_path / "dicom"
    assert main(["predict", str(src), "--run", str(tiny_exported), "--backend", "onnx", "--dicom-out", str(out),
                 "--format", "csv", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "SC without heatmap: Grad-CAM needs the PyTorch checkpoint" in captured.err
    (sr_path,), (sc_path,) = _outputs(out)
    sc = pydicom.dcmread(sc_path)
    assert "without a heatmap" in sc.DerivationDescription and sc.BurnedInAnnotation == "YES"
    band, image = _band_and_image(sc.pixel_array)
    assert np.ptp(image.astype(int), axis=2).max() == 0  # grey: no heatmap
    assert np.all(band == (255, 220, 0), axis=2).any()  # the banner
    assert_identifies_only_by_name_and_id(sr_path, PATIENT)
    for phi in phi_strings(PATIENT):
        assert phi not in captured.out and phi not in captured.err


def test_an_out_of_scope_result_is_coded_as_no_decision_and_the_estimate_is_recorded(tiny_run, tmp_path):
    from covid_cxr.deploy.api import load_run
    from covid_cxr.deploy.dicom_results import ModelIdentity, Outcome, build_sr, decision_line, estimate_text, \
        read_source

    predictor = load_run(tiny_run, device="cpu")
    src_path = tmp_path / "x.dcm"
    _source(src_path)
    source = read_source(src_path)
    meta = predictor.meta.replace(estimate={"source": "crossval", "pooled_auc": 0.712, "ci95": [0.65, 0.77]})
    identity = dataclasses.replace(ModelIdentity.of(predictor), meta=meta, estimate=estimate_text(meta))
    probs = {"normal": 0.2, "covid": 0.8}
    for in_scope, code in ((True, "COVID"), (None, "COVID"), (False, "OUT-OF-SCOPE")):
        outcome = Outcome(probs, "covid", in_scope, 1.0, meta.explain_decision(probs, "covid", in_scope))
        sr = build_sr(identity, outcome, source, "1.2.3.4", "1.2.3.5")
        items = _sr_items(sr)
        assert items["Model decision"].CodeValue == code
        assert items["Image in scope of the model"].CodeMeaning == {True: "Yes", False: "No", None: "Unknown"}[in_scope]
        assert items["Out-of-source performance estimate"].startswith("ROC AUC 0.712 (95% CI 0.650-0.770)")
        line = decision_line(meta, outcome)
        if in_scope is False:
            assert items["Interpretation"].startswith("out of scope") and "not meaningful" in items["Interpretation"]
            assert line.startswith("OUT OF SCOPE - NO DECISION") and "not meaningful" in line
        else:
            assert line.startswith("covid-cxr decision: covid")
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        import highdicom as hd

        hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(buf.getvalue())))


def test_a_source_with_burned_in_text_gets_an_sr_but_no_sc(tiny_run, tmp_path, capsys):
    src = tmp_path / "x.dcm"
    _source(src)
    ds = pydicom.dcmread(src)
    ds.BurnedInAnnotation = "YES"  # its pixels may show the patient's name: they are never copied
    ds.save_as(src)
    out = tmp_path / "dicom"
    assert main(["predict", str(src), "--run", str(tiny_run), "--dicom-out", str(out), "--format", "csv",
                 "--no-progress"]) == 0
    srs, scs = _outputs(out)
    assert len(srs) == 1 and scs == []
    assert "no SC: the source's pixels carry burned-in text" in capsys.readouterr().err
    assert "Grad-CAM overlay (research use only)" not in _sr_items(pydicom.dcmread(srs[0]))


def test_unreadable_and_lateral_dicom_inputs_get_no_result_and_no_crash(tiny_run, tmp_path, capsys):
    lateral = tmp_path / "lat.dcm"
    _source(lateral, view="LL")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    out = tmp_path / "dicom"
    assert main(["predict", str(lateral), str(broken), "--run", str(tiny_run), "--dicom-out", str(out),
                 "--skip-unreadable", "--format", "json", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "DICOM results: 0 SR + 0 SC" in captured.err and "no DICOM result for 2: unreadable" in captured.err
    assert list(out.iterdir()) == []
    for phi in phi_strings(PATIENT):
        assert phi not in captured.out and phi not in captured.err


@pytest.mark.parametrize("extra, needle", [
    (["--stow", "http://pacs:8042/dicom-web"], "--stow sends the DICOM results: give --dicom-out"),
    (["--dicom-out", "D", "--stow", "ftp://user:hunter2@pacs/dicom-web"], "http:// or https://"),
])
def test_stow_options_are_checked(extra, needle, tmp_path, capsys):
    img = write_image(tmp_path / "a.png", 1)
    assert main(["predict", str(img), "--run", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "hunter2" not in err


def test_a_failed_stow_is_one_error_that_keeps_the_files_and_the_predictions(tiny_run, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "x.dcm"
    _source(src)
    out, csv = tmp_path / "dicom", tmp_path / "preds.csv"
    assert main(["predict", str(src), "--run", str(tiny_run), "--dicom-out", str(out), "--stow",
                 f"http://127.0.0.1:{port}/dicom-web", "--out", str(csv), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the PACS" in err and f"the DICOM results are in {out} and the predictions in {csv}" in err
    assert len(list(out.glob("*.dcm"))) == 2
    rows = pd.read_csv(csv)  # written before the send: a PACS that is down costs no predictions
    assert rows["path"].tolist() == [str(src)] and rows["dicom_result"][0].startswith("sr-")


def test_listen_options_are_checked():
    from covid_cxr.deploy.options import ListenConfig

    assert ListenConfig(run="r", send_to="ORTHANC@127.0.0.1:4242").destination == ("ORTHANC", "127.0.0.1", 4242)
    assert ListenConfig(run="r", send_to="PACS@[::1]:104").destination == ("PACS", "::1", 104)
    for bad, needle in ((dict(), "somewhere to put the results"),
                        (dict(send_to="ORTHANC:4242"), "AET@HOST:PORT"),
                        (dict(send_to="ORTHANC@host:70000"), "between 1 and 65535"),
                        (dict(dicom_out="d", ae_title="A" * 17), "not an AE title"),
                        (dict(dicom_out="d", callers=("BAD\\AE",)), "not an AE title"),
                        (dict(dicom_out="d", queue_size=0), "--queue-size"),
                        (dict(dicom_out="d", max_instances=-1), "--max-instances"),
                        (dict(stow="pacs:8042"), "http:// or https://")):
        with pytest.raises(ConfigError, match=needle):
            ListenConfig(run="r", **bad)


# ----------------------------------------------------------------------------- into a real PACS (Orthanc)

def test_predict_stows_the_results_into_the_source_study_in_orthanc(tiny_run, fresh_orthanc, tmp_path, capsys):
    orthanc = fresh_orthanc
    src = tmp_path / "x.dcm"
    uids = _source(src, label="covid")
    source_id = orthanc.upload(src)
    out = tmp_path / "dicom"
    assert main(["predict", str(src), "--run", str(tiny_run), "--dicom-out", str(out), "--stow", orthanc.dicomweb,
                 "--format", "csv", "--no-progress"]) == 0
    assert "2 sent with STOW-RS" in capsys.readouterr().err
    assert len(orthanc.get_json("/patients")) == 1 and len(orthanc.get_json("/studies")) == 1  # the same study
    results = [i for i in orthanc.instances() if i != source_id]
    assert len(results) == 2
    by_class = {orthanc.instance_tags(i)["SOPClassUID"]: i for i in results}
    assert set(by_class) == {pydicom.uid.ComprehensiveSRStorage, pydicom.uid.SecondaryCaptureImageStorage}
    for instance in results:
        tags = orthanc.instance_tags(instance)
        assert tags["StudyInstanceUID"] == uids.study_uid and tags["PatientID"] == PATIENT["patient_id"]
        stored = tmp_path / f"stored-{instance}.dcm"
        stored.write_bytes(orthanc.instance_file(instance))
        assert_identifies_only_by_name_and_id(stored, PATIENT)
    import highdicom as hd

    sr = hd.sr.srread(tmp_path / f"stored-{by_class[pydicom.uid.ComprehensiveSRStorage]}.dcm")
    assert _sr_items(sr)["P(covid) item"].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == uids.sop_uid


# ----------------------------------------------------------------------------- nothing of the source on the terminal

BARE_NAME = "ZEBEDIAH QUUXWORTHY"
"""A Patient's Name without a '^' (as many PACS store it): highdicom warns about such a name, quoting it."""
_ANY_UID = r"\b\d+(?:\.\d+){4,}\b"
"""Anything that looks like a UID (five or more dotted components)."""


def leading_zero_uids() -> dict[str, str]:
    """Study, series and SOP Instance UIDs with a component that starts with a zero (invalid, and common): pydicom
    warns about such a UID, quoting it."""
    tail = pydicom.uid.generate_uid()[len("1.2.826.0.1.3680043.8.498."):]
    return {f"{kind}_uid": f"1.2.840.0123.{n}.{tail}" for n, kind in enumerate(("study", "series", "sop"), 5)}


def assert_quiet_about(text: str, name: str, uids: dict[str, str]) -> None:
    """``text`` (a subprocess's stdout and stderr) names neither the patient nor any UID."""
    for part in {name, *name.split()}:
        assert part not in text, f"the patient's name ({part!r}) is on the terminal:\n{text[-3000:]}"
    for uid in uids.values():
        assert uid not in text, f"a source UID is on the terminal:\n{text[-3000:]}"
    assert not re.search(_ANY_UID, text), f"a UID is on the terminal:\n{text[-3000:]}"


@pytest.mark.slow  # a subprocess or a 512 px PSPNet or a full report: ~7-14 s; make test-slow runs it
def test_predict_prints_no_name_and_no_uid_of_an_odd_source(tiny_run, tmp_path):
    """A caret-less name and UIDs with leading zeros make highdicom and pydicom warn, quoting them; a warning goes to
    stderr past any log setting, so this runs predict in a subprocess and reads what it printed."""
    import os
    import subprocess
    import sys

    from covid_cxr.deploy.dicom_results import quiet_pydicom

    src = tmp_path / "in" / "odd.dcm"
    uids = leading_zero_uids()
    with quiet_pydicom():  # writing it: pydicom warns here too
        _source(src, patient_name=BARE_NAME, label="covid", **uids)
    out, csv = tmp_path / "dicom", tmp_path / "preds.csv"
    env = {**os.environ, "COVID_CXR_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "covid_cxr.cli", "predict", str(src), "--run", str(tiny_run),
                           "--dicom-out", str(out), "--out", str(csv), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DICOM results: 1 SR + 1 SC" in done.stderr
    assert_quiet_about(done.stdout + done.stderr, BARE_NAME, uids)
    (sr_path,), (sc_path,) = _outputs(out)
    for path in (sr_path, sc_path):  # the outputs still identify the patient and the study as the source does
        with quiet_pydicom():
            ds = pydicom.dcmread(path)
            assert str(ds.PatientName) == BARE_NAME and ds.StudyInstanceUID == uids["study_uid"]
