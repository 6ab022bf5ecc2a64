"""Adapters from each public chest X-ray source's own layout to covid-cxr's rows.

Each reader returns a :class:`SourceRead`: one row per image it keeps (columns
:data:`SOURCE_COLUMNS`) and one record per file or metadata row it does not use, with
the reason. Nothing is dropped silently. Labels are mapped onto :data:`LABELS`; the
source's own wording is kept in ``finding``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from covid_cxr.data.source_files import (LINK_HINT, glob_escape, is_inside, is_utf8, links_allowed_into,
                                         read_metadata_csv, require_dir, walk_files)
from covid_cxr.errors import SourceError
from covid_cxr.files import printable
from covid_cxr.imaging.images import is_image_file
from covid_cxr.paths import plain_name

log = logging.getLogger(__name__)

LABELS = ("normal", "covid", "pneumonia", "other")
"""Labels a source row can carry in the manifest."""

SOURCE_COLUMNS = ["path", "label", "finding", "source", "patient_id", "view", "source_split"]

FRONTAL_VIEWS = {"pa", "ap", "ap supine", "ap semi erect", "ap erect", "ap semi-erect", "pa erect"}
NON_FRONTAL_VIEWS = {"l", "lateral", "ll", "rl", "axial", "coronal", "sagittal"}

_PNEUMONIA_WORDS = ("pneumonia", "bacteria", "viral", "virus", "streptococcus", "klebsiella", "e.coli",
                    "legionella", "mycoplasma", "pneumocystis", "influenza", "varicella", "sars", "mers",
                    "chlamydophila", "nocardia", "aspergillosis", "herpes", "staphylococcus")


@dataclass
class SourceRead:
    """What a reader found in one source folder."""

    source: str
    images: pd.DataFrame
    root: Path | None = None
    """The source's folder (resolved); every image path lies inside it."""
    synthetic: bool = False
    """The images are synthetic (phantoms), not patients: reports say so."""
    dropped: list[dict] = field(default_factory=list)
    """One dict per unused file or metadata row: ``{"source", "item", "reason"}``."""
    notes: list[str] = field(default_factory=list)
    """Facts a user must know about this source (printed in the ingest report)."""

    def drop(self, item: str | Path, reason: str) -> None:
        self.dropped.append({"source": self.source, "item": str(item), "reason": reason})


def label_from_finding(finding: str) -> str | None:
    """Map a source's finding text onto :data:`LABELS`; None when the row is unlabelled."""
    f = " ".join(str(finding).split()).lower()
    if f in ("", "nan", "todo", "none", "unknown"):
        return None
    if "covid-19" in f or "covid19" in f or "sars-cov-2" in f:
        return "covid"
    if f in ("no finding", "normal"):
        return "normal"
    if any(word in f for word in _PNEUMONIA_WORDS):
        return "pneumonia"
    return "other"


def view_kind(view: str) -> str:
    """'frontal', 'non-frontal' or 'unknown' for a view string such as 'AP Supine' or 'L'."""
    v = " ".join(str(view).replace("_", " ").split()).lower()
    if v in ("", "nan"):
        return "unknown"
    if v in FRONTAL_VIEWS:
        return "frontal"
    if v in NON_FRONTAL_VIEWS:
        return "non-frontal"
    return "unknown"


def _frame(rows: list[dict], source: str) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=SOURCE_COLUMNS)
    df["source"] = source
    return df


def _lexical(path: Path) -> Path:
    """``path`` with ``.`` and ``..`` removed but links kept: the manifest records where an image lies in its source
    (a link inside the source stays a path inside it); :func:`is_inside` checks where it leads."""
    return Path(os.path.normpath(path))


