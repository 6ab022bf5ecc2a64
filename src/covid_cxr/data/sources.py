"""Adapters from each public chest X-ray source's own layout to covid-cxr's rows.

Each reader returns a :class:`SourceRead`: one row per image it keeps (columns
:data:`SOURCE_COLUMNS`) and one record per file or metadata row it does not use, with
the reason. Nothing is dropped silently. Labels are mapped onto :data:`LABELS`; the
source's own wording is kept in ``finding``. A lung mask that belongs to an image is not an
image: it is recorded in that image's ``mask_path`` (OpenIST's ``<id>@.png``, the Radiography
Database's ``<Class>/masks/``, a folder source's ``<label>/masks/``), never as a row of its own.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from covid_cxr.data.dataset import ACQUISITION_COLUMNS
from covid_cxr.data.source_files import (LINK_HINT, glob_escape, is_inside, is_utf8, links_allowed_into,
                                         read_metadata_csv, require_dir, walk_files)
from covid_cxr.errors import SourceError
from covid_cxr.files import printable
from covid_cxr.imaging.images import is_image_file
from covid_cxr.paths import plain_name

log = logging.getLogger(__name__)

LABELS = ("normal", "covid", "pneumonia", "other")
"""Labels a source row can carry in the manifest."""

SOURCE_COLUMNS = ["path", "label", "finding", "source", "patient_id", "view", "source_split", "mask_path",
                  *ACQUISITION_COLUMNS]
"""``mask_path``: the image's lung mask (a file inside the source, like ``path``), '' when it has none; the
acquisition columns (:data:`covid_cxr.data.dataset.ACQUISITION_COLUMNS`) are '' where the source does not say."""

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
    blank = {"mask_path": "", **{c: "" for c in ACQUISITION_COLUMNS}}
    df = pd.DataFrame([{**blank, **r} for r in rows], columns=SOURCE_COLUMNS)
    df["source"] = source
    return df


def _lexical(path: Path) -> Path:
    """``path`` with ``.`` and ``..`` removed but links kept: the manifest records where an image lies in its source
    (a link inside the source stays a path inside it); :func:`is_inside` checks where it leads."""
    return Path(os.path.normpath(path))


def _read_metadata_source(root: Path, source: str, image_column: str | None,
                          resolve: Callable[[Path, dict], Path | None], extra_required: list[str],
                          patient_of: Callable[[str], str] = lambda pid: pid, *, patient_column: str = "patientid",
                          finding_column: str = "finding", modality_column: str | None = "modality",
                          image_folder: str = "images", exclude: Callable[[dict], str | None] | None = None
                          ) -> SourceRead:
    """Shared logic of the sources described by a ``metadata.csv`` (Cohen, Actualmed, Figure1, COVID-CXNet).

    ``patient_column``, ``finding_column`` and ``modality_column`` (None: the source has X-rays only) name the
    columns read; ``image_folder`` is where unlisted files are looked for; ``exclude(row)`` returns the reason a
    source-specific rule leaves a row out (None keeps it).
    """
    root = require_dir(root, source)
    meta = root / "metadata.csv"
    if meta.is_symlink() and not is_inside(meta, root):
        raise SourceError(f"{meta} is a link pointing outside the source folder (refused); copy the real file "
                          "there, or pass --allow-links-to with the folder it leads into")
    required = [patient_column, finding_column, "view"] + ([modality_column] if modality_column else [])
    df, encoding = read_metadata_csv(meta, required + extra_required)
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
        path = _listed_image(out, item, root, resolve, row)
        if path is None:
            continue
        referenced.add(path)
        modality = row[modality_column].strip() if modality_column else ""
        if modality and modality.lower() not in ("x-ray", "xray", "cr", "dx"):
            out.drop(path, f"modality {modality} (only X-rays are used)")
            continue
        kind = view_kind(row["view"])
        if kind == "non-frontal":
            out.drop(path, f"non-frontal view {row['view'].strip()}")
            continue
        reason = exclude(row) if exclude else None
        if reason:
            out.drop(path, reason)
            continue
        finding = row[finding_column]
        label = label_from_finding(finding)
        if label is None:
            out.drop(path, f"unlabelled finding {finding.strip()!r}")
            continue
        patient = patient_of(row[patient_column].strip()) or path.stem
        if path in by_path:
            # The same image listed twice (Cohen lists some under two patient ids):
            # one image, and both ids join one patient group.
            prev = by_path[path]
            ids = set(prev["patient_id"].split(";")) | {patient}
            prev["patient_id"] = ";".join(sorted(ids))
            if prev["label"] != label:
                out.notes.append(f"{path.name}: listed twice with findings {prev['finding']!r} and "
                                 f"{finding!r}; kept the first")
            out.drop(f"{item} ({path.name}, patient ids {prev['patient_id']})",
                     "second metadata row for an image already listed (merged; its patient ids form one patient)")
            continue
        by_path[path] = {"path": str(path), "label": label, "finding": " ".join(finding.split()),
                         "patient_id": patient, "view": row["view"].strip() or "unknown", "source_split": ""}
    unknown_views = sum(1 for r in by_path.values() if r["view"] == "unknown")
    if unknown_views:
        out.notes.append(f"{unknown_views} images have no view in metadata.csv; kept as view 'unknown'")
    _drop_unlisted(out, root, referenced, root / image_folder)
    out.images = _frame(list(by_path.values()), source)
    return out


def _listed_image(out: SourceRead, item: str, root: Path, resolve: Callable[[Path, dict], Path | None],
                  row: dict) -> Path | None:
    """The image file a metadata row names, or None when it is refused or missing (counted in ``out``)."""
    try:
        path = resolve(root, row)
        outside = path is not None and not is_inside(path, root)
        missing = not outside and (path is None or not path.is_file())
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        out.drop(item, "the image file name in metadata.csv is not a valid file name")
        return None
    if outside:
        out.drop(item, f"the image path in metadata.csv points outside the source folder (refused{LINK_HINT})")
        return None
    if missing:
        out.drop(item, f"image file {path.name if path else '?'} listed in metadata.csv is missing")
        return None
    return path


def _drop_unlisted(out: SourceRead, root: Path, referenced: set[Path], image_folder: Path) -> None:
    """Count every file in the image folders that metadata.csv does not list (it is not used)."""
    listed = {p.resolve() for p in referenced}  # a listed image may be a link: compare where files lead
    for folder in sorted({p.parent for p in referenced} | {image_folder}):
        if not folder.is_dir() or not is_inside(folder, root):
            continue
        for f in sorted(folder.iterdir()):
            if not is_utf8(f):
                out.drop(printable(f), "file name is not valid UTF-8; rename the file")
            elif f.is_symlink() and not is_inside(f, root):
                out.drop(f, f"link pointing outside the source folder (refused{LINK_HINT})")
            elif f.is_file() and f.resolve() not in listed:
                out.drop(f, "not listed in metadata.csv" if is_image_file(f) else "not an image file")


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


ADULT_AGE = 18.0
"""COVID-CXNet rows whose stated age (years) is below this are left out: the normal images of the adult sources
against children's covid images would let a model learn age."""

