"""Tests for covid_cxr.data.sources: each public source's layout read into rows, every unused file or
metadata row accounted for with a reason; integration checks against the real collection."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from conftest import REAL_SOURCES, write_image
from covid_cxr.data.sources import (LABELS, PATIENT_METADATA_PRIORITY, READERS, SOURCE_COLUMNS, SourceRead,
                                    label_from_finding, mask_of, mooney_patient, read_actualmed, read_cohen,
                                    read_cxnet, read_figure1, read_folder, read_mooney, read_openist,
                                    read_radiography, read_source, view_kind)
from covid_cxr.errors import SourceError
from covid_cxr.imaging.images import is_image_file

# Header line of the real Cohen metadata.csv (June 2020), byte for byte, trailing empty column included.
COHEN_HEADER = ("patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
                "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
                "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,"
                "other_notes,")
ACTUALMED_HEADER = ("patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,imagename,"
                    "artifacts/distortion,notes")
FIGURE1_HEADER = ("patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,"
                  "artifacts/distortion,notes")
# Header line of COVID-CXNet's metadata.csv (armiro/COVID-CXNet, without its byte-order mark).
CXNET_HEADER = ("filename,patient_id,sex,age,view,label,pcr_test,survival,location,admission_offset,symptom_offset,"
                "also_had_ct,has_fever,has_cough,has_dyspnea,has_diarrhea,spo2,other_symptoms,medical_background,"
                "opacification,other,is_bilateral,url")


def _write_csv(path: Path, header: str, rows: list[dict], encoding: str = "utf-8", newline: str = "\n") -> Path:
    """Write rows (dicts with a subset of the header's columns) under a verbatim header line."""
    columns = header.split(",")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(header + newline)
        w = csv.writer(f, lineterminator=newline)
        for row in rows:
            unknown = set(row) - set(columns)
            assert not unknown, unknown
            w.writerow([row.get(c, "") for c in columns])
    return path


def _assert_well_formed(result: SourceRead) -> None:
    assert list(result.images.columns) == SOURCE_COLUMNS
    assert set(result.images["label"]) <= set(LABELS)
    assert (result.images["source"] == result.source).all()
    assert result.images["path"].is_unique
    # Every image lies inside the source's root folder (manifest.csv stores paths relative to it).
    assert result.root is not None and result.root.is_absolute() and result.root == result.root.resolve()
    for p in result.images["path"]:
        assert Path(p).is_absolute() and Path(p).is_file(), p
        assert result.root in Path(p).resolve().parents, p
    for d in result.dropped:
        assert set(d) == {"source", "item", "reason"}
        assert d["source"] == result.source
        assert d["item"] and d["reason"].strip()


def _dropped_files(result: SourceRead) -> dict[Path, str]:
    """Dropped items that are files on disk -> reason."""
    out = {}
    for d in result.dropped:
        p = Path(d["item"])
        if p.is_file():
            out[p.resolve()] = d["reason"]
    return out


def _kept(result: SourceRead) -> dict[str, dict]:
    """Kept rows keyed by file name."""
    return {Path(r["path"]).name: r for r in result.images.to_dict("records")}


# --------------------------------------------------------------------------- label / view tables


@pytest.mark.parametrize("finding,label", [
    ("COVID-19", "covid"), ("COVID-19, ARDS", "covid"), ("covid19", "covid"), ("SARS-CoV-2", "covid"),
    ("  COVID-19 ", "covid"), ("No Finding", "normal"), ("No finding", "normal"), ("Normal", "normal"),
    ("NORMAL", "normal"), ("no   finding", "normal"), ("Pneumonia", "pneumonia"), ("Viral Pneumonia", "pneumonia"),
    ("Bacterial", "pneumonia"), ("Streptococcus", "pneumonia"), ("E.Coli", "pneumonia"), ("SARS", "pneumonia"),
    ("Pneumocystis", "pneumonia"), ("Mycoplasma Bacterial Pneumonia", "pneumonia"), ("ARDS", "other"),
    ("Lipoid", "other"), ("Lung Opacity", "other"), ("todo", None), ("", None), ("  ", None), ("nan", None),
    ("unknown", None),
])
def test_label_from_finding(finding: str, label: str | None) -> None:
    assert label_from_finding(finding) == label


@pytest.mark.parametrize("view,kind", [
    ("PA", "frontal"), ("AP", "frontal"), ("AP Supine", "frontal"), ("ap supine", "frontal"),
    ("AP_Supine", "frontal"), ("AP semi erect", "frontal"), ("AP erect", "frontal"), (" PA ", "frontal"),
    ("L", "non-frontal"), ("Lateral", "non-frontal"), ("Axial", "non-frontal"), ("Coronal", "non-frontal"),
    ("", "unknown"), ("nan", "unknown"), ("oblique?", "unknown"),
])
def test_view_kind(view: str, kind: str) -> None:
    assert view_kind(view) == kind


@pytest.mark.parametrize("name,patient", [
    ("IM-0117-0001.jpeg", "IM-0117"), ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-0381"),
    ("person1000_bacteria_2931.jpeg", "person1000"), ("person1000_virus_1681.jpeg", "person1000"),
    ("scan.jpeg", None),
])
def test_mooney_patient(name: str, patient: str | None) -> None:
    assert mooney_patient(name) == patient


def test_unknown_source_name(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown source 'nih'"):
        read_source("nih", tmp_path)


# --------------------------------------------------------------------------- Cohen


def _cohen_row(pid: str, finding: str, view: str, filename: str, modality: str = "X-ray") -> dict:
    return {"patientid": pid, "finding": finding, "view": view, "modality": modality, "folder": "images",
            "filename": filename, "clinical_notes": "notes, with a comma"}


COHEN_ROWS = [
    _cohen_row("1", "COVID-19", "PA", "covid_pa.jpg"),
    _cohen_row("1", "COVID-19", "PA", "covid_pa_day3.JPG"),
    _cohen_row("2", "COVID-19, ARDS", "AP Supine", "covid_ards.png"),
    _cohen_row("3", "No Finding", "PA", "normal_pa.PNG"),
    _cohen_row("4", "Pneumonia", "PA", "pneumonia.jpeg"),
    _cohen_row("5", "ARDS", "AP", "ards.png"),
    _cohen_row("6", "todo", "PA", "todo.png"),
    _cohen_row("1", "COVID-19", "L", "covid_lateral.jpg"),
    _cohen_row("7", "COVID-19", "Axial", "ct_axial.png", modality="CT"),
    _cohen_row("8", "COVID-19", "PA", "missing.png"),
    _cohen_row("285", "COVID-19", "AP", "000001-24.jpg"),
    _cohen_row("339", "COVID-19", "AP", "000001-24.jpg"),
]
COHEN_KEPT = {  # file -> (label, view, patient_id)
    "covid_pa.jpg": ("covid", "PA", "1"),
    "covid_pa_day3.JPG": ("covid", "PA", "1"),
    "covid_ards.png": ("covid", "AP Supine", "2"),
    "normal_pa.PNG": ("normal", "PA", "3"),
    "pneumonia.jpeg": ("pneumonia", "PA", "4"),
    "ards.png": ("other", "AP", "5"),
    "000001-24.jpg": ("covid", "AP", "285;339"),
}
COHEN_DROPPED_FILES = {"todo.png": "todo", "covid_lateral.jpg": "non-frontal", "ct_axial.png": "CT",
                       "unlisted.png": "not listed", ".DS_Store": "not an image"}


@pytest.fixture()
def cohen_root(tmp_path: Path) -> Path:
    root = tmp_path / "covid-chestxray-dataset"
    _write_csv(root / "metadata.csv", COHEN_HEADER, COHEN_ROWS)
    names = {r["filename"] for r in COHEN_ROWS} - {"missing.png"}
    for i, name in enumerate(sorted(names)):
        write_image(root / "images" / name, seed=i)
    write_image(root / "images" / "unlisted.png", seed=99)
    (root / "images" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def test_cohen_header_constant_shape() -> None:
    cols = COHEN_HEADER.split(",")
    assert cols[-1] == "" and {"patientid", "finding", "view", "modality", "folder", "filename"} <= set(cols)


def test_cohen_labels_views_patients(cohen_root: Path) -> None:
    result = read_cohen(cohen_root)
    _assert_well_formed(result)
    assert result.source == "cohen"
    kept = _kept(result)
    assert set(kept) == set(COHEN_KEPT)
    for name, (label, view, patient) in COHEN_KEPT.items():
        assert (kept[name]["label"], kept[name]["view"], kept[name]["patient_id"]) == (label, view, patient), name
    assert kept["covid_ards.png"]["finding"] == "COVID-19, ARDS"
    assert kept["normal_pa.PNG"]["finding"] == "No Finding"
    assert (result.images["source_split"] == "").all()


def test_cohen_every_row_and_file_accounted_for(cohen_root: Path) -> None:
    result = read_cohen(cohen_root)
    kept_files = {Path(p) for p in result.images["path"]}
    dropped_files = _dropped_files(result)
    on_disk = {f.resolve() for f in (cohen_root / "images").iterdir()}
    # Files: every file in images/ is either kept or dropped, never both.
    assert kept_files | set(dropped_files) == on_disk
    assert not kept_files & set(dropped_files)
    by_name = {p.name: reason for p, reason in dropped_files.items()}
    assert set(by_name) == set(COHEN_DROPPED_FILES)
    for name, word in COHEN_DROPPED_FILES.items():
        assert word.lower() in by_name[name].lower(), (name, by_name[name])
    # Rows: kept + rows dropped by row number + rows dropped through their (existing) file.
    row_items = [d for d in result.dropped if "metadata.csv:row" in d["item"]]
    file_rows = [d for d in result.dropped if Path(d["item"]).is_file() and "not listed" not in d["reason"]
                 and "not an image" not in d["reason"]]
    assert len(result.images) + len(row_items) + len(file_rows) == len(COHEN_ROWS)
    reasons = " | ".join(d["reason"] for d in row_items)
    assert "missing.png" in reasons and "missing" in reasons
    merged = [d for d in row_items if "000001-24.jpg" in d["item"]]
    assert len(merged) == 1 and "already listed" in merged[0]["reason"]
    # The row numbers are the CSV line numbers (header = line 1).
    missing_line = 2 + [r["filename"] for r in COHEN_ROWS].index("missing.png")
    assert any(d["item"].endswith(f"metadata.csv:row {missing_line}") for d in row_items)


def test_cohen_via_read_source_and_unknown_view_note(tmp_path: Path) -> None:
    root = tmp_path / "cohen"
    _write_csv(root / "metadata.csv", COHEN_HEADER, [_cohen_row("9", "No Finding", "", "a.png"),
                                                      _cohen_row("9", "No Finding", "PA", "b.png")])
    write_image(root / "images" / "a.png", 1)
    write_image(root / "images" / "b.png", 2)
    result = read_source("cohen", root)
    kept = _kept(result)
    assert kept["a.png"]["view"] == "unknown" and kept["b.png"]["view"] == "PA"
    assert any("1 images have no view" in n for n in result.notes)


def test_cohen_missing_column_names_file_and_column(tmp_path: Path) -> None:
    root = tmp_path / "cohen"
    header = COHEN_HEADER.replace("finding,", "diagnosis,")
    _write_csv(root / "metadata.csv", header, [{"patientid": "1", "diagnosis": "COVID-19", "view": "PA",
                                                "modality": "X-ray", "folder": "images", "filename": "a.png"}])
    write_image(root / "images" / "a.png", 1)
    with pytest.raises(SourceError) as err:
        read_cohen(root)
    msg = str(err.value)
    assert str(root / "metadata.csv") in msg
    assert "'finding'" in msg


def test_cohen_missing_folder_and_metadata(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_cohen(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError) as err:
        read_cohen(tmp_path / "empty")
    assert "metadata.csv" in str(err.value)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "folder column", "symlink"])
def test_cohen_image_path_outside_the_source_is_refused(tmp_path: Path, how: str) -> None:
    """metadata.csv cannot make the build read files outside the source folder (``../``, absolute paths,
    the folder column, or a link in images/ pointing out)."""
    outside = write_image(tmp_path / "outside.png", seed=40)
    root = tmp_path / "sources" / "cohen"
    write_image(root / "images" / "inside.png", seed=41)
    row = {"dotdot": _cohen_row("2", "COVID-19", "PA", "../../../outside.png"),
           "absolute": _cohen_row("2", "COVID-19", "PA", str(outside)),
           "folder column": {**_cohen_row("2", "COVID-19", "PA", "outside.png"), "folder": "../.."},
           "symlink": _cohen_row("2", "COVID-19", "PA", "link.png")}[how]
    if how == "symlink":
        (root / "images" / "link.png").symlink_to(outside)
    _write_csv(root / "metadata.csv", COHEN_HEADER, [_cohen_row("1", "COVID-19", "PA", "inside.png"), row])
    if how != "symlink":  # the row really names that file
        assert (root / row["folder"] / row["filename"]).resolve() == outside.resolve()
    result = read_cohen(root)
    _assert_well_formed(result)
    assert list(_kept(result)) == ["inside.png"]
    refused = [d["item"] for d in result.dropped if "outside the source folder" in d["reason"]]
    # The row is refused; a link in images/ pointing out is also refused as a file (never followed).
    expected = [f"{root / 'metadata.csv'}:row 3"] + ([str(root / "images" / "link.png")] if how == "symlink" else [])
    assert refused == expected
    assert str(outside) not in {d["item"] for d in result.dropped}


def test_actualmed_image_path_outside_the_source_is_refused(tmp_path: Path) -> None:
    outside = write_image(tmp_path / "outside.png", seed=42)
    root = tmp_path / "actualmed"
    write_image(root / "images" / "a.png", seed=43)
    rows = [{"patientid": "A1", "finding": "COVID-19", "view": "AP", "modality": "X-ray", "imagename": "a.png"},
            {"patientid": "A2", "finding": "COVID-19", "view": "AP", "modality": "X-ray",
             "imagename": "../../outside.png"},
            {"patientid": "A3", "finding": "COVID-19", "view": "AP", "modality": "X-ray", "imagename": str(outside)}]
    _write_csv(root / "metadata.csv", ACTUALMED_HEADER, rows)
    result = read_actualmed(root)
    _assert_well_formed(result)
    assert list(_kept(result)) == ["a.png"]
    refused = sorted(d["item"] for d in result.dropped if "outside the source folder" in d["reason"])
    assert refused == [f"{root / 'metadata.csv'}:row 3", f"{root / 'metadata.csv'}:row 4"]


# --------------------------------------------------------------------------- Actualmed, Figure1


def test_actualmed(tmp_path: Path) -> None:
    root = tmp_path / "Actualmed-COVID-chestxray-dataset"
    rows = [
        {"patientid": "ANON1", "finding": "COVID-19", "view": "AP", "modality": "X-ray", "imagename": "CR.1.2.3.png"},
        {"patientid": "ANON2", "finding": "No finding", "view": "PA", "modality": "X-ray", "imagename": "CR.1.2.4.png"},
        {"patientid": "ANON2", "finding": "No finding", "view": "PA", "modality": "X-ray",
         "imagename": "CR.1.2.5.png"},
        {"patientid": "ANON3", "finding": "", "view": "AP", "modality": "X-ray", "imagename": "CR.1.2.6.png",
         "notes": "Inconclusive"},
        {"patientid": "ANON4", "finding": "COVID-19", "view": "AP", "modality": "X-ray", "imagename": ""},
    ]
    _write_csv(root / "metadata.csv", ACTUALMED_HEADER, rows, newline="\r\n")
    assert b"\r\n" in (root / "metadata.csv").read_bytes()
    for i, name in enumerate(["CR.1.2.3.png", "CR.1.2.4.png", "CR.1.2.5.png", "CR.1.2.6.png"]):
        write_image(root / "images" / name, seed=i)
    result = read_source("actualmed", root)
    _assert_well_formed(result)
    assert result.source == "actualmed"
    kept = _kept(result)
    assert {k: (v["label"], v["patient_id"], v["view"]) for k, v in kept.items()} == {
        "CR.1.2.3.png": ("covid", "ANON1", "AP"),
        "CR.1.2.4.png": ("normal", "ANON2", "PA"),
        "CR.1.2.5.png": ("normal", "ANON2", "PA"),
    }
    dropped = _dropped_files(result)
    assert {p.name for p in dropped} == {"CR.1.2.6.png"}
    assert "unlabelled" in next(iter(dropped.values()))
    assert any("no image file" in d["reason"] for d in result.dropped if "row 6" in d["item"])
    assert len(result.images) + len(result.dropped) == len(rows)
    assert not any("encoded" in n for n in result.notes)


def test_actualmed_requires_imagename(tmp_path: Path) -> None:
    root = tmp_path / "am"
    _write_csv(root / "metadata.csv", FIGURE1_HEADER, [{"patientid": "A", "finding": "COVID-19"}])
    (root / "images").mkdir()
    with pytest.raises(SourceError, match="imagename"):
        read_actualmed(root)


def test_figure1_cp1252_and_image_by_patientid(tmp_path: Path) -> None:
    root = tmp_path / "Figure1-COVID-chestxray-dataset"
    rows = [
        {"patientid": "COVID-00001", "finding": "COVID-19", "view": "AP erect", "modality": "X-ray",
         "notes": "patient’s O2 saturation 58% – café"},
        {"patientid": "COVID-00003a", "finding": "COVID-19", "view": "AP", "modality": "X-ray"},
        {"patientid": "COVID-00003b", "finding": "COVID-19", "view": "", "modality": "X-ray"},
        {"patientid": "COVID-00010", "finding": "No finding", "view": "PA", "modality": "X-ray"},
        {"patientid": "COVID-00011", "finding": "Pneumonia", "view": "", "modality": "X-ray"},
        {"patientid": "COVID-00012", "finding": "", "view": "AP erect", "modality": "X-ray",
         "notes": "résumé unknown"},
        {"patientid": "COVID-00013", "finding": "COVID-19", "view": "PA", "modality": "X-ray"},  # no file
    ]
    _write_csv(root / "metadata.csv", FIGURE1_HEADER, rows, encoding="cp1252")
    raw = (root / "metadata.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    files = {"COVID-00001": ".jpg", "COVID-00003a": ".jpg", "COVID-00003b": ".jpg", "COVID-00010": ".png",
             "COVID-00011": ".jpg", "COVID-00012": ".png"}
    for i, (pid, ext) in enumerate(files.items()):
        write_image(root / "images" / f"{pid}{ext}", seed=i)
    result = read_source("figure1", root)
    _assert_well_formed(result)
    assert result.source == "figure1"
    assert any("cp1252" in n for n in result.notes)
    kept = _kept(result)
    assert {k: v["label"] for k, v in kept.items()} == {
        "COVID-00001.jpg": "covid", "COVID-00003a.jpg": "covid", "COVID-00003b.jpg": "covid",
        "COVID-00010.png": "normal", "COVID-00011.jpg": "pneumonia"}
    assert kept["COVID-00001.jpg"]["view"] == "AP erect"
    assert kept["COVID-00003b.jpg"]["view"] == "unknown"
    # The letter suffix numbers the images of one patient (COVID-00003a, COVID-00003b).
    assert kept["COVID-00003a.jpg"]["patient_id"] == kept["COVID-00003b.jpg"]["patient_id"] == "COVID-00003"
    assert kept["COVID-00010.png"]["patient_id"] == "COVID-00010"
    assert {p.name for p in _dropped_files(result)} == {"COVID-00012.png"}
    missing = [d for d in result.dropped if "COVID-00013" in d["reason"]]
    assert len(missing) == 1 and "missing" in missing[0]["reason"]
    assert len(result.images) + len(result.dropped) == len(rows)


def test_figure1_utf8_has_no_encoding_note(tmp_path: Path) -> None:
    root = tmp_path / "f1"
    _write_csv(root / "metadata.csv", FIGURE1_HEADER,
               [{"patientid": "COVID-1", "finding": "COVID-19", "view": "PA", "modality": "X-ray", "notes": "é"}])
    write_image(root / "images" / "COVID-1.jpg", 0)
    result = read_figure1(root)
    assert len(result.images) == 1
    assert not any("encoded" in n for n in result.notes)


# --------------------------------------------------------------------------- Mooney


MOONEY_FILES = {  # relative path -> (label, finding word, patient, split)
    "chest_xray/train/NORMAL/IM-0117-0001.jpeg": ("normal", "Normal", "IM-0117", "train"),
    "chest_xray/train/NORMAL/NORMAL2-IM-0381-0001.jpeg": ("normal", "Normal", "NORMAL2-IM-0381", "train"),
    "chest_xray/train/PNEUMONIA/person1000_bacteria_2931.jpeg": ("pneumonia", "Bacterial", "person1000", "train"),
    "chest_xray/test/PNEUMONIA/person1000_virus_1681.jpeg": ("pneumonia", "Viral", "person1000", "test"),
    "chest_xray/val/NORMAL/IM-0120-0001.jpeg": ("normal", "Normal", "IM-0120", "val"),
    "chest_xray/val/PNEUMONIA/person3_virus_15.jpeg": ("pneumonia", "Viral", "person3", "val"),
}


@pytest.fixture()
def mooney_root(tmp_path: Path) -> Path:
    root = tmp_path / "chest-xray-pneumonia"
    for i, rel in enumerate(MOONEY_FILES):
        write_image(root / rel, seed=i, size=(48, 40))
    (root / "chest_xray" / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "chest_xray" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    # A macOS archive copy: AppleDouble resource forks and even a decodable image must be ignored.
    mac = root / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    mac.mkdir(parents=True)
    (mac / "._IM-0117-0001.jpeg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    write_image(mac / "IM-0999-0001.jpeg", seed=50)
    return root


def test_mooney(mooney_root: Path) -> None:
    result = read_source("mooney", mooney_root)
    _assert_well_formed(result)
    assert result.source == "mooney"
    rel = {str(Path(r["path"]).relative_to(mooney_root.resolve())): r for r in result.images.to_dict("records")}
    assert set(rel) == set(MOONEY_FILES)
    for path, (label, word, patient, split) in MOONEY_FILES.items():
        row = rel[path]
        assert row["label"] == label and row["patient_id"] == patient and row["source_split"] == split, path
        assert word.lower() in row["finding"].lower()
    assert not any("__MACOSX" in p for p in result.images["path"])
    dropped = _dropped_files(result)
    assert {p.name for p in dropped} == {".DS_Store"} and len(dropped) == 2
    assert not any("__MACOSX" in d["item"] for d in result.dropped)
    assert any("pediatric" in n for n in result.notes)
    # person1000 has images in two original splits: one patient all the same.
    assert (result.images["patient_id"] == "person1000").sum() == 2


def test_mooney_unparsed_names_are_own_patients(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_image(root / "chest_xray" / "train" / "NORMAL" / "scan_a.jpeg", 1)
    write_image(root / "chest_xray" / "train" / "NORMAL" / "scan_b.jpeg", 2)
    result = read_mooney(root)
    assert sorted(result.images["patient_id"]) == ["scan_a", "scan_b"]
    assert any("2 file names did not match" in n for n in result.notes)


def test_mooney_without_class_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "m" / "images" / "x.jpeg", 1)
    with pytest.raises(SourceError, match="NORMAL"):
        read_mooney(tmp_path / "m")
    with pytest.raises(SourceError):
        read_mooney(tmp_path / "absent")


# --------------------------------------------------------------------------- Radiography


def _check_radiography(result: SourceRead, expected: dict[str, tuple[str, str]]) -> None:
    """expected: file name -> (label, class folder name)."""
    _assert_well_formed(result)
    assert result.source == "radiography"
    kept = _kept(result)
    assert set(kept) == set(expected)
    for name, (label, folder) in expected.items():
        assert kept[name]["label"] == label, name
        assert Path(kept[name]["path"]).parent.name in (folder, "images")
    # Each image is its own patient.
    assert result.images["patient_id"].is_unique
    assert any("no patient ids" in n for n in result.notes)


def test_radiography_current_layout(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    classes = {"COVID": "covid", "Normal": "normal", "Lung_Opacity": "other", "Viral Pneumonia": "pneumonia"}
    expected = {}
    seed = 0
    for folder, label in classes.items():
        for n in (1, 2):
            name = f"{folder}-{n}.png"
            write_image(root / folder / "images" / name, seed=seed)
            write_image(root / folder / "masks" / name, seed=seed + 100)
            seed += 1
            expected[name] = (label, folder)
        (root / f"{folder}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database")
    write_image(root / "Normal" / "masks" / "Normal-9.png", seed=99)  # a mask whose image is not there
    result = read_radiography(root)
    _check_radiography(result, expected)
    assert all(Path(p).parent.name == "images" for p in result.images["path"])
    # <Class>/masks/<name> is the lung mask of <Class>/images/<name>: recorded, never an image row.
    for p, m in zip(result.images["path"], result.images["mask_path"]):
        assert Path(m) == Path(p).parent.parent / "masks" / Path(p).name
    assert any("8 of 8 images have a lung mask" in n for n in result.notes)
    dropped = _dropped_files(result)
    assert {p.name: r for p, r in dropped.items() if "mask" in r} == {
        "Normal-9.png": "lung mask without a kept image of the same name (not used)"}
    not_images = {p.name for p, r in dropped.items() if "not an image" in r}
    assert not_images == {f"{c}.metadata.xlsx" for c in classes} | {"README.md.txt"}
    all_files = {f.resolve() for f in root.rglob("*") if f.is_file()}
    masks = {Path(m) for m in result.images["mask_path"]}
    assert {Path(p) for p in result.images["path"]} | masks | set(dropped) == all_files
    findings = dict(zip(result.images["label"], result.images["finding"]))
    assert "Lung Opacity" in findings["other"] and findings["pneumonia"] == "Viral Pneumonia"


def test_radiography_flat_layout_from_parent(tmp_path: Path) -> None:
    parent = tmp_path / "covid19-radiography-database"
    base = parent / "COVID-19_Radiography_Dataset"
    expected = {}
    for i in range(1, 4):
        write_image(base / "COVID" / f"COVID-{i}.png", seed=i)
        expected[f"COVID-{i}.png"] = ("covid", "COVID")
        write_image(base / "Normal" / f"Normal-{i}.png", seed=10 + i)
        expected[f"Normal-{i}.png"] = ("normal", "Normal")
    result = read_source("radiography", parent)
    _check_radiography(result, expected)
    assert not result.dropped
    assert (result.images["mask_path"] == "").all()  # this layout has no masks
    # Same rows when pointed at the dataset folder itself.
    direct = read_radiography(base)
    assert sorted(direct.images["path"]) == sorted(result.images["path"])


def test_radiography_oldest_layout(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19 Radiography Database"
    expected = {}
    for i in (1, 12):
        write_image(root / "COVID-19" / f"COVID-19 ({i}).png", seed=i)
        expected[f"COVID-19 ({i}).png"] = ("covid", "COVID-19")
        write_image(root / "NORMAL" / f"NORMAL ({i}).png", seed=20 + i)
        expected[f"NORMAL ({i}).png"] = ("normal", "NORMAL")
        write_image(root / "Viral Pneumonia" / f"Viral Pneumonia ({i}).png", seed=40 + i)
        expected[f"Viral Pneumonia ({i}).png"] = ("pneumonia", "Viral Pneumonia")
    write_image(root / "stray.png", seed=77)
    (root / "COVID-19.metadata.xlsx").write_bytes(b"PK")
    result = read_radiography(root)
    _check_radiography(result, expected)
    dropped = {p.name: r for p, r in _dropped_files(result).items()}
    assert "class folder" in dropped["stray.png"]
    assert "not an image" in dropped["COVID-19.metadata.xlsx"]


def test_radiography_unknown_subfolder_is_dropped(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_image(root / "COVID" / "COVID-1.png", 1)
    write_image(root / "Tuberculosis" / "TB-1.png", 2)
    result = read_radiography(root)
    assert list(_kept(result)) == ["COVID-1.png"]
    dropped = {p.name: r for p, r in _dropped_files(result).items()}
    assert "Tuberculosis" in dropped["TB-1.png"]


def test_radiography_without_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_image(root / "pictures" / "a.png", 1)
    write_image(root / "b.png", 2)
    with pytest.raises(SourceError) as err:
        read_radiography(root)
    assert str(root.resolve()) in str(err.value)
    with pytest.raises(SourceError):
        read_radiography(tmp_path / "absent")


# --------------------------------------------------------------------------- COVID-CXNet


def _cxnet_row(filename: str, pid: str, age: str = "60", view: str = "PA", label: str = "COVID-19",
               pcr: str = "positive") -> dict:
    return {"filename": filename, "patient_id": pid, "sex": "male", "age": age, "view": view, "label": label,
            "pcr_test": pcr, "location": "Spain", "url": "https://example.org/case"}


def test_cxnet_filters_and_every_row_accounted_for(tmp_path: Path) -> None:
    root = tmp_path / "COVID-CXNet"
    images = root / "chest_xray_images" / "covid19"
    rows = [_cxnet_row("1.jpg", "1"), _cxnet_row("2.png", "1", view="AP"),  # two images of one patient
            _cxnet_row("3.jpeg", "2", age="", view=""),  # unknown age and view: kept, view 'unknown'
            _cxnet_row("4.jpg", "3", pcr=""),  # no PCR result given: kept
            _cxnet_row("5.jpg", "4", pcr="negative"), _cxnet_row("6.jpg", "5", age="0.1"),
            _cxnet_row("7.jpg", "6", age="17"), _cxnet_row("8.jpg", "7", age="18"),
            _cxnet_row("9.jpg", "8", label="Normal"), _cxnet_row("10.jpg", "9", view="L"),
            _cxnet_row("missing.jpg", "10"), _cxnet_row("", "11")]
    _write_csv(root / "metadata.csv", CXNET_HEADER, rows)
    for i, r in enumerate(rows):
        if r["filename"] and r["filename"] != "missing.jpg":
            write_image(images / r["filename"], seed=i)
    write_image(images / "259.jpg", seed=50)  # in the folder, not in metadata.csv
    (images / "Thumbs.db").write_bytes(b"\0")
    result = read_source("cxnet", root)
    _assert_well_formed(result)
    assert result.source == "cxnet"
    kept = _kept(result)
    assert set(kept) == {"1.jpg", "2.png", "3.jpeg", "4.jpg", "8.jpg"}
    assert all(r["label"] == "covid" and r["finding"] == "COVID-19" and r["mask_path"] == "" for r in kept.values())
    assert {n: r["patient_id"] for n, r in kept.items()} == {"1.jpg": "1", "2.png": "1", "3.jpeg": "2", "4.jpg": "3",
                                                            "8.jpg": "7"}
    assert {n: r["view"] for n, r in kept.items()} == {"1.jpg": "PA", "2.png": "AP", "3.jpeg": "unknown",
                                                      "4.jpg": "PA", "8.jpg": "PA"}
    # The paths are recorded as they lie in the source, not resolved.
    assert all(Path(r["path"]).parent == images.resolve() for r in kept.values())
    dropped = {p.name: r for p, r in _dropped_files(result).items()}
    assert dropped == {"5.jpg": "PCR test negative",
                       "6.jpg": "age under 18 (only adults and unknown ages are used)",
                       "7.jpg": "age under 18 (only adults and unknown ages are used)",
                       "9.jpg": "label 'Normal' (only COVID-19 rows are used)",
                       "10.jpg": "non-frontal view L",
                       "259.jpg": "not listed in metadata.csv",
                       "Thumbs.db": "not an image file"}
    rows_dropped = sorted(d["reason"] for d in result.dropped if "metadata.csv:row" in d["item"])
    assert rows_dropped == ["image file missing.jpg listed in metadata.csv is missing",
                            "metadata row names no image file"]
    listed_files = set(dropped) - {"259.jpg", "Thumbs.db"}
    assert len(kept) + len(listed_files) + len(rows_dropped) == len(rows)  # every metadata row, once
    assert any("1 images have no view" in n for n in result.notes)


def test_cxnet_requires_its_columns(tmp_path: Path) -> None:
    root = tmp_path / "cxnet"
    _write_csv(root / "metadata.csv", "filename,patient_id,view,label,age", [])
    with pytest.raises(SourceError, match=r"metadata.csv has no column 'pcr_test'"):
        read_cxnet(root)


def test_cxnet_image_path_outside_the_source_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cxnet"
    write_image(tmp_path / "secret.png", seed=1)
    write_image(root / "chest_xray_images" / "covid19" / "1.png", seed=2)
    _write_csv(root / "metadata.csv", CXNET_HEADER, [_cxnet_row("../../../secret.png", "1"), _cxnet_row("1.png", "2")])
    result = read_cxnet(root)
    assert list(_kept(result)) == ["1.png"]
    assert [d["reason"] for d in result.dropped] == [
        "the image path in metadata.csv points outside the source folder (refused; --allow-links-to DIR follows "
        "links into DIR)"]


# --------------------------------------------------------------------------- OpenIST


def _openist(root: Path, ids: list[str], masks: list[str]) -> Path:
    folder = root / "Datasets" / "Chest_x-ray"
    for i, name in enumerate(ids):
        write_image(folder / f"{name}.jpg", seed=i)
    for i, name in enumerate(masks):
        write_image(folder / f"{name}@.png", seed=100 + i)
    return folder


def test_openist_images_with_their_masks(tmp_path: Path) -> None:
    root = tmp_path / "OpenIST"
    folder = _openist(root, ["1-10-500-500-100", "10-19-500-500-100", "nomask"], ["1-10-500-500-100",
                                                                                 "10-19-500-500-100", "orphan"])
    (folder / "readme.txt").write_text("teaching set")
    write_image(root / "Docs" / "logo.png", seed=9)  # elsewhere in the repository: not read
    result = read_source("openist", root)
    _assert_well_formed(result)
    kept = _kept(result)
    assert set(kept) == {"1-10-500-500-100.jpg", "10-19-500-500-100.jpg", "nomask.jpg"}  # a mask is never an image
    assert all(r["label"] == "normal" and r["view"] == "PA" for r in kept.values())
    assert {n: r["patient_id"] for n, r in kept.items()} == {n: n[:-4] for n in kept}  # each image its own patient
    assert kept["1-10-500-500-100.jpg"]["mask_path"] == str(folder.resolve() / "1-10-500-500-100@.png")
    assert kept["10-19-500-500-100.jpg"]["mask_path"] == str(folder.resolve() / "10-19-500-500-100@.png")
    assert kept["nomask.jpg"]["mask_path"] == ""
    assert {p.name: r for p, r in _dropped_files(result).items()} == {
        "orphan@.png": "lung mask without a kept image of the same name (not used)", "readme.txt": "not an image file"}
    assert any("2 of 3 images have a lung mask" in n for n in result.notes)
    assert any("no license" in n for n in result.notes)
    # Pointed at the image folder itself: the same rows.
    direct = read_openist(folder)
    assert direct.images.drop(columns="patient_id").equals(result.images.drop(columns="patient_id"))


def test_openist_without_images(tmp_path: Path) -> None:
    root = tmp_path / "OpenIST"
    _openist(root, [], ["a"])
    with pytest.raises(SourceError, match=r"no images in .*Chest_x-ray.*<id>@.png"):
        read_openist(root)


def test_openist_mask_link_out_of_the_source_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "OpenIST"
    folder = _openist(root, ["a", "b"], ["a"])
    (folder / "b@.png").symlink_to(write_image(tmp_path / "elsewhere.png", seed=5))
    result = read_openist(root)
    assert _kept(result)["b.jpg"]["mask_path"] == ""
    assert [d["reason"] for d in result.dropped] == [
        "link pointing outside the source folder (refused; --allow-links-to DIR follows links into DIR)"]


# --------------------------------------------------------------------------- masks of any source


@pytest.mark.parametrize("rel,mask", [("covid/a.jpg", "covid/masks/a.png"),
                                      ("covid/sub/b.jpg", "covid/masks/sub/b.png"),
                                      ("COVID/images/COVID-1.png", "COVID/masks/COVID-1.png"),
                                      ("Normal/Normal-2.png", "Normal/masks/Normal-2.png")])
def test_mask_of(rel: str, mask: str) -> None:
    assert mask_of(Path(rel)) == Path(mask)


def test_folder_source_masks(tmp_path: Path) -> None:
    """<label>/masks/ mirrors the label folder's tree with .png names; its files are masks, never images."""
    root = tmp_path / "hospital"
    write_image(root / "covid" / "a.jpg", 1)
    write_image(root / "covid" / "masks" / "a.png", 2)
    write_image(root / "covid" / "sub" / "b.png", 3)
    write_image(root / "covid" / "masks" / "sub" / "b.png", 4)
    write_image(root / "normal" / "c.png", 5)  # no mask
    write_image(root / "normal" / "masks" / "z.png", 6)  # a mask without its image
    (root / "normal" / "masks" / "notes.txt").write_text("drawn by hand")
    result = read_folder(root)
    _assert_well_formed(result)
    kept = _kept(result)
    assert set(kept) == {"a.jpg", "b.png", "c.png"}
    assert kept["a.jpg"]["mask_path"] == str(root.resolve() / "covid" / "masks" / "a.png")
    assert kept["b.png"]["mask_path"] == str(root.resolve() / "covid" / "masks" / "sub" / "b.png")
    assert kept["c.png"]["mask_path"] == ""
    assert {p.name: r for p, r in _dropped_files(result).items()} == {
        "z.png": "lung mask without a kept image of the same name (not used)", "notes.txt": "not an image file"}
    assert any("2 of 3 images have a lung mask" in n for n in result.notes)


def test_registry_and_priority() -> None:
    assert set(READERS) == {"cohen", "mooney", "radiography", "actualmed", "figure1", "cxnet", "openist", "folder"}
    assert set(PATIENT_METADATA_PRIORITY) == set(READERS) - {"folder"}
    # Sources with real patient ids are kept first when one image is in several sources.
    assert PATIENT_METADATA_PRIORITY.index("cxnet") < PATIENT_METADATA_PRIORITY.index("radiography")


# --------------------------------------------------------------------------- generic folder


def test_read_folder(tmp_path: Path) -> None:
    root = tmp_path / "hospital-export"
    write_image(root / "COVID-19" / "a.png", 1)
    write_image(root / "covid" / "sub" / "b.jpg", 2)
    write_image(root / "normal" / "c.png", 3)
    write_image(root / "Pneumonia" / "d.jpeg", 4)
    write_image(root / "other" / "e.PNG", 5)
    write_image(root / "misc" / "f.png", 6)
    write_image(root / "loose.png", 7)
    (root / "README.txt").write_text("export")
    (root / "normal" / "notes.txt").write_text("x")
    (root / "normal" / "._c.png").write_bytes(b"\x00\x05\x16\x07")
    result = read_source("folder", root)
    _assert_well_formed(result)
    assert result.source == "hospital-export"
    kept = _kept(result)
    assert {k: v["label"] for k, v in kept.items()} == {
        "a.png": "covid", "b.jpg": "covid", "c.png": "normal", "d.jpeg": "pneumonia", "e.PNG": "other"}
    assert kept["b.jpg"]["patient_id"] == str(Path("covid") / "sub" / "b")
    assert result.images["patient_id"].is_unique
    dropped = {p.name: r for p, r in _dropped_files(result).items()}
    assert set(dropped) == {"f.png", "loose.png", "notes.txt", "._c.png"}
    assert "misc" in dropped["f.png"]
    assert "label" in dropped["loose.png"]
    assert "not an image" in dropped["notes.txt"] and "not an image" in dropped["._c.png"]


def test_read_folder_synthetic_flag(tmp_path: Path) -> None:
    root = tmp_path / "phantoms"
    write_image(root / "covid" / "a.png", 1)
    write_image(root / "normal" / "b.png", 2)
    assert read_folder(root).synthetic is False
    (root / "README.txt").write_text("SYNTHETIC phantom chest X-rays, not patients.\n")
    result = read_folder(root)
    assert result.synthetic is True and any("SYNTHETIC" in n for n in result.notes)
    assert [d["item"] for d in result.dropped] == []  # README.txt beside the class folders is not an unused file


def test_read_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_folder(tmp_path / "absent")


# --------------------------------------------------------------------------- real collection

COVID_WORDS = ("COVID-19", "COVID")
NORMAL_WORDS = {"No Finding", "No finding", "Normal", "NORMAL", "normal"}
FRONTAL_OR_EMPTY = {"PA", "AP", "AP Supine", "AP erect", ""}
# COVID-CXNet rows of children in the real copy (ages 0.03 to 1.5 years; inventory.csv has no age): left out.
CXNET_CHILDREN = {"455p.jpg", "482p-.jpg", "484p.png", "488p.png", "757p.jpg", "758p.jpg", "899p.jpg"}


@pytest.fixture(scope="module")
def inventory(real_data: Path) -> pd.DataFrame:
    return pd.read_csv(real_data / "inventory.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def real_reads(real_data: Path) -> dict[str, SourceRead]:
    return {name: read_source(name, real_data / "sources" / folder) for name, folder in REAL_SOURCES.items()}


def _rel_in_source(path: str | Path, source_root: Path) -> str:
    return Path(path).resolve().relative_to(source_root.resolve()).as_posix()


@pytest.mark.integration
@pytest.mark.parametrize("name", list(REAL_SOURCES))
def test_real_source_counts_match_inventory(name: str, real_data: Path, inventory: pd.DataFrame,
                                            real_reads: dict[str, SourceRead]) -> None:
    folder = REAL_SOURCES[name]
    source_root = real_data / "sources" / folder
    result = real_reads[name]
    _assert_well_formed(result)
    inv = inventory[inventory["source"] == folder]
    assert len(inv) > 0
    prefix = f"sources/{folder}/"
    inv_rel = inv["relative_path"].str.removeprefix(prefix)
    assert (inv["relative_path"].str.startswith(prefix)).all()
    inv_rel_set = set(inv_rel)

    kept_rel = [_rel_in_source(p, source_root) for p in result.images["path"]]
    dropped_images = [_rel_in_source(p, source_root) for p in _dropped_files(result) if is_image_file(p)]
    # Every image of the source is either kept or dropped with a reason, exactly once.
    assert len(kept_rel) + len(dropped_images) == len(inv)
    assert set(kept_rel) | set(dropped_images) == inv_rel_set
    assert not set(kept_rel) & set(dropped_images)
    for p in result.images["path"]:
        assert Path(p).is_file()

    is_covid = inv["label_as_in_source"].map(lambda s: any(s.startswith(w) for w in COVID_WORDS))
    frontal = inv["view"].isin(FRONTAL_OR_EMPTY)
    if name == "cohen":
        expected_covid = int((inv["label_as_in_source"].str.contains("COVID-19")
                              & inv["view"].isin({"PA", "AP", "AP Supine"})).sum())
    else:
        expected_covid = int((is_covid & frontal).sum()) - (len(CXNET_CHILDREN) if name == "cxnet" else 0)
    expected_normal = int((inv["label_as_in_source"].isin(NORMAL_WORDS) & frontal).sum())
    labels = result.images["label"].value_counts()
    assert int(labels.get("covid", 0)) == expected_covid
    assert int(labels.get("normal", 0)) == expected_normal

    # Per-image labels agree with the inventory.
    inv_label = dict(zip(inv_rel, inv["label_as_in_source"]))
    for rel, label in zip(kept_rel, result.images["label"]):
        src_label = inv_label[rel]
        if label == "covid":
            assert "COVID" in src_label.upper(), rel
        elif label == "normal":
            assert src_label in NORMAL_WORDS, rel


@pytest.mark.integration
@pytest.mark.parametrize("name", ["cohen", "actualmed", "mooney", "figure1", "cxnet"])
def test_real_patient_ids_match_inventory(name: str, real_data: Path, inventory: pd.DataFrame,
                                          real_reads: dict[str, SourceRead]) -> None:
    folder = REAL_SOURCES[name]
    source_root = real_data / "sources" / folder
    inv = inventory[inventory["source"] == folder]
    inv_pid = dict(zip(inv["relative_path"].str.removeprefix(f"sources/{folder}/"), inv["patient_id"]))
    result = real_reads[name]
    for p, pid in zip(result.images["path"], result.images["patient_id"]):
        expected = inv_pid[_rel_in_source(p, source_root)]
        if name == "figure1":  # COVID-00003a/-00003b: one patient
            expected = expected.rstrip("abcdefghij")
        assert pid == expected, p


@pytest.mark.integration
def test_real_cohen_double_listed_images(real_data: Path, inventory: pd.DataFrame,
                                         real_reads: dict[str, SourceRead]) -> None:
    result = real_reads["cohen"]
    multi = result.images[result.images["patient_id"].str.contains(";")]
    assert sorted(multi["patient_id"]) == ["285;339", "287;340"]
    inv = inventory[inventory["source"] == REAL_SOURCES["cohen"]]
    inv_multi = inv[inv["patient_id"].str.contains(";")]
    assert sorted(Path(p).name for p in multi["path"]) == sorted(Path(p).name for p in inv_multi["relative_path"])
    # One row per image, and the second metadata rows are accounted for as merged.
    assert result.images["path"].is_unique
    merged = [d for d in result.dropped if "already listed" in d["reason"]]
    assert len(merged) == len(inv_multi)
    meta_rows = len(pd.read_csv(real_data / "sources" / REAL_SOURCES["cohen"] / "metadata.csv", dtype=str))
    row_items = [d for d in result.dropped if "metadata.csv:row" in d["item"]]
    file_rows = [d for d in result.dropped if Path(d["item"]).is_file()]
    assert len(result.images) + len(row_items) + len(file_rows) == meta_rows


@pytest.mark.integration
def test_real_notes(real_reads: dict[str, SourceRead]) -> None:
    assert any("cp1252" in n for n in real_reads["figure1"].notes)
    assert any("pediatric" in n for n in real_reads["mooney"].notes)
    assert any("no patient ids" in n for n in real_reads["radiography"].notes)
    assert any("figures from papers" in n for n in real_reads["cxnet"].notes)
    assert any("no license" in n for n in real_reads["openist"].notes)


@pytest.mark.integration
def test_real_cxnet_exact_counts(real_data: Path, real_reads: dict[str, SourceRead]) -> None:
    """The real copy: 234 metadata rows, every one COVID-19 with no negative PCR; 7 are of children (the collection's
    README says adults only, its metadata.csv says otherwise), so 227 images of 144 patients are kept."""
    result = real_reads["cxnet"]
    images = result.images
    assert len(images) == 227
    assert images["patient_id"].nunique() == 144
    assert images["view"].value_counts().to_dict() == {"unknown": 109, "AP": 97, "PA": 21}
    assert (images["label"] == "covid").all() and (images["mask_path"] == "").all()
    assert {Path(d["item"]).name: d["reason"] for d in result.dropped} == {
        name: "age under 18 (only adults and unknown ages are used)" for name in CXNET_CHILDREN}
    meta = pd.read_csv(real_data / "sources" / REAL_SOURCES["cxnet"] / "metadata.csv", dtype=str)
    assert len(images) + len(result.dropped) == len(meta) == 234
    assert meta["patient_id"].nunique() == 150


@pytest.mark.integration
def test_real_openist_exact_counts(real_data: Path, real_reads: dict[str, SourceRead]) -> None:
    """The real copy: 214 normal PA films, each its own patient, each with its lung mask <id>@.png (never an image)."""
    result = real_reads["openist"]
    images = result.images
    assert len(images) == 214 and not result.dropped
    assert images["patient_id"].nunique() == 214
    assert (images["label"] == "normal").all() and (images["view"] == "PA").all()
    assert not images["path"].str.endswith("@.png").any()
    assert [m[:-len("@.png")] for m in images["mask_path"]] == [p[:-len(".jpg")] for p in images["path"]]
    assert all(Path(m).is_file() for m in images["mask_path"])
    folder = real_data / "sources" / REAL_SOURCES["openist"] / "Datasets" / "Chest_x-ray"
    assert len(list(folder.glob("*@.png"))) == 214


def test_a_flat_folder_source_explains_the_layout(tmp_path: Path) -> None:
    """Images straight in ROOT (no label folders) stop with the layout the folder source reads; a few loose images
    beside label folders are counted with their reason and noted."""
    flat = tmp_path / "flat"
    for i in range(3):
        write_image(flat / f"x{i}.png", i)
    with pytest.raises(SourceError, match=r"3 image\(s\) lie directly in it.*/covid/, .*/normal/"):
        read_folder(flat)
    mixed = tmp_path / "mixed"
    write_image(mixed / "covid" / "a.png", 1)
    write_image(mixed / "loose.png", 2)
    out = read_folder(mixed)
    assert len(out.images) == 1
    assert [d["reason"] for d in out.dropped] == ["image not inside a <label>/ folder"]
    assert any("1 image(s) lie directly in the folder" in n for n in out.notes)


def test_a_folder_source_is_named_so_that_its_name_can_be_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "My Hospital (export 2)"
    write_image(root / "covid" / "a.png", 1)
    assert read_folder(root).source == "My-Hospital-export-2"
    assert read_folder(tmp_path / "My Hospital (export 2)").images["source"].tolist() == ["My-Hospital-export-2"]
