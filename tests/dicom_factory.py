"""Synthetic chest X-ray DICOM files that carry (fake) PHI, for PACS, ingest and de-identification tests.

``make_cxr_dicom`` writes a DX (Digital X-Ray Image Storage - For Presentation) or CR (Computed Radiography Image
Storage) file, explicit VR little endian, with every type 1 and 2 attribute of its IOD's mandatory modules, so
Orthanc, pydicom and highdicom take it as it is. Its pixels are covid_cxr's phantom chest (dark lungs in a bright
torso on dark air; ``label="covid"`` adds bilateral peripheral ground-glass opacities), stored with ``bits`` bits.

It deliberately carries PHI (:data:`PHI_FIELDS`); :func:`phi_strings` lists the values a test must never find in
an output.
"""

from __future__ import annotations

import datetime
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pydicom.valuerep import PersonName

from covid_cxr.imaging.phantoms import make_phantom

SOP_CLASSES = {"DX": DigitalXRayImageStorageForPresentation, "CR": ComputedRadiographyImageStorage}
"""Modality -> the SOP class :func:`make_cxr_dicom` writes."""
PHI_FIELDS = ["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
              "ReferringPhysicianName", "OtherPatientIDs", "PatientAddress"]
"""The identifying attributes :func:`make_cxr_dicom` fills (the last two only with ``extra_phi``)."""
_PN_FIELDS = ("PatientName", "ReferringPhysicianName")
_KWARG_OF = {"PatientName": "patient_name", "PatientID": "patient_id", "PatientBirthDate": "birth_date",
             "AccessionNumber": "accession", "InstitutionName": "institution", "ReferringPhysicianName": "referring"}
_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LL": ["P", "F"], "RL": ["A", "F"]}
"""PatientOrientation (row, column directions) as a chest film of that view is displayed."""
_STUDY_DATETIME = datetime.datetime(2020, 4, 2, 9, 30, 0)


@dataclass(frozen=True)
class DicomUids:
    """The UIDs of a written file."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def _extra_phi(patient_id: str) -> dict[str, str]:
    """OtherPatientIDs and PatientAddress, derived from the patient id so each patient's are distinct."""
    return {"OtherPatientIDs": f"MRN-{patient_id}", "PatientAddress": f"12 Example Street, Testville {patient_id}"}


