"""A hospital's DICOMs as a source: labels, pseudonyms, the DICOM store, nothing of the patient in any output.

The folder tests write DICOM files that carry PHI (tests/dicom_factory.py) under folder names built from patient
names, as PACS exports often are; the DICOMweb tests upload the same kind of files to a real Orthanc
(tests/orthanc.py; skipped with a reason where it is not installed).
"""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from covid_cxr.data.dicom_source import (INSTANCES, KEY_FILE, patient_key, pseudonym, read_dicom,
                                         read_labels, store_for)
from covid_cxr.data.manifest import build
from covid_cxr.data.options import DataConfig
from covid_cxr.dicomweb import DicomWeb, _extract_single_part, split_credentials
from covid_cxr.errors import ConfigError, PacsError, SourceError
from dicom_factory import make_cxr_dicom, make_lateral, phi_strings

PATIENTS = [  # (patient id, name, label): distinctive strings, so a grep for them cannot match by chance
    ("MRN-778812", "QUIXOTE^ALONSO", "covid"), ("MRN-661403", "ZAMBRANO^BEATRIZ", "covid"),
    ("MRN-559027", "WOJCIK^CASIMIR", "covid"), ("MRN-448216", "OYELARAN^DAPOLOLA", "normal"),
    ("MRN-337590", "VILLANUEVA^ESTRELLA", "normal"), ("MRN-226781", "KRISTIANSEN^FRODEMAR", "normal"),
]


def _hospital(root: Path, *, accession_prefix: str = "ACC-9") -> tuple[list[dict], list[str]]:
    """An export like a PACS writes it: ``<NAME>/<study>/IMxxxx``, one frontal study per patient (two images for the
    first), a lateral beside one frontal, an unlabelled study and a file that is not DICOM. Returns the label rows
    and every PHI string written."""
    labels, phi = [], []
    for i, (pid, name, label) in enumerate(PATIENTS):
        acc = f"{accession_prefix}{i:04d}X"
        folder = root / name.replace("^", "_") / f"study-{acc}"
        kw = dict(patient_id=pid, patient_name=name, accession=acc, birth_date=f"19{50 + i}0{1 + i % 9}1{i}",
                  label=label, seed=i, manufacturer=("ACME Radiography" if i % 2 else "Fabrikam DR"),
                  modality=("DX" if i % 3 else "CR"), size=(128, 128))
        uids = make_cxr_dicom(folder / "IM0001", **kw)
        phi += phi_strings(kw) + [uids.study_uid, uids.series_uid, uids.sop_uid]
        if i == 0:  # a second frontal image in the same study, and a lateral
            make_cxr_dicom(folder / "IM0002", study_uid=uids.study_uid, **{**kw, "seed": 40})
            make_lateral(folder / "IM0003", study_uid=uids.study_uid, **kw)
        labels.append({"AccessionNumber": acc, "label": label})
    unlabelled = dict(patient_id="MRN-990001", patient_name="UNLABELLED^UMAYAHLIN", accession="ACC-UNLAB-1", label="normal")
    make_cxr_dicom(root / "UNLABELLED_UMAYAHLIN" / "IM0001", **unlabelled)
    phi += phi_strings(unlabelled)
    (root / "QUIXOTE_ALONSO" / "notes.txt").write_text("not a DICOM file\n")
    return labels, sorted(set(phi))


