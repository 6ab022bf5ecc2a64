"""Results a hospital's PACS can file: a Comprehensive SR and a Secondary Capture per DICOM input, built with
highdicom (``covid-cxr predict --dicom-out`` and ``covid-cxr dicom listen``; see docs/pacs-results.md).

* **The SR** (:func:`build_sr`) holds P(class) for every class, the decision (coded), the decision threshold, the
  in-scope flag (an out-of-scope image gets the decision code ``OUT-OF-SCOPE``: its numbers are not a decision),
  the model's name, version (its checkpoint's sha256) and out-of-source estimate, "research use only, not a
  diagnostic device", and a reference to the source image (evidence and an IMAGE content item). Our concepts use
  the private coding scheme :data:`CODING_SCHEME`.
* **The SC** (:func:`build_sc`) is the Grad-CAM overlay (PyTorch backend; the ONNX backend has no gradients, so
  it shows the image without a heatmap and says so), with "RESEARCH USE ONLY" and the decision burned into the
  pixels (Burned In Annotation YES).
* Both go into the source's study (its Study Instance UID) as new instances of new series: one series per study
  and kind for the lifetime of a :class:`ResultWriter` (a run of predict, a listener).

Privacy: the outputs identify the patient exactly as the source does where DICOM needs it to file them (Patient's
Name, Patient ID, Study Instance UID, Study ID) and copy nothing else. :func:`read_source` reads only those
elements and the references (:data:`SOURCE_TAGS`); highdicom gets a dataset holding just them
(:func:`_evidence`), so nothing else of the source can reach an output. File names are the new SOP Instance UIDs.
Nor does anything of the source reach the terminal or the log: pydicom's and highdicom's complaints about a value
quote it (a UID with a leading zero, a Patient's Name without a '^'), so they are kept quiet while a source is read
and its results are built (:func:`quiet_dicom`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from covid_cxr import __version__
from covid_cxr.errors import ImageReadError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.dicom_quiet import quiet_pydicom
from covid_cxr.imaging.images import sha256_file, sniff
from covid_cxr.model.meta import ModelMeta, format_probability

log = logging.getLogger(__name__)

CODING_SCHEME = "99COVIDCXR"
"""Private coding scheme designator of covid-cxr's SR concepts (a local scheme: PS3.3 8.2 reserves "99" prefixes
for them). Its codes are listed in docs/pacs-results.md."""
INTENDED_USE = "research use only, not a diagnostic device"
"""The intended-use statement in every SR (as text) and every SC (burned in, and in Image Comments)."""
BANNER = "RESEARCH USE ONLY - NOT A DIAGNOSTIC DEVICE"
MANUFACTURER = "covid-cxr"
SERIES_NUMBERS = {"sr": 9901, "sc": 9902}
"""Series Number of the result series (high, so they sort after the acquired series)."""
SERIES_DESCRIPTIONS = {"sr": "covid-cxr result (research use only)",
                       "sc": "covid-cxr Grad-CAM overlay (research use only)"}
SC_SIDE = 768
"""The SC image's longer side in pixels (smaller images are enlarged so the burned-in text stays legible)."""
SC_MIN_WIDTH = 512
NOT_DICOM = "not a DICOM file"
"""Why an input has no DICOM result, for a PNG or JPEG input."""
SOURCE_TAGS = ("SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID", "StudyID",
               "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "PatientOrientation", "BurnedInAnnotation")
"""Every element read from a source instance: what files a result in the patient's study, the references, the
orientation of the image, and whether its pixels carry burned-in text. Nothing else is read."""
STOW_BATCH = 16
"""Instances per STOW-RS request."""

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
"""What a result accepts as a UID: digits and dots (a component with a leading zero, invalid but common, included:
refusing it would leave the study without a result)."""
_ORIENTATION = frozenset("ARPLHFOSJ") | {a + b for a in "ARPLHF" for b in "ARPLHF"}


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


CONCEPTS = {
    "report": ("CXR-REPORT", "covid-cxr model result (research use only)"),
    "intended_use": ("CXR-USE", "Intended use"),
    "decision": ("CXR-DECISION", "Model decision"),
    "threshold": ("CXR-THRESHOLD", "Decision threshold on P({positive})"),
    "rule": ("CXR-RULE", "Decision rule"),
    "in_scope": ("CXR-INSCOPE", "Image in scope of the model"),
    "scope_score": ("CXR-SCOPESCORE", "Out-of-scope score"),
    "note": ("CXR-NOTE", "Interpretation"),
    "estimate": ("CXR-ESTIMATE", "Out-of-source performance estimate"),
    "overlay": ("CXR-OVERLAY", "Grad-CAM overlay (research use only)"),
    "out_of_scope": ("OUT-OF-SCOPE", "Out of scope: not a decision"),
}
"""Our concepts in :data:`CODING_SCHEME`: key -> (code value, code meaning). A class's probability is
``P-<LABEL>`` "P(<label>)" and a decision value is ``<LABEL>`` "<label>" (:func:`label_code`)."""


def label_code(meta: ModelMeta, label: str) -> str:
    """The code value of a class: its name in capitals when it fits (``COVID``), else ``CLASS-<index>``."""
    value = label.upper()
    return value if re.fullmatch(r"[A-Z0-9_.-]{1,14}", value) and value != "OUT-OF-SCOPE" else \
        f"CLASS-{meta.labels.index(label)}"


# ----------------------------------------------------------------------------- keeping header values off the terminal

@contextlib.contextmanager
def quiet_dicom():
    """:func:`quiet_pydicom`, and highdicom's UserWarnings ignored: ``check_person_name`` warns with the whole
    Patient's Name when it has no '^' (``"JOHN DOE"``, ``"ANONYMOUS"``), and a warning reaches stderr whatever the
    log level. Only UserWarnings raised inside pydicom and highdicom are ignored, and only while inside (the warnings
    filters are restored on leaving; like any ``catch_warnings``, not meant for two threads at once)."""
    with quiet_pydicom(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")
        yield


# ----------------------------------------------------------------------------- what is read from a source

@dataclass(frozen=True)
class Source:
    """What a result takes from its source instance (:data:`SOURCE_TAGS`), and nothing else."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_name: object = ""
    """As the source stores it (a pydicom PersonName), re-encoded in the source's character set."""
    patient_id: str = ""
    study_id: str = ""
    charset: object = None
    """The source's Specific Character Set (None: the default repertoire)."""
    orientation: tuple[str, ...] = ()
    """The source's Patient Orientation when it is a valid pair (the SC shows the same view)."""
    burned_in: bool = False
    """The source's pixels carry burned-in text (Burned In Annotation YES): no SC is made from them."""


def read_source(path: str | Path) -> Source:
    """The :class:`Source` of a DICOM file (only :data:`SOURCE_TAGS` are parsed; pixel data is never read).

    Raises:
        ImageReadError: not a DICOM file, or one without the UIDs a result must reference.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if sniff(path) != "dicom" and path.suffix.lower() not in (".dcm", ".dicom"):
        raise ImageReadError(path, NOT_DICOM)
    try:
        with quiet_dicom():  # the values are read as they are; pydicom's complaints would quote them
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SOURCE_TAGS),
                                 force=sniff(path) != "dicom")
            values = {k: ds.get(k) for k in SOURCE_TAGS}
            meta = getattr(ds, "file_meta", None)
            sop_class = values["SOPClassUID"] or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
            sop_uid = values["SOPInstanceUID"] or (meta.get("MediaStorageSOPInstanceUID") if meta is not None
                                                   else None)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise ImageReadError(path, f"unreadable DICOM header ({type(exc).__name__})") from None
    uids = {"SOP Class UID": sop_class, "SOP Instance UID": sop_uid, "Series Instance UID":
            values["SeriesInstanceUID"], "Study Instance UID": values["StudyInstanceUID"]}
    missing = [name for name, uid in uids.items() if not uid or not _UID.fullmatch(str(uid))]
    if missing:
        raise ImageReadError(path, f"no valid {', '.join(missing)}: a result cannot be filed in its study")
    orientation = tuple(str(v).upper() for v in (values["PatientOrientation"] or ()))
    return Source(sop_class_uid=str(sop_class), sop_instance_uid=str(sop_uid),
                  series_instance_uid=str(values["SeriesInstanceUID"]),
                  study_instance_uid=str(values["StudyInstanceUID"]),
                  patient_name=values["PatientName"] if values["PatientName"] is not None else "",
                  patient_id=str(values["PatientID"] or ""), study_id=str(values["StudyID"] or ""),
                  charset=values["SpecificCharacterSet"] or None,
                  orientation=orientation if len(orientation) == 2 and set(orientation) <= _ORIENTATION else (),
                  burned_in=str(values["BurnedInAnnotation"] or "").strip().upper() == "YES")


def _identification(src: Source):
    """A dataset with only what files an output in the source's study: the patient's name and ID, the study's UID
    and ID, and empty values for the other type 2 elements of the Patient and General Study modules."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    if src.charset:
        ds.SpecificCharacterSet = src.charset
    ds.PatientName = src.patient_name
    ds.PatientID = src.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = src.study_instance_uid
    ds.StudyID = src.study_id
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    return ds


def _evidence(src: Source):
    """:func:`_identification` plus the source's references: all highdicom ever sees of the source."""
    ds = _identification(src)
    ds.SeriesInstanceUID = src.series_instance_uid
    ds.SOPClassUID = src.sop_class_uid
    ds.SOPInstanceUID = src.sop_instance_uid
    return ds


# ----------------------------------------------------------------------------- the model and one result

@dataclass(frozen=True)
class ModelIdentity:
    """What the outputs say about the model."""

    meta: ModelMeta
    name: str
    """E.g. ``covid-cxr densenet121 (normal, covid)``."""
    version: str
    """covid-cxr's version and the sha256 of the checkpoint the model came from (the same for its ONNX export)."""
    checksum: str
    estimate: str | None
    """The out-of-source estimate in words, when the model's meta has one (:attr:`ModelMeta.estimate`)."""
    heatmaps: bool
    """Grad-CAM is available (the PyTorch backend)."""

    @classmethod
    def of(cls, predictor) -> "ModelIdentity":
        meta = predictor.meta
        checksum = ""
        if predictor.backend == "onnx":
            checksum = str(((predictor.onnx.export or {}).get("source_checkpoint") or {}).get("sha256") or "")
        if not checksum:
            checksum = sha256_file(predictor.source)
        version = f"covid-cxr {__version__}; checkpoint sha256 {checksum}" + (
            f"; trained {meta.created}" if meta.created else "")
        return cls(meta=meta, name=f"covid-cxr {meta.arch} ({', '.join(meta.labels)})", version=version,
                   checksum=checksum, estimate=estimate_text(meta), heatmaps=predictor.backend == "torch")


def estimate_text(meta: ModelMeta) -> str | None:
    """The out-of-source estimate of ``meta`` in one sentence, or None when it has none."""
    est = meta.estimate or {}
    auc = est.get("pooled_auc")
    if est.get("source") == "crossval" and isinstance(auc, (int, float)) and math.isfinite(auc):
        ci = est.get("ci95")
        ci_text = (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, (list, tuple)) and len(ci) == 2
                   and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci) else "")
        return (f"ROC AUC {auc:.3f}{ci_text} on sources held out of training (leave-one-source-out "
                "cross-validation); expect lower performance at a hospital whose images were not in training")
    if est.get("note"):
        return str(est["note"])[:1000]
    return None