def _read_metadata_source(root: Path, source: str, image_column: str | None,
                          resolve: Callable[[Path, dict], Path | None], extra_required: list[str],
                          patient_of: Callable[[str], str] = lambda pid: pid) -> SourceRead:
    """Shared logic of the Cohen-style sources (Cohen, Actualmed, Figure1)."""
    root = require_dir(root, source)
    meta = root / "metadata.csv"
    if meta.is_symlink() and not is_inside(meta, root):
        raise SourceError(f"{meta} is a link pointing outside the source folder (refused); copy the real file "
                          "there, or pass --allow-links-to with the folder it leads into")
    required = ["patientid", "finding", "view", "modality"] + extra_required
    df, encoding = read_metadata_csv(meta, required)
    out = SourceRead(source, _frame([], source), root=root)
    if encoding != "utf-8":
        out.notes.append(f"{meta.name} is {encoding}-encoded, not UTF-8")
    by_path: dict[Path, dict] = {}
    referenced: set[Path] = set()
    for _, row in df.iterrows():
        item = f"{meta}:row {row['_line']}"
        if image_column and not row[image_column].strip():
            out.drop(item, "metadata row names no image file")
            continue
        try:
            path = resolve(root, row)
            outside = path is not None and not is_inside(path, root)
            missing = not outside and (path is None or not path.is_file())
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            out.drop(item, "the image file name in metadata.csv is not a valid file name")
            continue
        if outside:
            out.drop(item, "the image path in metadata.csv points outside the source folder (refused"
                           f"{LINK_HINT})")
            continue
        if missing:
            out.drop(item, f"image file {path.name if path else '?'} listed in metadata.csv is missing")
            continue
        referenced.add(path)
        modality = row["modality"].strip()
        if modality and modality.lower() not in ("x-ray", "xray", "cr", "dx"):
            out.drop(path, f"modality {modality} (only X-rays are used)")
            continue
        kind = view_kind(row["view"])
        if kind == "non-frontal":
            out.drop(path, f"non-frontal view {row['view'].strip()}")
            continue
        label = label_from_finding(row["finding"])
        if label is None:
            out.drop(path, f"unlabelled finding {row['finding'].strip()!r}")
            continue
        patient = patient_of(row["patientid"].strip()) or path.stem
        if path in by_path:
            # The same image listed twice (Cohen lists some under two patient ids):
            # one image, and both ids join one patient group.
            prev = by_path[path]
            ids = set(prev["patient_id"].split(";")) | {patient}
            prev["patient_id"] = ";".join(sorted(ids))
            if prev["label"] != label:
                out.notes.append(f"{path.name}: listed twice with findings {prev['finding']!r} and "
                                 f"{row['finding']!r}; kept the first")
            out.drop(f"{item} ({path.name}, patient ids {prev['patient_id']})",
                     "second metadata row for an image already listed (merged; its patient ids form one patient)")
            continue
        by_path[path] = {"path": str(path), "label": label, "finding": " ".join(row["finding"].split()),
                         "patient_id": patient, "view": row["view"].strip() or "unknown", "source_split": ""}
    unknown_views = sum(1 for r in by_path.values() if r["view"] == "unknown")
    if unknown_views:
        out.notes.append(f"{unknown_views} images have no view in metadata.csv; kept as view 'unknown'")
    listed = {p.resolve() for p in referenced}  # a listed image may be a link: compare where files lead
    for folder in sorted({p.parent for p in referenced} | {root / "images"}):
        if not folder.is_dir() or not is_inside(folder, root):
            continue
        for f in sorted(folder.iterdir()):
            if not is_utf8(f):
                out.drop(printable(f), "file name is not valid UTF-8; rename the file")
            elif f.is_symlink() and not is_inside(f, root):
                out.drop(f, f"link pointing outside the source folder (refused{LINK_HINT})")
            elif f.is_file() and f.resolve() not in listed:
                out.drop(f, "not listed in metadata.csv" if is_image_file(f) else "not an image file")
    out.images = _frame(list(by_path.values()), source)
    return out


def read_cohen(root: str | Path) -> SourceRead:
    """Cohen et al., covid-chestxray-dataset: ``metadata.csv`` + ``images/<filename>``.

    Keeps X-ray frontal views (PA, AP, AP Supine, AP semi erect, AP erect); ``patientid`` is the patient.
    """

    def resolve(r: Path, row: dict) -> Path:
        folder = row.get("folder", "").strip() or "images"
        return _lexical(r / folder / row["filename"].strip())

    return _read_metadata_source(Path(root), "cohen", "filename", resolve, ["filename"])


def read_actualmed(root: str | Path) -> SourceRead:
    """Actualmed COVID-19 Chest X-ray Dataset: ``metadata.csv`` (``imagename``) + ``images/``."""

    def resolve(r: Path, row: dict) -> Path:
        return _lexical(r / "images" / row["imagename"].strip())

    return _read_metadata_source(Path(root), "actualmed", "imagename", resolve, ["imagename"])


def read_figure1(root: str | Path) -> SourceRead:
    """Figure 1 COVID-19 Chest X-ray Dataset: ``metadata.csv`` + ``images/<patientid>.<ext>``."""

    def resolve(r: Path, row: dict) -> Path | None:
        pid = row["patientid"].strip()
        if not pid:
            return None
        if "/" in pid or "\\" in pid or pid in (".", ".."):
            return r / "images" / pid  # not globbed: refused if it leads outside, else missing
        for f in sorted((r / "images").glob(f"{glob_escape(pid)}.*")):
            if is_image_file(f):
                return f
        return r / "images" / f"{pid}.(jpg|png)"

    # COVID-00003a, COVID-00003b: two images of one patient (the letter numbers the image).
    return _read_metadata_source(Path(root), "figure1", None, resolve, [],
                                 patient_of=lambda pid: re.sub(r"(?<=\d)[a-z]$", "", pid))