CXNET_IMAGES = "chest_xray_images/covid19"


def _age(text: str) -> float | None:
    """An age in years from a metadata cell ('49', '0.25'), None when it is not given or not a number."""
    try:
        age = float(text.strip())
    except ValueError:
        return None
    return age if age == age else None  # NaN: not given


def _cxnet_exclusion(row: dict) -> str | None:
    """Why COVID-CXNet leaves a metadata row out (None keeps it): not COVID-19, a negative PCR test, a child."""
    label = " ".join(row["label"].split())
    if label.lower() != "covid-19":
        return f"label {label!r} (only COVID-19 rows are used)"
    if row["pcr_test"].strip().lower() == "negative":
        return "PCR test negative"
    age = _age(row["age"])
    if age is not None and age < ADULT_AGE:
        return f"age under {ADULT_AGE:g} (only adults and unknown ages are used)"
    return None


def read_cxnet(root: str | Path) -> SourceRead:
    """COVID-CXNet (Haghanifar et al.): ``metadata.csv`` (``filename``, ``patient_id``, ``view``, ``label``,
    ``pcr_test``, ``age``) + ``chest_xray_images/covid19/<filename>``.

    Keeps COVID-19 rows whose PCR test is not negative, of adults or unknown age, frontal or unknown views (an empty
    ``view`` is 'unknown'); ``patient_id`` is the patient. Every other row is counted with its reason.
    """

    def resolve(r: Path, row: dict) -> Path:
        return _lexical(r / CXNET_IMAGES / row["filename"].strip())

    out = _read_metadata_source(Path(root), "cxnet", "filename", resolve, ["filename", "label", "pcr_test", "age"],
                                patient_column="patient_id", finding_column="label", modality_column=None,
                                image_folder=CXNET_IMAGES, exclude=_cxnet_exclusion)
    out.notes.append("many images are figures from papers or posts: some carry arrows, circles, letters or crops "
                     "drawn by their authors")
    return out


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