@dataclass(frozen=True)
class Outcome:
    """One image's result: the numbers of a ``covid-cxr predict`` row."""

    probabilities: dict[str, float]
    label: str
    in_scope: bool | None
    scope_score: float | None
    explanation: str

    @classmethod
    def from_row(cls, row: dict, meta: ModelMeta) -> "Outcome":
        probs = {lab: float(row[f"prob_{lab}"]) for lab in meta.labels}
        label = row["predicted_label"]
        return cls(probabilities=probs, label=label, in_scope=row.get("in_scope"),
                   scope_score=row.get("scope_score"),
                   explanation=meta.explain_decision(probs, label, row.get("in_scope")))


def decision_line(meta: ModelMeta, outcome: Outcome) -> str:
    """The decision in one short line (burned into the SC): never a bare decision for an out-of-scope image."""
    if meta.binary:
        pos = meta.positive
        p = format_probability(outcome.probabilities[pos], min_digits=3)
        numbers = f"P({pos}) {p}, threshold {format_probability(meta.threshold, min_digits=3)}"
    else:
        numbers = f"P {format_probability(outcome.probabilities[outcome.label])}, largest"
    if outcome.in_scope is False:
        return f"OUT OF SCOPE - NO DECISION ({numbers}: not meaningful)"
    return f"covid-cxr decision: {outcome.label} ({numbers})"