RADIOGRAPHY_CLASSES = {
    "covid": ("covid", "COVID-19"),
    "covid-19": ("covid", "COVID-19"),
    "normal": ("normal", "Normal"),
    "viral pneumonia": ("pneumonia", "Viral Pneumonia"),
    "lung_opacity": ("other", "Lung Opacity (non-COVID)"),
    "lung opacity": ("other", "Lung Opacity (non-COVID)"),
}


def _find_class_root(root: Path, known: set[str], depth: int = 3) -> Path | None:
    """The folder at or below ``root`` (breadth first) whose subfolders include known class names."""
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            subs = [s for s in d.iterdir() if s.is_dir() and not s.is_symlink() and s.name != "__MACOSX" and is_utf8(s)]
            if any(s.name.lower() in known for s in subs):
                return d
            nxt.extend(sorted(subs))
        level = nxt
    return None


def read_radiography(root: str | Path) -> SourceRead:
    """COVID-19 Radiography Database (Kaggle), in each published layout.

    * current: ``<Class>/images/*.png`` with ``<Class>/masks/`` beside (COVID, Normal,
      Lung_Opacity, Viral Pneumonia);
    * flat: ``COVID-19_Radiography_Dataset/COVID/COVID-1.png``;
    * oldest: ``COVID-19/``, ``NORMAL/``, ``Viral Pneumonia/`` with names like ``NORMAL (12).png``.

    The database has no patient ids: each image is treated as its own patient.
    """
    root = require_dir(Path(root), "radiography")
    base = _find_class_root(root, set(RADIOGRAPHY_CLASSES))
    if base is None:
        raise SourceError(f"{root}: no COVID/, Normal/, COVID-19/ or 'Viral Pneumonia/' folder found; "
                          "point --source radiography=PATH at the unpacked COVID-19 Radiography Database")
    out = SourceRead("radiography", _frame([], "radiography"), root=root)
    out.notes.append("no patient ids: each image is treated as its own patient, so images of one patient "
                     "may fall in different splits")
    rows = []
    for f in walk_files(base, out):
        rel = f.relative_to(base)
        if len(rel.parts) == 1:
            out.drop(f, "not in a class folder" if is_image_file(f) else "not an image file")
            continue
        mapped = RADIOGRAPHY_CLASSES.get(rel.parts[0].lower())
        if mapped is None:
            out.drop(f, f"folder {rel.parts[0]!r} is not a class of this database")
        elif "masks" in rel.parts[1:-1]:
            out.drop(f, "lung segmentation mask, not an X-ray")
        elif not is_image_file(f):
            out.drop(f, "not an image file")
        else:
            label, finding = mapped
            rows.append({"path": str(f), "label": label, "finding": finding,
                         "patient_id": f"{rel.parts[0]}/{f.stem}", "view": "unknown", "source_split": ""})
    out.images = _frame(rows, "radiography")
    return out


_MOONEY_PATIENT = (re.compile(r"^(person\d+)_", re.I), re.compile(r"^(NORMAL2-IM-\d+)-", re.I),
                   re.compile(r"^(IM-\d+)-", re.I))


def mooney_patient(filename: str) -> str | None:
    """Patient id from a Mooney file name (``person1_virus_6.jpeg`` -> ``person1``), or None."""
    for pattern in _MOONEY_PATIENT:
        m = pattern.match(filename)
        if m:
            return m.group(1)
    return None


def read_mooney(root: str | Path) -> SourceRead:
    """Kermany/Mooney Chest X-Ray Images (Pneumonia): ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``.

    All patients are children (1-5 years). The original train/val/test split is kept in
    ``source_split`` only; covid-cxr makes its own patient-level split.
    """
    root = require_dir(Path(root), "mooney")
    out = SourceRead("mooney", _frame([], "mooney"), root=root)
    out.notes.append("pediatric (children aged 1-5): a normal class drawn from here against adult COVID "
                     "images lets a model learn age instead of disease")
    rows, unparsed = [], 0
    files = [f for f in walk_files(root, out) if "__MACOSX" not in f.parts]
    for f in files:
        cls = f.parent.name.upper()
        if cls not in ("NORMAL", "PNEUMONIA"):
            out.drop(f, "not in a NORMAL/ or PNEUMONIA/ folder")
            continue
        if not is_image_file(f):
            out.drop(f, "not an image file")
            continue
        patient = mooney_patient(f.name)
        if patient is None:
            unparsed += 1
            patient = f.stem
        name = f.name.lower()
        finding = "Normal" if cls == "NORMAL" else (
            "Bacterial pneumonia" if "bacteria" in name else "Viral pneumonia" if "virus" in name else "Pneumonia")
        split = f.parent.parent.name.lower()
        rows.append({"path": str(f), "label": "normal" if cls == "NORMAL" else "pneumonia",
                     "finding": finding, "patient_id": patient, "view": "unknown",
                     "source_split": split if split in ("train", "val", "test") else ""})
    if not rows:
        raise SourceError(f"{root}: no images in NORMAL/ or PNEUMONIA/ folders; point --source mooney=PATH at "
                          "the unpacked chest_xray folder (or its parent)")
    if unparsed:
        out.notes.append(f"{unparsed} file names did not match personN_/IM-N-/NORMAL2-IM-N-; "
                         "each was treated as its own patient")
    out.images = _frame(rows, "mooney")
    return out