def _pixels(label: str | None, size: tuple[int, int], bits: int, photometric: str, seed: int) -> np.ndarray:
    rows, cols = size
    side = max(rows, cols, 32)
    rng = np.random.default_rng(seed)
    image, _ = make_phantom("normal" if label is None else label, side, rng)
    top, left = (side - rows) // 2, (side - cols) // 2
    image = image[top:top + rows, left:left + cols].astype(np.float64)
    maxval = (1 << bits) - 1
    # Spread the 8-bit phantom over the stored bits, with a sub-step dither so all the bits carry signal.
    scaled = image * (maxval / 255.0) + rng.uniform(-0.5, 0.5, image.shape) * (maxval / 255.0)
    scaled = np.clip(np.rint(scaled), 0, maxval)
    if photometric == "MONOCHROME1":  # the same picture on screen: high values are dark
        scaled = maxval - scaled
    return scaled.astype(np.uint8 if bits <= 8 else np.uint16)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_cxr_dicom(path: Path | str, *, patient_id: str, patient_name: str, birth_date: str = "19600101",
                   accession: str = "ACC123", study_uid: str | None = None, series_uid: str | None = None,
                   sop_uid: str | None = None, view: str = "PA", modality: str = "DX",
                   manufacturer: str = "ACME Radiography", photometric: str = "MONOCHROME2", bits: int = 12,
                   size: tuple[int, int] = (256, 256), seed: int = 0, label: str | None = None,
                   study_description: str = "CHEST PA", institution: str = "St Example Hospital",
                   referring: str = "DR^REFERRER", extra_phi: bool = True) -> DicomUids:
    """Write one synthetic chest radiograph as a DICOM file.

    Args:
        path: Where to write it (its folder is created).
        patient_id, patient_name, birth_date, accession, institution, referring: The PHI it carries
            (``patient_name`` and ``referring`` in DICOM ``FAMILY^GIVEN`` form, ``birth_date`` as ``YYYYMMDD``).
        study_uid, series_uid, sop_uid: UIDs; new random ones when None (pass them to group files in one study).
        view: ViewPosition (``PA``, ``AP``, ``LL`` for a left lateral...): metadata only, the pixels are frontal.
        modality: ``DX`` (Digital X-Ray Image Storage - For Presentation) or ``CR``.
        manufacturer: Manufacturer of the equipment.
        photometric: ``MONOCHROME2`` or ``MONOCHROME1`` (pixels inverted: the image looks the same on screen).
        bits: BitsStored, 8 to 16 (BitsAllocated 8 for 8, else 16).
        size: (rows, columns).
        seed: Anatomy, noise and lesions; the same seed gives the same pixels.
        label: None or ``"normal"``: a clear chest; ``"covid"``: hazy peripheral opacities in both lungs.
        study_description: StudyDescription.
        extra_phi: Also write OtherPatientIDs and PatientAddress.

    Returns:
        The file's UIDs.

    Raises:
        ValueError: For an unknown modality, photometric interpretation, bit depth or label.
    """
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits <= 16:
        raise ValueError(f"bits must be 8 to 16, got {bits}")
    pixels = _pixels(label, size, bits, photometric, seed)
    sop_class = SOP_CLASSES[modality]
    uids = DicomUids(study_uid or generate_uid(), series_uid or generate_uid(), sop_uid or generate_uid(),
                     str(sop_class))
    date, time = _STUDY_DATETIME.strftime("%Y%m%d"), _STUDY_DATETIME.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uids.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names with accents survive
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uids.sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient
    ds.PatientName = PersonName(patient_name)
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    if extra_phi:
        for keyword, value in _extra_phi(patient_id).items():
            setattr(ds, keyword, value)
    # General Study
    ds.StudyInstanceUID = uids.study_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = PersonName(referring)
    ds.StudyID = "1"
    ds.AccessionNumber = accession
    ds.StudyDescription = study_description
    # General Series (+ DX Series / CR Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = uids.series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"CHEST {view}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "SynthCXR"
    ds.InstitutionName = institution
    ds.StationName = "XR1"
    # General Image / General Acquisition / Modality LUT
    ds.InstanceNumber = 1
    ds.PatientOrientation = _ORIENTATION.get(view, ["L", "F"])
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PixelSpacing = [0.15, 0.15]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if modality == "DX":  # DX Anatomy Imaged, DX Image, DX Detector, Acquisition Context
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = Sequence([_code("43799004", "SCT", "Chest")])
        ds.AcquisitionContextSequence = Sequence()
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    # VOI LUT
    maxval = (1 << bits) - 1
    ds.WindowCenter, ds.WindowWidth = (maxval + 1) // 2, maxval + 1
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uids


def make_lateral(path: Path | str, **kwargs) -> DicomUids:
    """:func:`make_cxr_dicom` of a left lateral view (``view="LL"``)."""
    kwargs.setdefault("study_description", "CHEST LAT")
    return make_cxr_dicom(path, view="LL", **kwargs)


def phi_strings(source: Dataset | dict) -> list[str]:
    """The PHI values a test must never find in an output.

    Args:
        source: A dataset :func:`make_cxr_dicom` wrote, or the keyword arguments given to it (its defaults
            fill the rest).

    Returns:
        Each non-empty value of :data:`PHI_FIELDS`, the name parts of the person names (``DOE^JANE`` also gives
        ``DOE`` and ``JANE``, parts under 3 characters left out) and the birth date as ``YYYY-MM-DD`` too.
        Pick distinctive values: a test greps for each of these.
    """
    if isinstance(source, Dataset):
        values = {k: str(source.get(k, "") or "") for k in PHI_FIELDS}
    else:
        defaults = {name: p.default for name, p in inspect.signature(make_cxr_dicom).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        kwargs = {**defaults, **source}
        values = {k: str(kwargs.get(arg) or "") for k, arg in _KWARG_OF.items()}
        if kwargs["extra_phi"]:
            values.update(_extra_phi(kwargs["patient_id"]))
    found = [v for v in values.values() if v]
    for keyword in _PN_FIELDS:
        found += [part for part in values.get(keyword, "").split("^") if len(part) >= 3]
    birth = values.get("PatientBirthDate", "")
    if len(birth) == 8 and birth.isdigit():
        found.append(f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
    return list(dict.fromkeys(found))