# ----------------------------------------------------------------------------- the SR

def _sr_content(identity: ModelIdentity, outcome: Outcome, src: Source, overlay=None):
    """The SR's content tree (see docs/pacs-results.md)."""
    import highdicom as hd
    from highdicom.sr import (CodeContentItem, ContainerContentItem, DeviceObserverIdentifyingAttributes,
                              ImageContentItem, NumContentItem, ObservationContext, ObserverContext,
                              RelationshipTypeValues, TextContentItem)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    meta = identity.meta
    contains, inferred = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.INFERRED_FROM

    def concept(key: str, **fmt):
        value, meaning = CONCEPTS[key]
        return _code(value, meaning.format(**fmt))

    def text(key: str, value: str):
        return TextContentItem(name=concept(key), value=value, relationship_type=contains)

    no_units = hd.sr.CodedConcept("1", "UCUM", "no units")
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[identity.checksum or identity.name]), name=identity.name[:64],
            manufacturer_name=MANUFACTURER, model_name=meta.arch[:64]))
    items = list(ObservationContext(observer_device_context=device))
    items.append(text("intended_use", INTENDED_USE))
    items.append(TextContentItem(name=codes.DCM.AlgorithmName, value=identity.name, relationship_type=contains))
    items.append(TextContentItem(name=codes.DCM.AlgorithmVersion, value=identity.version,
                                 relationship_type=contains))
    scope_value = {True: codes.SCT.Yes, False: codes.SCT.No, None: codes.SCT.Unknown}[outcome.in_scope]
    items.append(CodeContentItem(name=concept("in_scope"), value=scope_value, relationship_type=contains))
    if outcome.scope_score is not None and meta.gate is not None:
        items.append(NumContentItem(name=concept("scope_score"), value=float(outcome.scope_score), unit=no_units,
                                    relationship_type=contains))
    decided = (_code(label_code(meta, outcome.label), outcome.label) if outcome.in_scope is not False
               else concept("out_of_scope"))
    items.append(CodeContentItem(name=concept("decision"), value=decided, relationship_type=contains))
    order = ([meta.positive] if meta.positive else []) + [lab for lab in meta.labels if lab != meta.positive]
    for i, lab in enumerate(order):
        num = NumContentItem(name=_code(f"P-{label_code(meta, lab)}", f"P({lab})"),
                             value=_probability(outcome.probabilities[lab]), unit=no_units,
                             relationship_type=contains)
        if i == 0:  # the probability the decision is read from: inferred from the source image
            num.ContentSequence = [ImageContentItem(name=codes.DCM.SourceOfMeasurement,
                                                    referenced_sop_class_uid=src.sop_class_uid,
                                                    referenced_sop_instance_uid=src.sop_instance_uid,
                                                    relationship_type=inferred)]
        items.append(num)
    if meta.binary:
        items.append(NumContentItem(name=concept("threshold", positive=meta.positive),
                                    value=_probability(meta.threshold), unit=no_units, relationship_type=contains))
    items.append(text("rule", f"{meta.threshold_text()}; {meta.threshold_reason()}"))
    items.append(text("note", outcome.explanation))
    if identity.estimate:
        items.append(text("estimate", identity.estimate))
    if overlay is not None:
        items.append(ImageContentItem(name=concept("overlay"), referenced_sop_class_uid=overlay.SOPClassUID,
                                      referenced_sop_instance_uid=overlay.SOPInstanceUID,
                                      relationship_type=contains))
    root = ContainerContentItem(name=concept("report"))
    root.ContentSequence = items
    return root