def _labels_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _grep_tree(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    """(file, needle) for every PHI string found in the bytes of any file under ``root``, and in any path."""
    hits = []
    for p in root.rglob("*"):
        for n in needles:
            if n.lower() in str(p.relative_to(root)).lower():
                hits.append((str(p), n))
        if p.is_file():
            data = p.read_bytes().lower()
            hits += [(str(p), n) for n in needles if n.lower().encode() in data]
    return hits


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    labels, phi = _hospital(root / "export")
    return root / "export", _labels_csv(root / "labels.csv", labels), phi


# ----------------------------------------------------------------------------- labels

def test_labels_file_errors_name_rows_not_values(tmp_path):
    f = _labels_csv(tmp_path / "l.csv", [{"AccessionNumber": "ACC-SECRET-1", "label": "covid"},
                                         {"AccessionNumber": "ACC-SECRET-2", "label": "PCR negative"},
                                         {"AccessionNumber": "", "label": "normal"},
                                         {"AccessionNumber": "ACC-SECRET-1", "label": "normal"}])
    with pytest.raises(SourceError) as e:
        read_labels(f)
    msg = str(e.value)
    assert "rows 3" in msg and "rows 4" in msg and "rows 5" in msg and "'pcr negative'" in msg
    assert "ACC-SECRET" not in msg
    ok = _labels_csv(tmp_path / "ok.csv", [{"StudyInstanceUID": "1.2.3", "AccessionNumber": "A1", "label": " COVID-19 "},
                                           {"StudyInstanceUID": "1.2.4", "AccessionNumber": "A2", "label": "No Finding"}])
    t = read_labels(ok)
    assert (t.key, t.labels) == ("StudyInstanceUID", {"1.2.3": "covid", "1.2.4": "normal"})
    assert read_labels(ok, key="AccessionNumber").labels == {"A1": "covid", "A2": "normal"}
    with pytest.raises(SourceError, match="no 'finding' column"):
        read_labels(ok, column="finding")


def test_patient_key_is_private_stable_and_checked(tmp_path):
    store = tmp_path / "ds.dicom"
    k1 = patient_key(store)
    assert stat.S_IMODE(os.stat(store / KEY_FILE).st_mode) == 0o600
    assert patient_key(store) == k1 and len(k1) == 32
    assert pseudonym(k1, "patient", "MRN-1") == pseudonym(k1, "patient", "MRN-1") != pseudonym(k1, "patient", "MRN-2")
    assert pseudonym(k1, "patient", "MRN-1") != pseudonym(patient_key(tmp_path / "other"), "patient", "MRN-1")
    (store / KEY_FILE).write_text("not a key")
    with pytest.raises(SourceError, match="not a covid-cxr patient key"):
        patient_key(store)
    assert store_for(tmp_path / "ds", None) == (tmp_path / "ds.dicom").resolve()


def test_dicom_options_need_labels():
    with pytest.raises(ConfigError, match="needs --labels"):
        DataConfig(sources=(("dicom", "x"),), out="o")
    with pytest.raises(ConfigError, match="--study-date"):
        DataConfig(sources=(("dicomweb", "http://h/dicom-web"),), out="o", labels="l.csv", study_date="2020-01-01")


# ----------------------------------------------------------------------------- a folder of exported files

def test_folder_export_reads_frontal_labelled_instances_under_pseudonyms(hospital, tmp_path):
    export, labels_csv, phi = hospital
    store = tmp_path / "store"
    read = read_dicom(export, read_labels(labels_csv), store)
    df = read.images
    assert len(df) == len(PATIENTS) + 1  # one frontal per patient, two for the first
    assert sorted(df["label"].value_counts().items()) == [("covid", 4), ("normal", 3)]
    assert df["patient_id"].str.fullmatch(r"patient-[0-9a-f]{16}").all()
    assert df["patient_id"].nunique() == len(PATIENTS)
    assert set(df["view"]) == {"PA"} and set(df["modality"]) == {"CR", "DX"}
    assert set(df["manufacturer"]) == {"ACME Radiography", "Fabrikam DR"} and set(df["photometric"]) == {"MONOCHROME2"}
    for p in df["path"]:
        assert Path(p).parent == (store / INSTANCES).resolve() and Path(p).is_file()
    reasons = [d["reason"] for d in read.dropped]
    assert sum("lateral" in r for r in reasons) == 1
    assert sum(r.startswith("no label") for r in reasons) == 1
    assert sum("not a readable DICOM" in r for r in reasons) == 1
    text = repr(read.dropped) + repr(read.notes) + df.to_csv()
    assert [s for s in phi if s.lower() in text.lower()] == []


def test_unmatched_labels_are_an_error_with_counts(hospital, tmp_path):
    export, labels_csv, _ = hospital
    rows = list(csv.DictReader(open(labels_csv))) + [{"AccessionNumber": "ACC-NOWHERE-7", "label": "covid"}]
    extra = _labels_csv(tmp_path / "more.csv", rows)
    with pytest.raises(SourceError) as e:
        read_dicom(export, read_labels(extra), tmp_path / "store")
    assert f"1 of {len(rows)} label row(s)" in str(e.value) and f"rows {len(rows) + 1}" in str(e.value)
    assert "ACC-NOWHERE" not in str(e.value)
    ok = read_dicom(export, read_labels(extra), tmp_path / "store", allow_unmatched=True)
    assert len(ok.images) == len(PATIENTS) + 1 and any("match no instance" in n for n in ok.notes)


def test_data_build_from_a_dicom_export_writes_no_patient_data(hospital, tmp_path, capsys, caplog):
    export, labels_csv, phi = hospital
    out = tmp_path / "local"
    report = build(DataConfig(sources=(("dicom", str(export)),), out=str(out), labels=str(labels_csv),
                              test_per_class=1, workers=1, progress=False))
    man = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(report["sources"]) == ["dicom-export"]  # named after the export folder
    assert len(man) == len(PATIENTS) + 1 and report["sources"]["dicom-export"]["in_manifest"] == len(man)
    assert man["path"].str.fullmatch(r"instance-[0-9a-f]{16}\.dcm").all()
    assert (man["modality"] != "").all() and (man["pixel_spacing"] != "").all()
    assert not (out / KEY_FILE).exists() and (tmp_path / "local.dicom" / KEY_FILE).is_file()
    hits = _grep_tree(out, phi)
    captured = capsys.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert hits == [] and [s for s in phi if s.lower() in logs.lower()] == []
    # a second build keeps every pseudonym (the key is reused)
    build(DataConfig(sources=(("dicom", str(export)),), out=str(out), labels=str(labels_csv), test_per_class=1,
                     workers=1, progress=False))
    again = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(again["patient_id"]) == sorted(man["patient_id"])


# ----------------------------------------------------------------------------- DICOMweb client pieces

def test_credentials_never_stay_in_the_url():
    url, creds = split_credentials("https://alice:s%40cret@pacs.example.org:8443/dicom-web")
    assert (url, creds) == ("https://pacs.example.org:8443/dicom-web", "alice:s@cret")
    client = DicomWeb("https://alice:s%40cret@pacs.example.org/dicom-web/")
    assert client.url == "https://pacs.example.org/dicom-web" and "cret" not in repr(client)
    with pytest.raises(PacsError, match="must start with http"):
        DicomWeb("pacs.example.org/dicom-web")


def test_multipart_part_is_cut_out_on_disk(tmp_path):
    payload = b"\x00" * 128 + b"DICM" + os.urandom(200_000) + b"\r\n--not-the-boundary\r\n"
    body = b"--BOUND\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--BOUND--\r\n"
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.write_bytes(body)
    _extract_single_part(raw, out, "BOUND", "1.2.3")
    assert out.read_bytes() == payload
    raw.write_bytes(body[:-20])  # cut off: no closing boundary
    with pytest.raises(PacsError, match="truncated"):
        _extract_single_part(raw, out, "BOUND", "1.2.3")
    two = b"--B\r\nContent-Type: application/dicom\r\n\r\nAAAA\r\n--B\r\nContent-Type: application/dicom\r\n\r\nBB\r\n--B--\r\n"
    raw.write_bytes(two)
    with pytest.raises(PacsError, match="several parts"):
        _extract_single_part(raw, out, "B", "1.2.3")


# ----------------------------------------------------------------------------- a real PACS

def test_data_build_from_orthanc_over_dicomweb(orthanc, hospital, tmp_path, capsys, caplog):
    export, labels_csv, phi = hospital
    orthanc.clear()
    for f in sorted(export.rglob("IM*")):
        orthanc.upload(f)
    out = tmp_path / "pacs-ds"
    url = orthanc.dicomweb.replace("http://", "http://reader:pw-not-needed@")
    cfg = DataConfig(sources=(("dicomweb", url),), out=str(out), labels=str(labels_csv), test_per_class=1,
                     workers=1, progress=False)
    report = build(cfg)
    man = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(man) == len(PATIENTS) + 1
    assert sorted(man["label"].value_counts().items()) == [("covid", 4), ("normal", 3)]
    store = tmp_path / "pacs-ds.dicom" / INSTANCES
    # the unlabelled study was never retrieved; the lateral was (same study as a labelled frontal) and dropped
    assert len(list(store.glob("*.dcm"))) == len(PATIENTS) + 2
    (name,) = report["sources"]
    assert name == "dicomweb-127.0.0.1"  # named after the host (the port and credentials left out)
    notes = report["sources"][name]["notes"]
    assert any(f"{len(PATIENTS) + 2} retrieved, 0 already" in n for n in notes), notes
    assert report["sources"][name]["path"] == orthanc.dicomweb
    captured = capsys.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert _grep_tree(out, phi + ["pw-not-needed"]) == []
    assert [s for s in phi + ["pw-not-needed"] if s.lower() in logs.lower()] == []
    # resumed: a second build retrieves nothing again, and the pseudonyms match the folder build's
    report2 = build(cfg)
    assert any(f"0 retrieved, {len(PATIENTS) + 2} already" in n for n in report2["sources"][name]["notes"])
    folder = read_dicom(export, read_labels(labels_csv), tmp_path / "pacs-ds.dicom")
    assert sorted(folder.images["patient_id"]) == sorted(man["patient_id"])


def test_dicomweb_search_filters_and_errors(orthanc, hospital, tmp_path):
    export, labels_csv, _ = hospital
    orthanc.clear()
    for f in sorted(export.rglob("IM*")):
        orthanc.upload(f)
    # the uploaded studies are dated by the factory; a range before them finds nothing: every label is unmatched
    cfg = DataConfig(sources=(("dicomweb", orthanc.dicomweb),), out=str(tmp_path / "d"), labels=str(labels_csv),
                     test_per_class=1, workers=1, progress=False, study_date="19000101-19000102")
    with pytest.raises(SourceError, match=r"match no instance.*--allow-unmatched-labels"):
        build(cfg)
    assert not (tmp_path / "d").exists()
    with pytest.raises(PacsError, match="HTTP 404"):
        DicomWeb(orthanc.url + "/not-dicom-web").search("studies")


def _cd_export(export: Path, media: Path) -> Path:
    """The export's files written as a DICOM File-set (a CD or USB export with its DICOMDIR) into ``media``."""
    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in sorted(export.rglob("IM*")):
        fs.add(pydicom.dcmread(f))
    fs.write(media)
    return media


def test_dicomdir_lists_the_files_to_read(hospital, tmp_path):
    """A DICOMDIR (a CD or USB export) is read through its index: the files it lists, nothing else."""
    export, labels_csv, phi = hospital
    media = _cd_export(export, tmp_path / "cd")
    (media / "stray.dcm").write_bytes((export / "UNLABELLED_UMAYAHLIN" / "IM0001").read_bytes())  # not in the index
    read = read_dicom(media / "DICOMDIR", read_labels(labels_csv), tmp_path / "store")
    assert len(read.images) == len(PATIENTS) + 1
    assert sum(r["reason"].startswith("no label") for r in read.dropped) == 1  # the indexed unlabelled study only
    assert sum("lateral" in r["reason"] for r in read.dropped) == 1
    with pytest.raises(SourceError, match="DICOMDIR .* cannot be read"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "DICOMDIR").write_bytes(b"garbage")
        read_dicom(tmp_path / "bad" / "DICOMDIR", read_labels(labels_csv), tmp_path / "store")


def test_pacs_errors_name_no_uid(orthanc):
    """An error on a retrieve names the PACS and the HTTP answer, never the study, series or instance UIDs."""
    client = DicomWeb(orthanc.dicomweb)
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    with pytest.raises(PacsError) as e:
        client.search(f"studies/{uid}/series/{uid}/instances/{uid}/metadata-not-there")
    assert uid not in str(e.value) and "<uid>" in str(e.value)


# ----------------------------------------------------------------------------- what a PACS may answer

class _FakePacs:
    """A DICOMweb server on 127.0.0.1 whose answers a test sets (``routes``: path -> (status, headers, body)); it
    records each request's path and headers."""

    def __init__(self):
        import http.server
        import threading

        fake = self
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, dict]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                fake.requests.append((self.path, dict(self.headers)))
                status, headers, body = fake.routes.get(self.path.split("?")[0], (404, {}, b""))
                if callable(body):
                    body = body(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_pacs():
    pacs = _FakePacs()
    yield pacs
    pacs.close()


def test_credentials_with_reserved_characters_are_taken_out_whole():
    for password in ("pa/ss", "s3cr3t#x", "q?w", "a@b"):
        url, creds = split_credentials(f"http://user:{password}@127.0.0.1:1/dicom-web")
        assert (url, creds) == ("http://127.0.0.1:1/dicom-web", f"user:{password}")
        with pytest.raises(PacsError) as e:
            DicomWeb(f"http://user:{password}@127.0.0.1:1/dicom-web", timeout=2).search("studies")
        assert password not in str(e.value) and "127.0.0.1" in str(e.value)  # the host is not a UID


def test_credentials_never_follow_a_redirect(fake_pacs):
    other = _FakePacs()
    try:
        other.routes["/elsewhere/studies"] = (200, {"Content-Type": "application/dicom+json"}, b"[]")
        fake_pacs.routes["/dicom-web/studies"] = (302, {"Location": f"{other.url}/elsewhere/studies"}, b"")
        DicomWeb(fake_pacs.url + "/dicom-web", auth="reader:pw").search("studies")
        assert "Authorization" in fake_pacs.requests[0][1]
        assert other.requests and all("Authorization" not in h for _, h in other.requests)
    finally:
        other.close()


def test_search_pages_until_an_empty_page_and_stops_on_a_server_that_ignores_offset(fake_pacs):
    import json as _json
    import urllib.parse

    studies = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]}} for i in range(7)]

    def capped(path):  # a server capping pages at 3, whatever limit asks for
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        off = int(q["offset"][0])
        return _json.dumps(studies[off:off + 3]).encode()

    fake_pacs.routes["/dw/studies"] = (200, {"Content-Type": "application/dicom+json"}, capped)
    assert DicomWeb(fake_pacs.url + "/dw").search("studies") == studies
    fake_pacs.routes["/dw/studies"] = (200, {}, _json.dumps(studies[:3]).encode())  # offset ignored: same page
    assert DicomWeb(fake_pacs.url + "/dw").search("studies") == studies[:3]