FOLDER_LABELS = {"covid": "covid", "covid-19": "covid", "covid19": "covid", "normal": "normal",
                 "pneumonia": "pneumonia", "other": "other"}


def read_folder(root: str | Path) -> SourceRead:
    """A generic ``ROOT/<label>/...`` image folder (e.g. a hospital's own export or the demo phantoms).

    Subfolder names are labels (covid, normal, pneumonia, other; ``COVID-19`` is accepted).
    Each image is its own patient. The source is named after the folder (characters other than letters, digits,
    ".", "_" and "-" become "-", since the name becomes a folder name in crossval).
    """
    root = require_dir(Path(root), "folder")
    name = plain_name(root.name)  # a source name becomes a folder name (crossval folds): never a path
    out = SourceRead(name, _frame([], name), root=root, synthetic=is_synthetic_folder(root))
    out.notes.append("generic folder source: no patient ids, each image is its own patient")
    if out.synthetic:
        out.notes.append("SYNTHETIC images (README.txt says so): not patients; results on them show that the "
                         "pipeline works, not that anything detects COVID-19")
    rows, loose = [], 0
    for f in walk_files(root, out):
        rel = f.relative_to(root)
        if len(rel.parts) == 1:
            if is_image_file(f):
                out.drop(f, "image not inside a <label>/ folder")
                loose += 1
            continue  # README files etc. beside the class folders
        label = FOLDER_LABELS.get(rel.parts[0].lower())
        if label is None:
            out.drop(f, f"folder {rel.parts[0]!r} is not one of {', '.join(sorted(FOLDER_LABELS))}")
        elif not is_image_file(f):
            out.drop(f, "not an image file")
        else:
            rows.append({"path": str(f), "label": label, "finding": rel.parts[0],
                         "patient_id": str(rel.with_suffix("")), "view": "unknown", "source_split": ""})
    if loose:
        layout = (f"the folder source reads one subfolder per label: {root}/covid/, {root}/normal/ (and optionally "
                  f"pneumonia/, other/); move each image into the folder of its label")
        if not rows:
            raise SourceError(f"folder source {root}: its {loose} image(s) lie directly in it, none inside a label "
                              f"folder; {layout}")
        out.notes.append(f"{loose} image(s) lie directly in the folder and were not used; {layout}")
    out.images = _frame(rows, name)
    return out


def is_synthetic_folder(root: Path) -> bool:
    """A folder whose README.txt starts with SYNTHETIC (as :func:`covid_cxr.imaging.phantoms.generate_phantoms` writes)."""
    readme = Path(root) / "README.txt"
    if readme.is_symlink() and not is_inside(readme, Path(root)):
        return False  # never read a file outside the source folder
    try:
        with open(readme, encoding="utf-8", errors="replace") as f:
            return f.readline().strip().upper().startswith("SYNTHETIC")
    except OSError:
        return False


READERS: dict[str, Callable[[str | Path], SourceRead]] = {
    "cohen": read_cohen,
    "mooney": read_mooney,
    "radiography": read_radiography,
    "actualmed": read_actualmed,
    "figure1": read_figure1,
    "folder": read_folder,
}
"""``--source NAME=PATH`` names and their readers."""

PATIENT_METADATA_PRIORITY = ("cohen", "figure1", "actualmed", "mooney", "radiography")
"""When one image appears in several sources, the copy from the first source here is kept:
sources with real patient ids come first."""


def read_source(name: str, root: str | Path, links_to: Sequence[str | Path] = ()) -> SourceRead:
    """Read one source by its ``--source`` name. Links in it are followed when they resolve inside the source
    folder or inside one of ``links_to`` (``--allow-links-to``: shared storage the user named); others are refused,
    each counted with its reason."""
    try:
        reader = READERS[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; use one of: {', '.join(READERS)}") from None
    with links_allowed_into(links_to):
        result = reader(root)
    log.info("%s: %d images kept, %d items not used", result.source, len(result.images), len(result.dropped))
    return result