def _probability(p: float) -> float:
    """A probability with 12 significant digits: a Decimal String holds at most 16 characters (predict's CSV keeps
    full precision and the log-odds, which tell apart probabilities within 1e-12 of 1)."""
    return float(f"{float(p):.12g}")


def build_sr(identity: ModelIdentity, outcome: Outcome, src: Source, series_uid: str, sop_uid: str,
             instance_number: int = 1, overlay=None):
    """The Comprehensive SR of one result (``overlay``: the SC it refers to, or None)."""
    import highdicom as hd

    with quiet_dicom():  # highdicom warns with the whole name when it has no '^'
        evidence = [_evidence(src)] + ([overlay] if overlay is not None else [])
        sr = hd.sr.ComprehensiveSR(evidence=evidence, content=_sr_content(identity, outcome, src, overlay),
                                   series_instance_uid=series_uid, series_number=SERIES_NUMBERS["sr"],
                                   sop_instance_uid=sop_uid, instance_number=instance_number,
                                   manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SERIES_DESCRIPTIONS["sr"]
    sr.ManufacturerModelName = identity.meta.arch[:64]
    sr.SoftwareVersions = __version__
    return sr


# ----------------------------------------------------------------------------- the SC

def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if a.dtype == np.uint8:
        return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (grey) resized to :data:`SC_SIDE` on its longer side (at least
    :data:`SC_MIN_WIDTH` wide) with ``heatmap`` (same shape as ``image``, in [0, 1]) blended as in
    :func:`covid_cxr.model.gradcam.overlay_png` (its colour map; transparent where there is no heat)."""
    h, w = image.shape
    scale = max(SC_SIDE / max(h, w), SC_MIN_WIDTH / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = _resize(image, size).astype(np.float32)[..., None].repeat(3, axis=2)
    if heatmap is None:
        return grey.round().astype(np.uint8)
    import matplotlib

    from covid_cxr.model.gradcam import COLORMAP  # the PyTorch backend only: Grad-CAM needs it anyway

    heat = np.clip(_resize(heatmap, size), 0.0, 1.0)
    colour = matplotlib.colormaps[COLORMAP](heat)[..., :3] * 255.0
    alpha = (0.5 * heat)[..., None]
    return np.clip(grey * (1 - alpha) + colour * alpha, 0, 255).round().astype(np.uint8)


def burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` under a black band holding ``lines`` (the first in yellow): the text is in the pixels, above the
    image, never over it."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    pad = max(4, w // 100)
    size = max(10, w // 34)
    while True:
        font = ImageFont.load_default(size=size)
        widths = [font.getbbox(line)[2] for line in lines]
        if max(widths) <= w - 2 * pad or size <= 8:
            break
        size -= 1
    step = round(size * 1.35)
    band = pad * 2 + step * len(lines)
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * step), line, fill=(255, 220, 0) if i == 0 else (255, 255, 255), font=font)
    return np.asarray(canvas)


def sc_lines(identity: ModelIdentity, outcome: Outcome, target: str | None) -> list[str]:
    """The burned-in text: the banner, the decision, what the colours are (or why there are none). No patient
    data: nothing here comes from the source's header."""
    lines = [BANNER, decision_line(identity.meta, outcome)]
    if target is not None:
        lines.append(f"Grad-CAM: evidence for '{target}', scaled per image; not a localisation of disease")
    else:
        lines.append("No heatmap: Grad-CAM needs the PyTorch checkpoint (run with --backend torch)")
    return lines


def build_sc(identity: ModelIdentity, outcome: Outcome, src: Source, pixels: np.ndarray, series_uid: str,
             sop_uid: str, instance_number: int = 1, heatmap: bool = True):
    """The Secondary Capture of one result: ``pixels`` ((H, W, 3) uint8, text already burned in) in the source's
    study."""
    import highdicom as hd

    with quiet_dicom():  # highdicom warns with the whole name when it has no '^'
        ident = _identification(src)
        sc = hd.sc.SCImage(pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
                           coordinate_system="PATIENT", study_instance_uid=src.study_instance_uid,
                           series_instance_uid=series_uid, series_number=SERIES_NUMBERS["sc"],
                           sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
                           patient_id=src.patient_id, patient_name=ident.PatientName, study_id=src.study_id,
                           patient_orientation=src.orientation or ("L", "F"))
    if src.charset:
        sc.SpecificCharacterSet = src.charset
    # Orientation as the source states it; unknown stays empty (type 2) rather than guessed.
    sc.PatientOrientation = list(src.orientation) if src.orientation else ""
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):
        setattr(sc, keyword, "")
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = SERIES_DESCRIPTIONS["sc"]
    sc.ImageComments = f"covid-cxr: {INTENDED_USE}"
    view = identity.meta.preprocess.lung_view
    shown = "the source image" if view == "none" else f"the model's {view} lung view of the source image"
    sc.DerivationDescription = (f"Grad-CAM overlay of {shown}" if heatmap else
                                f"{shown} without a heatmap (ONNX backend)") + \
        "; decision and intended use burned in; resized for display, not for measurement"
    from pydicom.dataset import Dataset

    source_item = Dataset()
    source_item.ReferencedSOPClassUID = src.sop_class_uid
    source_item.ReferencedSOPInstanceUID = src.sop_instance_uid
    sc.SourceImageSequence = [source_item]
    sc.ManufacturerModelName = identity.meta.arch[:64]
    sc.SoftwareVersions = __version__
    return sc