def test_a_retrieve_keeps_only_a_dicom_file(fake_pacs, tmp_path, hospital):
    export, _, _ = hospital
    dicom = next(export.rglob("IM0001")).read_bytes()
    client = DicomWeb(fake_pacs.url + "/dw")
    path = "/dw/studies/1.2.3/series/1.2.4/instances/1.2.5"
    fake_pacs.routes[path] = (200, {"Content-Type": "application/dicom"}, dicom)  # bare, not multipart
    dest = tmp_path / "a.dcm"
    assert client.retrieve_instance("1.2.3", "1.2.4", "1.2.5", dest, max_bytes=10**8) == len(dicom)
    assert dest.read_bytes() == dicom
    for body in (b"<html>error</html>", b"", dicom[:100]):
        fake_pacs.routes[path] = (200, {"Content-Type": "application/dicom"}, body)
        bad = tmp_path / f"bad{len(body)}.dcm"
        with pytest.raises(PacsError, match="not a DICOM file"):
            client.retrieve_instance("1.2.3", "1.2.4", "1.2.5", bad, max_bytes=10**8)
        assert list(tmp_path.glob(f"bad{len(body)}*")) == []  # nothing kept: the next run retrieves it again
    fake_pacs.routes[path] = (200, {"Content-Type": "application/dicom"}, dicom)
    with pytest.raises(PacsError, match="larger than 1000 bytes"):
        client.retrieve_instance("1.2.3", "1.2.4", "1.2.5", tmp_path / "big.dcm", max_bytes=1000)