MASKS = "masks"
"""A folder of lung masks inside a label (class) folder: its files are masks, never images."""


def mask_of(rel: Path) -> Path:
    """Where the lung mask of the image at ``rel`` (relative to the folder holding the label folders) lies:
    ``<label>/masks/`` mirrors the label folder's tree, a leading ``images/`` left out, the name ending in ``.png``:
    ``covid/a.jpg`` -> ``covid/masks/a.png``, ``covid/sub/b.jpg`` -> ``covid/masks/sub/b.png``,
    ``COVID/images/COVID-1.png`` -> ``COVID/masks/COVID-1.png`` (the Radiography Database's current layout)."""
    top, rest = rel.parts[0], rel.parts[1:]
    if len(rest) > 1 and rest[0].lower() == "images":
        rest = rest[1:]
    return Path(top, MASKS, *rest).with_suffix(".png")


def _is_mask(rel: Path) -> bool:
    return any(part.lower() == MASKS for part in rel.parts[1:-1])


def _attach_masks(out: SourceRead, rows: list[dict], masks: dict[Path, Path], key: Callable[[Path], Path]) -> None:
    """Fill each row's ``mask_path`` with ``masks[key(image path)]`` where there is one; a mask that belongs to no
    kept image is counted as not used."""
    used = set()
    for row in rows:
        k = key(Path(row["path"]))
        if k in masks:
            row["mask_path"] = str(masks[k])
            used.add(k)
    for k, f in sorted(masks.items()):
        if k not in used:
            out.drop(f, "lung mask without a kept image of the same name (not used)" if is_image_file(f)
                     else "not an image file")
    if used:
        out.notes.append(f"{len(used)} of {len(rows)} images have a lung mask (manifest column mask_path)")


def read_radiography(root: str | Path) -> SourceRead:
    """COVID-19 Radiography Database (Kaggle), in each published layout.

    * current: ``<Class>/images/*.png`` with ``<Class>/masks/`` beside (COVID, Normal,
      Lung_Opacity, Viral Pneumonia); ``<Class>/masks/<name>`` is the lung mask of ``<Class>/images/<name>``
      (the image's ``mask_path``);
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
    rows, masks = [], {}
    for f in walk_files(base, out):
        rel = f.relative_to(base)
        if len(rel.parts) == 1:
            out.drop(f, "not in a class folder" if is_image_file(f) else "not an image file")
            continue
        mapped = RADIOGRAPHY_CLASSES.get(rel.parts[0].lower())
        if mapped is None:
            out.drop(f, f"folder {rel.parts[0]!r} is not a class of this database")
        elif _is_mask(rel):
            masks[rel] = f  # <Class>/masks/<name>: the lung mask of <Class>/images/<name>
        elif not is_image_file(f):
            out.drop(f, "not an image file")
        else:
            label, finding = mapped
            rows.append({"path": str(f), "label": label, "finding": finding,
                         "patient_id": f"{rel.parts[0]}/{f.stem}", "view": "unknown", "source_split": ""})
    _attach_masks(out, rows, masks, lambda p: mask_of(p.relative_to(base)))
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


OPENIST_IMAGES = ("Datasets/Chest_x-ray", "Chest_x-ray")
"""Where OpenIST's images lie in a clone of its repository (or the folder itself is that one)."""
OPENIST_MASK_SUFFIX = "@.png"


