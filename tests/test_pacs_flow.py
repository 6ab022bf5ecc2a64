"""A hospital's whole path through the command line, against a real Orthanc (tests/orthanc.py):

studies carrying PHI in the PACS -> ``data build --source dicomweb=`` with a labels file -> ``evaluate --split all``
(local validation) -> ``calibrate`` (a new model version) -> ``predict --dicom-out --stow`` -> the SR and SC in the
source studies, and not one PHI string in any file written outside the DICOM store or in anything printed.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pydicom
from dicom_factory import make_cxr_dicom, phi_strings

from covid_cxr.cli import main

PER_CLASS = 10  # calibrate needs at least 10 images of each class (its minimum count)


def _studies(root: Path) -> tuple[list[dict], list[Path], list[str]]:
    rows, files, phi = [], [], []
    for i in range(2 * PER_CLASS):
        label = "covid" if i % 2 else "normal"
        kw = dict(patient_id=f"HOSP-MRN-{83000 + i}", patient_name=f"PHIFAMILY{i:02d}^PHIGIVEN{i:02d}",
                  birth_date=f"19{40 + i}0615", accession=f"HACC-{51000 + i}", label=label, seed=100 + i,
                  size=(96, 96), institution="Phi Memorial Infirmary", referring="PHIREFERRER^PHIDOC")
        f = root / f"img-{i:02d}.dcm"  # predict names its inputs by path: these names are the user's choice
        make_cxr_dicom(f, **kw)
        files.append(f)
        phi += phi_strings(kw)
        rows.append({"AccessionNumber": kw["accession"], "label": label})
    return rows, files, sorted(set(phi))


def _grep(root: Path, needles: list[str], skip: Path | None = None) -> list[tuple[str, str]]:
    hits = []
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        hits += [(str(p), n) for n in needles if n.lower() in str(p).lower()]
        if p.is_file():
            data = p.read_bytes().lower()
            hits += [(str(p), n) for n in needles if n.lower().encode() in data]
    return hits


def test_a_hospital_measures_the_model_on_its_pacs_and_gets_dicom_results_back(tiny_run, fresh_orthanc, tmp_path,
                                                                                capsys, caplog):
    orthanc = fresh_orthanc
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval-*", "audit-*", "report.html", ".lock"))
    rows, files, phi = _studies(tmp_path / "modality")
    for f in files:
        orthanc.upload(f)
    labels = tmp_path / "labels.csv"  # the hospital's own file (it names accession numbers): outside the outputs
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["AccessionNumber", "label"])
        w.writeheader()
        w.writerows(rows)
    work = tmp_path / "work"
    local, store = work / "local", work / "local.dicom"

    assert main(["data", "build", "--source", f"dicomweb={orthanc.dicomweb}", "--labels", str(labels),
                 "--out", str(local), "--test-per-class", "2", "--workers", "1", "--no-progress",
                 "--no-dedup"]) == 0  # synthetic chests share one template: distinct ones can look like copies
    man = pd.read_csv(local / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(man) == 2 * PER_CLASS and man["patient_id"].nunique() == 2 * PER_CLASS

    assert main(["evaluate", "--run", str(run), "--data", str(local), "--split", "all", "--bootstrap", "100",
                 "--device", "cpu"]) == 0
    metrics = json.loads((run / "eval-all" / "metrics.json").read_text())
    lv = metrics["local_validation"]
    assert lv is not None and lv["protocol"]["images"] == 2 * PER_CLASS
    assert lv["at_model_threshold"]["roc_auc_ci95"] is not None
    assert set(lv["subgroups"]["manufacturer"]) == {"ACME Radiography"}

    newrun = work / "run-local"
    assert main(["calibrate", "--run", str(run), "--data", str(local), "--out", str(newrun),
                 "--device", "cpu"]) == 0
    results = work / "results"
    assert main(["predict", str(tmp_path / "modality"), "--run", str(newrun), "--dicom-out", str(results),
                 "--stow", orthanc.dicomweb, "--format", "csv", "--out", str(work / "predictions.csv"),
                 "--no-progress"]) == 0
    # every source study got its SR and SC back, referencing its own instance
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).StudyInstanceUID for f in files}
    srs = [orthanc.instance_tags(i) for i in orthanc.instances()
           if orthanc.instance_tags(i)["SOPClassUID"] == pydicom.uid.ComprehensiveSRStorage]
    scs = [orthanc.instance_tags(i) for i in orthanc.instances()
           if orthanc.instance_tags(i)["SOPClassUID"] == pydicom.uid.SecondaryCaptureImageStorage]
    assert len(srs) == len(scs) == len(files)
    assert {t["StudyInstanceUID"] for t in srs} == set(sources.values())
    for f in sorted(results.glob("sr-*.dcm")):
        sr = pydicom.dcmread(f)
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        uids = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
        assert ref and any(sources.get(u) == sr.StudyInstanceUID for u in uids)

    # nothing of the patients anywhere but the DICOM store and the DICOM results (which identify the patient by
    # name and id only: tests/test_dicom_results.py), nor in anything printed or logged
    out = capsys.readouterr()
    printed = out.out + out.err + caplog.text
    assert [s for s in phi if s.lower() in printed.lower()] == []
    hits = _grep(work, phi, skip=store)
    assert hits and {Path(f).parent for f, _ in hits} == {results}, hits  # the SR/SC: name and id, nothing else
    assert _grep(local, phi) == [] and _grep(newrun, phi) == [] and _grep(run / "eval-all", phi) == []
    preds = (work / "predictions.csv").read_text()
    assert [s for s in phi if s.lower() in preds.lower()] == []