@pytest.mark.parametrize("ctype, header_end", [
    ('multipart/related; type="application/dicom"; boundary="b;x y"', b"\r\n\r\n"),
    ("multipart/related; type=application/dicom; boundary = plain", b"\r\n\r\n"),
    ("multipart/related; boundary=lf-only", b"\n\n"),
])
def test_multipart_answers_in_their_variants(tmp_path, ctype, header_end):
    from covid_cxr.dicomweb import _boundary

    boundary = _boundary(ctype)
    assert boundary in ("b;x y", "plain", "lf-only")
    nl = header_end[: len(header_end) // 2]
    payload = b"\x00" * 128 + b"DICM" + os.urandom(150_000)
    body = (b"preamble" + nl + b"--" + boundary.encode() + nl + b"Content-Type: application/dicom" + header_end
            + payload + nl + b"--" + boundary.encode() + b"--" + nl)
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.write_bytes(body)
    _extract_single_part(raw, out, boundary, "1.2.3")
    assert out.read_bytes() == payload
    big = os.urandom(100_000)  # two parts, each larger than the 64 KiB looked at first: refused, not joined
    two = (b"--" + boundary.encode() + nl + b"Content-Type: application/dicom" + header_end + big + nl + b"--"
           + boundary.encode() + nl + b"Content-Type: application/dicom" + header_end + big + nl + b"--"
           + boundary.encode() + b"--" + nl)
    raw.write_bytes(two)
    with pytest.raises(PacsError, match="several parts"):
        _extract_single_part(raw, out, boundary, "1.2.3")


def test_study_date_ranges_are_checked():
    from covid_cxr.data.options import check_date_range

    for ok in ("20200301", "20200301-20210331", "20200301-", "-20210331"):
        check_date_range(ok)
    for bad in ("2020030120210331", "-", "20201399", "20210301-20200301", "2020-03-01"):
        with pytest.raises(ConfigError, match="--study-date"):
            check_date_range(bad)


def test_unmatched_labels_say_what_would_have_matched(hospital, tmp_path):
    export, labels_csv, _ = hospital
    rows = list(csv.DictReader(open(labels_csv)))
    rows[0]["AccessionNumber"] = rows[0]["AccessionNumber"].lower()  # a spreadsheet that changed the case
    with pytest.raises(SourceError, match="1 would match ignoring upper/lower case"):
        read_dicom(export, read_labels(_labels_csv(tmp_path / "l.csv", rows)), tmp_path / "store")


def test_dicomdir_counts_listed_files_that_are_missing(hospital, tmp_path):
    export, labels_csv, phi = hospital
    media = _cd_export(export, tmp_path / "cd")
    listed = sorted(p for p in media.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    listed[0].unlink()
    read = read_dicom(media / "DICOMDIR", read_labels(labels_csv), tmp_path / "store", allow_unmatched=True)
    assert sum(d["reason"] == "listed in the DICOMDIR but missing" for d in read.dropped) == 1
    assert all(d["item"].startswith(("file-", "instance-")) for d in read.dropped)


def test_a_trial_retrieve_with_max_instances_is_not_an_error(orthanc, hospital, tmp_path):
    export, labels_csv, _ = hospital
    orthanc.clear()
    for f in sorted(export.rglob("IM*")):
        orthanc.upload(f)
    from covid_cxr.data.dicom_source import DicomSearch, read_dicomweb

    read = read_dicomweb(orthanc.dicomweb, read_labels(labels_csv), tmp_path / "store",
                         DicomSearch(max_instances=2, progress=False))
    assert len(list((tmp_path / "store" / INSTANCES).glob("*.dcm"))) == 2
    assert any("a partial retrieve" in n for n in read.notes)