def read_openist(root: str | Path) -> SourceRead:
    """OpenIST's chest X-rays (a teaching set of normal adult PA films): ``Datasets/Chest_x-ray/<id>.jpg``, each
    with its lung mask ``<id>@.png`` (recorded as the image's ``mask_path``, never read as an image).

    ``--source openist=PATH`` may name the repository or the ``Chest_x-ray`` folder itself. Every image is
    ``normal``, view PA, and its own patient (there is no metadata).
    """
    root = require_dir(Path(root), "openist")
    base = next((root / sub for sub in OPENIST_IMAGES if (root / sub).is_dir() and is_inside(root / sub, root)), root)
    out = SourceRead("openist", _frame([], "openist"), root=root)
    out.notes.append("no metadata: every image is a normal adult PA film and its own patient")
    out.notes.append("no license is stated for these images: use them for testing and measuring, never ship them")
    rows, masks = [], {}
    for f in walk_files(base, out):
        if f.name.endswith(OPENIST_MASK_SUFFIX):
            masks[f.with_name(f.name[:-len(OPENIST_MASK_SUFFIX)])] = f
        elif not is_image_file(f):
            out.drop(f, "not an image file")
        else:
            rows.append({"path": str(f), "label": "normal", "finding": "Normal", "view": "PA", "source_split": "",
                         "patient_id": f.relative_to(base).with_suffix("").as_posix()})
    if not rows:
        raise SourceError(f"{root}: no images in {base}; point --source openist=PATH at the OpenIST repository or its "
                          "Datasets/Chest_x-ray folder (<id>.jpg with <id>@.png lung masks)")
    _attach_masks(out, rows, masks, lambda p: p.with_suffix(""))  # <id>.jpg -> <id>@.png
    out.images = _frame(rows, "openist")
    return out


FOLDER_LABELS = {"covid": "covid", "covid-19": "covid", "covid19": "covid", "normal": "normal",
                 "pneumonia": "pneumonia", "other": "other"}


def read_folder(root: str | Path) -> SourceRead:
    """A generic ``ROOT/<label>/...`` image folder (e.g. a hospital's own export or the demo phantoms).

    Subfolder names are labels (covid, normal, pneumonia, other; ``COVID-19`` is accepted).
    Each image is its own patient. Lung masks, where there are any, lie in ``<label>/masks/``, mirroring the label
    folder's tree with ``.png`` names (``covid/a.jpg`` -> ``covid/masks/a.png``, see :func:`mask_of`); they are
    recorded as the image's ``mask_path``, never read as images. The source is named after the folder (characters
    other than letters, digits, ".", "_" and "-" become "-", since the name becomes a folder name in crossval).
    """
    root = require_dir(Path(root), "folder")
    name = plain_name(root.name)  # a source name becomes a folder name (crossval folds): never a path
    out = SourceRead(name, _frame([], name), root=root, synthetic=is_synthetic_folder(root))
    out.notes.append("generic folder source: no patient ids, each image is its own patient")
    if out.synthetic:
        out.notes.append("SYNTHETIC images (README.txt says so): not patients; results on them show that the "
                         "pipeline works, not that anything detects COVID-19")
    rows, loose, masks = [], 0, {}
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
        elif _is_mask(rel):
            masks[rel] = f
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
    _attach_masks(out, rows, masks, lambda p: mask_of(p.relative_to(root)))
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
    "cxnet": read_cxnet,
    "openist": read_openist,
    "folder": read_folder,
}
"""``--source NAME=PATH`` names and their readers (public collections and plain folders)."""

DICOM_SOURCES = ("dicom", "dicomweb")
"""A hospital's own images: ``dicom=DIR`` (exported files or a DICOMDIR) and ``dicomweb=URL`` (a PACS), read with
``--labels`` by :mod:`covid_cxr.data.dicom_source`."""
SOURCE_NAMES = (*READERS, *DICOM_SOURCES)
"""Every ``--source`` name."""

PATIENT_METADATA_PRIORITY = ("cohen", "figure1", "actualmed", "cxnet", "mooney", "openist", "radiography")
"""When one image appears in several sources, the copy from the first source here is kept:
sources with real patient ids come first (then OpenIST, whose files are the originals with lung masks, before the
Radiography Database's re-encoded copies)."""


def read_source(name: str, root: str | Path, links_to: Sequence[str | Path] = ()) -> SourceRead:
    """Read one source by its ``--source`` name. Links in it are followed when they resolve inside the source
    folder or inside one of ``links_to`` (``--allow-links-to``: shared storage the user named); others are refused,
    each counted with its reason."""
    try:
        reader = READERS[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; use one of: {', '.join(SOURCE_NAMES)}"
                          + (" (DICOM sources are read by covid_cxr.data.dicom_source, with labels)"
                             if name in DICOM_SOURCES else "")) from None
    with links_allowed_into(links_to):
        result = reader(root)
    log.info("%s: %d images kept, %d items not used", result.source, len(result.images), len(result.dropped))
    return result
