"""A hospital's own images as a source: a folder of exported DICOM files (or a DICOMDIR), or a PACS over DICOMweb.

``data build --source dicom=DIR --labels labels.csv`` and ``data build --source dicomweb=URL --labels labels.csv``
read chest radiographs with the hospital's own labels (e.g. RT-PCR results), keyed by ``StudyInstanceUID`` or
``AccessionNumber``. Both go through a **DICOM store** beside the dataset (``--dicom-store``, default
``DATASET.dicom/``), and only the store is ever named by the dataset:

- ``STORE/instances/<pseudonym>.dcm``: each kept instance, retrieved from the PACS (WADO-RS, streamed, resumable:
  an instance already there is not fetched again) or linked from DIR (a hard link where the file system allows,
  else a copy). Its name is a keyed hash of its SOP Instance UID, so no file name or folder name of the export
  (which PACS exports often build from patient names) reaches the manifest.
- ``STORE/patient-key``: the secret key (readable by its owner only) of the keyed hashes (HMAC-SHA-256). It stays
  beside the dataset, is reused by every later build (the same patient keeps the same pseudonym), and is never
  written to a dataset, log or report. Whoever holds it and a patient's id can link the two, so treat the store
  like the PACS export it holds.

**Privacy by construction.** The manifest's ``patient_id`` is the keyed hash of ``PatientID`` (of the study, when an
instance has no PatientID). No PatientName, PatientID, birth date, accession number, UID or free-text element
(descriptions, comments, institution, physicians) is written to the manifest, a dropped-file record, a log line,
a report or an error: items are named by their pseudonym, label rows by their row number. What is kept is
technical (:data:`covid_cxr.data.dataset.ACQUISITION_COLUMNS`: Modality, Manufacturer, PhotometricInterpretation,
PixelSpacing) plus ViewPosition, for subgroup analysis.

**What is kept.** Frontal chest radiographs (``ViewPosition`` PA or AP, Modality CR/DX/DR/RG) that have a label;
lateral views, unknown views, other modalities and body parts, files without pixel data (reports, presentation
states), unreadable headers and unlabelled studies are each counted with their reason. A label row whose key
matches no instance is an error (with counts and row numbers; ``--allow-unmatched-labels`` makes it a warning).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from covid_cxr.data.source_files import require_dir, walk_files
from covid_cxr.data.sources import LABELS, SourceRead, _frame
from covid_cxr.dicomweb import DicomWeb, dicom_json_value, split_credentials
from covid_cxr.errors import ImageReadError, PacsError, SourceError
from covid_cxr.files import printable
from covid_cxr.imaging.dicom import chest_radiograph_problem, read_dicom_header
from covid_cxr.imaging.dicom_quiet import quiet_pydicom
from covid_cxr.limits import MAX_DICOM_INSTANCE_BYTES
from covid_cxr.paths import plain_name

log = logging.getLogger(__name__)

LabelKey = Literal["auto", "StudyInstanceUID", "AccessionNumber"]
KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber")
"""The columns a labels file may be keyed by (the first one present is used with ``--label-key auto``)."""
KEY_FILE = "patient-key"
INSTANCES = "instances"
FRONTAL_VIEW_POSITIONS = frozenset({"PA", "AP"})
"""(0018,5101) View Position values kept; every other value (LL, RL, LATERAL, '', ...) is counted and dropped."""
LABEL_WORDS = {**{lab: lab for lab in LABELS}, "covid-19": "covid", "covid19": "covid", "sars-cov-2": "covid",
               "no finding": "normal"}
"""Label values a labels file may use (case and surrounding spaces ignored) and the label each means. An RT-PCR
result is not a label by itself: write ``covid`` for a positive test, and for a negative one what the image shows
(``normal``, ``pneumonia`` or ``other``), or build with ``--task covid-vs-rest``."""
DEFAULT_MODALITIES = ("CR", "DX")


# ----------------------------------------------------------------------------- pseudonyms

def store_for(out: str | Path, store: str | Path | None) -> Path:
    """The DICOM store of a dataset: ``store`` if given, else ``OUT.dicom`` beside the dataset folder ``out``."""
    if store:
        return Path(store).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".dicom")


def patient_key(store: Path) -> bytes:
    """The store's secret key (created on first use, mode 0600; kept for every later build)."""
    path = store / KEY_FILE
    if not path.exists():
        store.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise SourceError(f"{path} is not a covid-cxr patient key (64 hexadecimal digits); restore it from a backup, "
                          "or delete it to start new pseudonyms (the same patients then get new ids)")
    return bytes.fromhex(text)


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """A keyed hash of ``value`` (a PatientID, a UID): 16 hexadecimal digits after a ``kind`` prefix."""
    digest = hmac.new(key, f"{kind}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:16]}"


# ----------------------------------------------------------------------------- labels

@dataclass(frozen=True)
class LabelTable:
    """A hospital's labels: key value (a StudyInstanceUID or an AccessionNumber) -> label, with its row number."""

    path: Path
    key: str
    labels: dict[str, str]
    rows: dict[str, int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.labels)


def read_labels(path: str | Path, key: LabelKey = "auto", column: str = "label") -> LabelTable:
    """Read ``labels.csv``; every problem is one error naming the file, the rows (by number, never by value) and
    the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"labels file {path} does not exist; give a CSV with a {' or '.join(KEY_COLUMNS)} column "
                          f"and a {column!r} column")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise SourceError(f"labels file {path} is not a readable CSV ({type(exc).__name__}); save it as "
                          "UTF-8 CSV with a header row") from None
    cols = {c.strip(): c for c in df.columns}
    if key == "auto":
        found = [k for k in KEY_COLUMNS if k in cols]
        if not found:
            raise SourceError(f"labels file {path} has no {' or '.join(KEY_COLUMNS)} column (it has: "
                              f"{', '.join(list(cols)[:10])}); name the key column so, or pass --label-key")
        key = found[0]
    if key not in cols:
        raise SourceError(f"labels file {path} has no {key!r} column (--label-key); it has: {', '.join(list(cols)[:10])}")
    if column not in cols:
        raise SourceError(f"labels file {path} has no {column!r} column (--label-column); it has: "
                          f"{', '.join(list(cols)[:10])}")
    labels: dict[str, str] = {}
    rows: dict[str, int] = {}
    unknown: Counter = Counter()
    unknown_rows: list[int] = []
    empty_keys: list[int] = []
    conflicts: list[int] = []
    for i, (k, v) in enumerate(zip(df[cols[key]], df[cols[column]]), start=2):  # row 1 is the header
        k = _key(k)
        word = " ".join(str(v).split()).lower()
        if not k:
            empty_keys.append(i)
            continue
        label = LABEL_WORDS.get(word)
        if label is None:
            unknown[word or "(empty)"] += 1
            unknown_rows.append(i)
            continue
        if k in labels and labels[k] != label:
            conflicts.append(i)
            continue
        labels[k], rows[k] = label, rows.get(k, i)
    problems = []
    if unknown:
        # label words are the hospital's vocabulary, not patient data: they may be shown
        problems.append(f"{sum(unknown.values())} row(s) have a label that is not one of "
                        f"{', '.join(sorted(set(LABEL_WORDS)))} (values: "
                        f"{', '.join(f'{w!r} x{n}' for w, n in unknown.most_common(5))}; rows {_rows(unknown_rows)})")
    if empty_keys:
        problems.append(f"{len(empty_keys)} row(s) have an empty {key} (rows {_rows(empty_keys)})")
    if conflicts:
        problems.append(f"{len(conflicts)} row(s) give another label to a {key} labelled above (rows "
                        f"{_rows(conflicts)})")
    if problems:
        raise SourceError(f"labels file {path}: " + "; ".join(problems) + ". Fix those rows; an RT-PCR negative is "
                          "labelled by what the image shows (normal, pneumonia, other)")
    if not labels:
        raise SourceError(f"labels file {path} has no labelled rows")
    return LabelTable(path, key, labels, rows)


def _rows(rows: list[int], most: int = 8) -> str:
    return ", ".join(map(str, rows[:most])) + (f" and {len(rows) - most} more" if len(rows) > most else "")


# ----------------------------------------------------------------------------- the store and its rows

@dataclass
class DicomSearch:
    """What to retrieve from a PACS (``data build --source dicomweb=URL``)."""

    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    study_date: str | None = None
    """DICOM date range ``YYYYMMDD-YYYYMMDD`` (either end may be left open)."""
    study_description: str | None = None
    """QIDO-RS match on StudyDescription (``*`` wildcards allowed)."""
    max_instances: int | None = None
    progress: bool = True


class _Pseudonymous:
    """Collects dropped items under a pseudonym instead of their path (a DICOM export's paths carry names)."""

    def __init__(self, out: SourceRead, key: bytes, root: Path):
        self.out, self.key, self.root = out, key, root

    def drop(self, item, reason: str) -> None:
        rel = os.path.relpath(str(item), self.root) if os.path.isabs(str(item)) else str(item)
        self.out.drop(pseudonym(self.key, "file", rel), reason)


def _place(src: Path, dest: Path) -> None:
    """``dest`` becomes the same file as ``src``: a hard link where possible, else a copy (never a symlink: the
    store must stay valid when the export is deleted)."""
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _value(ds, name: str) -> str:
    v = ds.get(name)
    if v is None or v == "":
        return ""
    if name == "PixelSpacing":
        try:
            return "\\".join(f"{float(x):g}" for x in v)
        except (TypeError, ValueError):
            return ""
    return " ".join(str(v).split())[:64]


@contextmanager
def _quiet_pydicom():
    """:func:`covid_cxr.imaging.dicom_quiet.quiet_pydicom`, and pydicom's other warnings ignored while headers are
    read (a DICOMDIR's quote the paths of the files it lists)."""
    with quiet_pydicom(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        yield


def _key(value) -> str:
    """A label key as compared on both sides (the labels file, the DICOM header or QIDO answer): surrounding and
    repeated spaces ignored."""
    return " ".join(str(value or "").split())


def _rows_from_files(out: SourceRead, files: list[Path], labels: LabelTable, key: bytes, store: Path,
                     root: Path, place: bool) -> tuple[set[str], set[str]]:
    """One row per kept instance (placed into the store when ``place``); returns (the label keys matched by any
    instance read, kept or not; every key read, for the hints of :func:`_check_matched`)."""
    with _quiet_pydicom():
        return _rows_from_files_quietly(out, files, labels, key, store, root, place)


def _rows_from_files_quietly(out: SourceRead, files: list[Path], labels: LabelTable, key: bytes, store: Path,
                             root: Path, place: bool) -> tuple[set[str], set[str]]:
    instances = store / INSTANCES
    instances.mkdir(parents=True, exist_ok=True)
    rows, matched, seen, keys_read = [], set(), set(), set()
    named = _Pseudonymous(out, key, root)
    for f in files:
        if f.name == "DICOMDIR" or f.name == KEY_FILE or f.name.endswith((".part", ".download")):
            continue
        try:
            ds = read_dicom_header(f)
        except ImageReadError as exc:
            named.drop(f, "not a readable DICOM file" if "not a DICOM" in exc.reason else "unreadable DICOM header")
            continue
        sop = str(ds.get("SOPInstanceUID") or "")
        name = pseudonym(key, "instance", sop) if sop else None
        item = name or f
        if not sop:
            named.drop(f, "DICOM file without a SOP Instance UID")
            continue
        if sop in seen:
            out.drop(name, "the same SOP Instance UID appears twice (kept once)")
            continue
        seen.add(sop)
        k = _key(ds.get(labels.key))
        keys_read.add(k)
        if k in labels.labels:
            matched.add(k)
        problem = chest_radiograph_problem(f, ds)
        if problem is not None:
            out.drop(item, _reason(problem))
            continue
        view = _value(ds, "ViewPosition").upper()
        if view not in FRONTAL_VIEW_POSITIONS:
            out.drop(item, f"View Position {view!r} is not PA or AP" if view else "no View Position (unknown view)")
            continue
        if k not in labels.labels:
            out.drop(item, f"no label: its {labels.key} is not in the labels file")
            continue
        dest = instances / f"{name}.dcm"
        if place:
            try:
                _place(f, dest)
            except OSError as exc:  # its message would carry the export's path (patient names): name the store
                raise SourceError(f"cannot write {dest.name} into the DICOM store {store}: "
                                  f"{exc.strerror or type(exc).__name__}; free space there or pass --dicom-store "
                                  "on another disk") from None
        pid = str(ds.get("PatientID") or "").strip()
        patient = (pseudonym(key, "patient", pid) if pid else
                   pseudonym(key, "study", str(ds.get("StudyInstanceUID") or sop)))
        label = labels.labels[k]
        rows.append({"path": str(dest), "label": label, "finding": label, "patient_id": patient,
                     "view": view, "source_split": "", "modality": _value(ds, "Modality"),
                     "manufacturer": _value(ds, "Manufacturer"), "photometric": _value(ds, "PhotometricInterpretation"),
                     "pixel_spacing": _value(ds, "PixelSpacing")})
    if rows and sum(r["patient_id"].startswith("study-") for r in rows):
        out.notes.append(f"{sum(r['patient_id'].startswith('study-') for r in rows)} instance(s) have no PatientID: "
                         "each of their studies counts as its own patient")
    out.images = _frame(rows, out.source)
    return matched, keys_read


def _reason(problem: str) -> str:
    """A radiograph check's reason as a kind, without the header's own value (a free-text Body Part Examined could
    hold anything)."""
    kinds = (("no pixel data", "DICOM file without pixel data (a report, a presentation state)"),
             ("Modality", "Modality is not a radiograph (CR, DX)"), ("floating-point", "floating-point pixel data"),
             ("Body Part Examined", "Body Part Examined names another part than the chest"),
             ("lateral", "lateral view"))
    return next((kind for marker, kind in kinds if marker in problem), "not a frontal chest radiograph")


def _check_matched(out: SourceRead, labels: LabelTable, matched: tuple[set[str], set[str]], allow_unmatched: bool,
                   partial: bool = False) -> None:
    """Label rows whose key matched no instance: an error (with counts, row numbers and what would have matched
    ignoring case or leading zeros), a note with ``allow_unmatched``, and a note on a partial (trial) retrieve."""
    matched, read = matched
    missing = [k for k in labels.labels if k not in matched]
    if not missing:
        return
    rows = sorted(labels.rows[k] for k in missing)
    text = (f"{len(missing)} of {len(labels)} label row(s) in {labels.path} match no instance of source "
            f"{out.source} by {labels.key} (rows {_rows(rows)}; {len(matched)} matched)")
    folded = {k.casefold(): k for k in read}
    stripped = {k.casefold().lstrip("0"): k for k in read}
    near_case = sum(k.casefold() in folded for k in missing)
    near_zero = sum(k.casefold() not in folded and k.casefold().lstrip("0") in stripped for k in missing)
    if near_case or near_zero:
        text += (f"; {near_case} would match ignoring upper/lower case and {near_zero} ignoring leading zeros: "
                 "check how the key column was exported (a spreadsheet drops leading zeros)")
    if partial:
        out.notes.append(text + " (a partial retrieve, --max-instances: not checked)")
        return
    if not allow_unmatched:
        reasons = Counter(d["reason"] for d in out.dropped)
        why = "; ".join(f"{n} {r}" for r, n in reasons.most_common(4))
        raise SourceError(text + (f"; instances not used: {why}" if why else "") + ". Check the key column and the "
                          "search (dates, modalities), or pass --allow-unmatched-labels to build without them")
    out.notes.append(text + " (--allow-unmatched-labels)")


def source_name(kind: str, location: str) -> str:
    """A DICOM source's name: ``dicom-<folder>`` or ``dicomweb-<host>`` (two PACS or exports can go into one
    dataset, and a model trained at one hospital is told apart from another's data). The folder you pass is named
    in the dataset: give the export root a neutral name."""
    if kind == "dicomweb":
        tail = split_credentials(location)[0].partition("://")[2].split("/")[0]
        return plain_name(f"dicomweb-{tail.rsplit(':', 1)[0] if tail.count(':') == 1 else tail}")
    path = Path(location)
    return plain_name(f"dicom-{(path.parent if path.name.upper() == 'DICOMDIR' else path).resolve().name}")


def read_dicom(root: str | Path, labels: LabelTable, store: Path, *, allow_unmatched: bool = False,
               name: str | None = None) -> SourceRead:
    """A folder of exported DICOM files (searched recursively) or a DICOMDIR file: each kept instance is linked
    into ``store`` (see the module docstring)."""
    root = Path(root).expanduser()
    name = name or source_name("dicom", str(root))
    out = SourceRead(name, pd.DataFrame(), root=(store / INSTANCES).resolve())
    key = patient_key(store)
    if root.is_file() and root.name.upper() == "DICOMDIR":
        with _quiet_pydicom():
            files = _dicomdir_files(root, out, key)
        base = root.parent.resolve()
    else:
        base = require_dir(root, name)
        files = walk_files(base, _Pseudonymous(out, key, base))
    matched = _rows_from_files(out, files, labels, key, store, base, place=True)
    _check_matched(out, labels, matched, allow_unmatched)
    log.info("%s: %d instance(s) kept of %d file(s)", name, len(out.images), len(files))
    return out


def _dicomdir_files(path: Path, out: SourceRead, key: bytes) -> list[Path]:
    """The files a DICOMDIR lists (its records' Referenced File IDs), each checked: a listed file that is missing
    or would lie outside the DICOMDIR's folder is counted (under a pseudonym), never read."""
    import pydicom

    try:
        index = pydicom.dcmread(path)
        records = list(index.DirectoryRecordSequence)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a malformed DICOMDIR
        raise SourceError(f"DICOMDIR {path} cannot be read ({type(exc).__name__}); pass the folder that holds the "
                          "exported files instead") from None
    files, base = [], path.parent.resolve()
    for rec in records:
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(p) for p in (ref if isinstance(ref, (list, pydicom.multival.MultiValue)) else [ref])]
        item = pseudonym(key, "file", "/".join(parts))
        p = base.joinpath(*parts)
        if any(part in ("", ".", "..") for part in parts) or not p.resolve().is_relative_to(base):
            out.drop(item, "listed in the DICOMDIR outside its folder (refused)")
        elif not p.is_file():
            out.drop(item, "listed in the DICOMDIR but missing")
        else:
            files.append(p)
    return files


def read_dicomweb(url: str, labels: LabelTable, store: Path, search: DicomSearch, *,
                  allow_unmatched: bool = False, name: str | None = None) -> SourceRead:
    """Search a PACS (QIDO-RS: studies with the modalities, dates and description asked for, then their series of
    those modalities and their instances), retrieve the instances of labelled studies into ``store`` (WADO-RS,
    streamed; instances already in the store are not fetched again) and read them as :func:`read_dicom` does.
    Studies without a label are never retrieved (counted)."""
    client = DicomWeb(url)
    name = name or source_name("dicomweb", url)
    key = patient_key(store)
    instances = store / INSTANCES
    instances.mkdir(parents=True, exist_ok=True)
    out = SourceRead(name, pd.DataFrame(), root=instances.resolve())
    todo, not_labelled = _search(client, labels, search)
    for _ in range(not_labelled):
        out.drop("study", f"no label: its {labels.key} is not in the labels file (not retrieved)")
    partial = search.max_instances is not None and len(todo) > search.max_instances
    if partial:
        todo = todo[:search.max_instances]
    from tqdm.auto import tqdm

    fetched = reused = 0
    wanted: list[Path] = []
    for study, series, sop in tqdm(todo, desc=f"{name}: retrieve", unit="instance", disable=not search.progress):
        dest = instances / f"{pseudonym(key, 'instance', sop)}.dcm"
        if dest.is_file():
            reused += 1
            wanted.append(dest)
            continue
        try:
            client.retrieve_instance(study, series, sop, dest, max_bytes=MAX_DICOM_INSTANCE_BYTES)
            fetched += 1
            wanted.append(dest)
        except PacsError as exc:
            answer = re.search(r"HTTP \d{3}[^(;]*", str(exc))
            out.drop(dest.stem, f"not retrieved: {answer.group(0).strip() if answer else 'the PACS failed'}")
    out.notes.append(f"{len(todo)} instance(s) found in the PACS for labelled studies: {fetched} retrieved, "
                     f"{reused} already in the DICOM store")
    matched = _rows_from_files(out, wanted, labels, key, store, instances, place=False)
    _check_matched(out, labels, matched, allow_unmatched, partial=partial)
    return out


def _search(client: DicomWeb, labels: LabelTable, search: DicomSearch) -> tuple[list[tuple[str, str, str]], int]:
    """(study, series, instance) UIDs of the labelled studies' series of the wanted modalities, and the number of
    studies found without a label."""
    studies: dict[str, bool] = {}
    for modality in search.modalities:
        params = {"ModalitiesInStudy": modality,
                  "includefield": "00080050"}  # AccessionNumber: matched here, never written anywhere
        if search.study_date:
            params["StudyDate"] = search.study_date
        if search.study_description:
            params["StudyDescription"] = search.study_description
        for st in client.search("studies", params):
            uid = dicom_json_value(st, "0020000D")
            k = _key(uid if labels.key == "StudyInstanceUID" else dicom_json_value(st, "00080050"))
            if uid:
                studies[uid] = studies.get(uid, False) or k in labels.labels
    todo = []
    for study, labelled in studies.items():
        if not labelled:
            continue
        for modality in search.modalities:
            for se in client.search(f"studies/{study}/series", {"Modality": modality}):
                series = dicom_json_value(se, "0020000E")
                for inst in client.search(f"studies/{study}/series/{series}/instances"):
                    sop = dicom_json_value(inst, "00080018")
                    if series and sop:
                        todo.append((study, series, sop))
    return sorted(set(todo)), sum(not v for v in studies.values())


def read_dicom_source(name: str, path: str, cfg) -> SourceRead:
    """``--source dicom=DIR`` or ``--source dicomweb=URL`` of a :class:`covid_cxr.data.options.DataConfig`."""
    labels = read_labels(cfg.labels, cfg.label_key, cfg.label_column)
    store = store_for(cfg.out, cfg.dicom_store)
    if name == "dicomweb":
        search = DicomSearch(tuple(cfg.modalities), cfg.study_date, cfg.study_description, cfg.max_instances,
                             cfg.progress)
        return read_dicomweb(path, labels, store, search, allow_unmatched=cfg.allow_unmatched_labels)
    return read_dicom(path, labels, store, allow_unmatched=cfg.allow_unmatched_labels)


def is_dicom_source(name: str) -> bool:
    """A source read by this module (``dicom-...``, ``dicomweb-...``)."""
    return name.split("-", 1)[0] in ("dicom", "dicomweb")


def describe(url_or_dir: str) -> str:
    """How a DICOM source is named in the dataset report (a DICOMweb URL without its credentials)."""
    return printable(split_credentials(url_or_dir)[0] if re.match(r"^https?://", url_or_dir) else url_or_dir)