# ----------------------------------------------------------------------------- writing

def save(ds, folder: Path, kind: str) -> Path:
    """Write ``ds`` as ``<folder>/<kind>-<SOP Instance UID>.dcm`` (atomically): the name carries no patient data."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write(folder / f"{kind}-{ds.SOPInstanceUID}.dcm", buf.getvalue())


@dataclass
class Written:
    """The files of one input's result, or why it has none."""

    files: list[Path] = field(default_factory=list)
    reason: str = ""
    """Why there is no result (an empty string when there is one)."""
    note: str = ""
    """What is missing from a result (e.g. no SC for a source with burned-in text)."""


class ResultWriter:
    """Writes the SR and SC of predictions into a folder: one new series per study and kind for its lifetime.

    Args:
        predictor: the :class:`~covid_cxr.model.inference.Predictor` that made the predictions.
        folder: the output folder (created).
    """

    def __init__(self, predictor, folder: str | Path):
        from highdicom import UID

        quiet = logging.getLogger("highdicom")
        if quiet.level == logging.NOTSET:  # its INFO lines name the source's UIDs: keep them out of our logs
            quiet.setLevel(logging.WARNING)
        self._uid = UID
        self.predictor = predictor
        self.identity = ModelIdentity.of(predictor)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._series: dict[tuple[str, str], str] = {}
        self._count: dict[str, int] = {}

    def _next(self, study: str, kind: str) -> tuple[str, int]:
        uid = self._series.setdefault((study, kind), str(self._uid()))
        self._count[uid] = self._count.get(uid, 0) + 1
        return uid, self._count[uid]

    def write(self, path: str | Path, row: dict) -> Written:
        """The SR and SC of one ``predict`` row (its ``path`` is the source file)."""
        with quiet_dicom():  # the source's values are copied and written: pydicom would quote an odd one
            return self._write(path, row)

    def _write(self, path: str | Path, row: dict) -> Written:
        if row.get("error"):
            kind = sniff(path)
            return Written(reason=NOT_DICOM if kind in ("png", "jpeg") else "unreadable (see its error)")
        try:
            src = read_source(path)
        except ImageReadError as exc:
            return Written(reason=exc.reason if exc.reason == NOT_DICOM else "no usable DICOM header")
        outcome = Outcome.from_row(row, self.identity.meta)
        out = Written()
        sc = None
        if src.burned_in:
            out.note = "no SC: the source's pixels carry burned-in text (it could be patient data)"
        else:
            image, heat, target, missing = self._overlay(path)
            if missing:
                out.note = missing
            series, number = self._next(src.study_instance_uid, "sc")
            pixels = burn_in(overlay_rgb(image, heat), sc_lines(self.identity, outcome, target))
            sc = build_sc(self.identity, outcome, src, pixels, series, str(self._uid()), number,
                          heatmap=heat is not None)
            out.files.append(save(sc, self.folder, "sc"))
        series, number = self._next(src.study_instance_uid, "sr")
        sr = build_sr(self.identity, outcome, src, series, str(self._uid()), number, overlay=sc)
        out.files.insert(0, save(sr, self.folder, "sr"))
        return out

    def _overlay(self, path: str | Path) -> tuple[np.ndarray, np.ndarray | None, str | None, str]:
        """(the image, its heatmap or None, the class it shows or None, why there is none or '')."""
        from covid_cxr.imaging.images import load_image

        if not self.identity.heatmaps:
            return load_image(path), None, None, "SC without heatmap: Grad-CAM needs the PyTorch checkpoint " \
                                                 "(--backend torch)"
        try:
            e = self.predictor.explain([Path(path)])[0]
        except ImageReadError:  # its reason may quote the header: the note goes to the log and predict's summary
            return load_image(path), None, None, "SC without heatmap: Grad-CAM could not read the image"
        return e.image, e.heatmap, e.target, ""


def stow(files: Iterable[str | Path], url: str) -> int:
    """Send ``files`` with STOW-RS to the DICOMweb service at ``url`` (:class:`covid_cxr.dicomweb.DicomWeb`,
    credentials from its environment variable), :data:`STOW_BATCH` at a time; returns how many were stored.

    Raises:
        PacsError: the PACS is unreachable or refused an instance.
    """
    from covid_cxr.dicomweb import DicomWeb

    client = DicomWeb(url)
    files = list(files)
    stored = 0
    for start in range(0, len(files), STOW_BATCH):
        stored += client.store(files[start:start + STOW_BATCH])["stored"]
    return stored


def describe(counts: dict) -> str:
    """``DICOM results: 2 SR + 2 SC in OUT; 4 sent with STOW-RS; no DICOM result for 1: not a DICOM file``."""
    text = f"DICOM results: {counts['sr']} SR + {counts['sc']} SC in {counts['folder']}"
    if counts.get("stored") is not None:
        text += f"; {counts['stored']} sent with STOW-RS"
    for reason, n in sorted(counts.get("no_result", {}).items()):
        text += f"; no DICOM result for {n}: {reason}"
    for note, n in sorted(counts.get("notes", {}).items()):
        text += f"; {n} with {note}"
    return text


def write_results(predictor, rows: list[dict], folder: str | Path) -> dict:
    """Write the SR and SC of every DICOM input among ``rows`` (predict's rows; each gets a ``dicom_result``
    column: its files' names, or why it has none). Returns the counts (:func:`describe`) and the files."""
    writer = ResultWriter(predictor, folder)
    counts: dict = {"folder": str(writer.folder), "sr": 0, "sc": 0, "no_result": {}, "notes": {}, "files": []}
    for row in rows:
        done = writer.write(row["path"], row)
        if done.reason:
            counts["no_result"][done.reason] = counts["no_result"].get(done.reason, 0) + 1
            row["dicom_result"] = f"no DICOM result: {done.reason}"
            continue
        if done.note:
            counts["notes"][done.note] = counts["notes"].get(done.note, 0) + 1
        counts["sr"] += sum(1 for f in done.files if f.name.startswith("sr-"))
        counts["sc"] += sum(1 for f in done.files if f.name.startswith("sc-"))
        counts["files"] += done.files
        row["dicom_result"] = " ".join(f.name for f in done.files)
    return counts


__all__ = ["CODING_SCHEME", "CONCEPTS", "INTENDED_USE", "ModelIdentity", "Outcome", "ResultWriter", "Source",
           "build_sc", "build_sr", "describe", "quiet_dicom", "quiet_pydicom", "read_source", "stow", "write_results"]
