"""The options of ``covid-cxr data build`` and ``covid-cxr data fetch`` (see :mod:`covid_cxr.config`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from covid_cxr.config import CommandOptions, check_positive, shown
from covid_cxr.errors import ConfigError
from covid_cxr.files import default_workers


def check_date_range(text: str) -> None:
    """``--study-date``: YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD, each a real date, in order."""
    import datetime

    m = re.fullmatch(r"(\d{8})?(-)?(\d{8})?", text)
    ok = bool(m) and bool(m.group(1) or m.group(3)) and (m.group(2) is not None or m.group(3) is None)
    dates = [g for g in (m.group(1), m.group(3)) if g] if m else []
    try:
        parsed = [datetime.datetime.strptime(d, "%Y%m%d") for d in dates]
    except ValueError:
        ok = False
    else:
        ok = ok and parsed == sorted(parsed)
    if not ok:
        raise ConfigError(f"--study-date must be YYYYMMDD, YYYYMMDD-YYYYMMDD (real dates, first before last) or an "
                          f"open range such as 20200301- or -20210331, got {shown(text)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig(CommandOptions):
    """``covid-cxr data build``: read the public sources, check and hash every image, remove copies, split by
    patient and write DATASET_DIR/{manifest.csv, dataset.json, ingest_report.json, dropped.csv, dataset_card.md}."""

    sources: tuple[tuple[str, str], ...]
    """A source folder as NAME=PATH (cohen, mooney, radiography, actualmed, figure1, cxnet, openist, folder), a
    hospital's exported DICOM files as dicom=DIR (or dicom=path/to/DICOMDIR), or a PACS as dicomweb=URL (its
    DICOMweb root, e.g. http://pacs:8042/dicom-web; credentials in COVID_CXR_DICOMWEB_AUTH); repeat for each."""
    out: str
    """Dataset folder to write."""
    task: Literal["covid-vs-normal", "covid-vs-rest", "covid-pneumonia-normal"] = "covid-vs-normal"
    """Which labels are classes; images of other labels stay in the manifest as split 'unused'."""
    test_per_class: int = 200
    """Test images per class (the study used 200)."""
    val_fraction: float = 0.1
    """Fraction of the non-test development images held out for validation (early stopping, calibration)."""
    train_size: int = 850
    """Training images at most (the study used 850); fewer if fewer are available."""
    seed: int = 0
    """Seed of the patient-level split."""
    protocol: Literal["patient", "leave-source-out"] = "patient"
    """'patient': random split by patient, stratified; 'leave-source-out': the test split is one whole source."""
    test_source: str | None = None
    """With --protocol leave-source-out: the source held out as the test split."""
    max_source_share: float = 1.0
    """Cap on one source's share of a class (e.g. 0.6); surplus images are left out of the task, counted."""
    dedup: bool = True
    """Remove near-duplicate images (perceptual hash confirmed by a pixel check) before splitting."""
    allow_links_to: tuple[str, ...] = ()
    """Folders that links inside a source may lead into (e.g. shared storage holding the images); repeat for each.
    Without it, a link that leaves its source folder is refused and counted."""
    allow_empty_source: bool = False
    """Build even when a source yields no usable image (it is then a warning in the dataset report, not an error)."""
    cache: bool = True
    """Write the preprocessed image cache (DATASET_DIR/cache), so training never decodes originals again."""
    workers: int = field(default_factory=lambda: default_workers(limit=1024))
    """Processes decoding, hashing, fingerprinting and caching images (default: every usable CPU)."""
    labels: str | None = None
    """dicom and dicomweb sources: a CSV of the hospital's labels, one row per study, keyed by StudyInstanceUID or
    AccessionNumber, with a label column (covid, normal, pneumonia, other)."""
    label_key: Literal["auto", "StudyInstanceUID", "AccessionNumber"] = "auto"
    """The labels file's key column (auto: StudyInstanceUID if present, else AccessionNumber)."""
    label_column: str = "label"
    """The labels file's label column."""
    allow_unmatched_labels: bool = False
    """Build even when label rows match no instance (they are then counted in the report, not an error)."""
    dicom_store: str | None = None
    """dicom and dicomweb sources: where the kept instances and the secret key of the patient pseudonyms are kept
    (default: OUT.dicom beside the dataset folder); it holds patient data: keep it where the PACS export may be."""
    modalities: tuple[str, ...] = ("CR", "DX")
    """dicomweb: the modalities searched for; repeat for each."""
    study_date: str | None = None
    """dicomweb: a study date range YYYYMMDD-YYYYMMDD (either end may be left open, e.g. 20200301-)."""
    study_description: str | None = None
    """dicomweb: only studies whose description matches (DICOM wildcards * and ?), e.g. '*CHEST*'."""
    max_instances: int | None = None
    """dicomweb: retrieve at most this many instances (a trial run)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        dicom = [n for n, _ in self.sources if n in ("dicom", "dicomweb")]
        if dicom and not self.labels:
            raise ConfigError(f"--source {dicom[0]}=... needs --labels labels.csv (StudyInstanceUID or "
                              "AccessionNumber, and a label column): a hospital's images carry no labels")
        if self.labels and not dicom:
            raise ConfigError("--labels applies to dicom and dicomweb sources only")
        if self.study_date is not None:
            check_date_range(self.study_date)
        for m in self.modalities:
            if not re.fullmatch(r"[A-Z]{2}", m):
                raise ConfigError(f"--modality must be a DICOM modality code such as CR or DX, got {shown(m)}")
        if self.max_instances is not None:
            check_positive("max_instances", self.max_instances)
        if (self.protocol == "leave-source-out") != (self.test_source is not None):
            raise ConfigError("--test-source goes with --protocol leave-source-out (and that protocol needs it)")
        if not 0.0 < self.max_source_share <= 1.0:
            raise ConfigError("--max-source-share must be in (0, 1]")
        if not self.sources:
            raise ConfigError("no sources given; pass at least one --source NAME=PATH")
        # several folder and DICOM sources are fine: each is named after its folder or host
        names = [n for n, _ in self.sources if n not in ("folder", "dicom", "dicomweb")]
        if len(set(names)) != len(names) or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"a source is given twice: {[n for n, _ in self.sources]}")
        if self.test_per_class < 1:
            raise ConfigError("--test-per-class must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be in [0, 1)")
        if self.train_size < 2:
            raise ConfigError("--train-size must be at least 2")
        check_positive("workers", self.workers)


@dataclass(frozen=True, kw_only=True)
class FetchConfig(CommandOptions):
    """``covid-cxr data fetch``: download a public source (Cohen over HTTP with resume; Kaggle sources through the
    kaggle package, or exact manual steps)."""

    source: Literal["cohen", "mooney", "radiography", "montgomery", "shenzhen", "jsrt"]
    """Which source to download; montgomery, shenzhen and jsrt (lung-mask sets for `covid-cxr lungs train`) print
    the steps to get them by hand."""
    out: str
    """Folder to create (then pass it to `covid-cxr data build --source NAME=PATH`)."""
    url: str | None = None
    """Archive URL instead of the default (cohen only), e.g. a mirror or a pinned commit."""
    sha256: str | None = None
    """Expected SHA-256 of the downloaded archive; a mismatch is an error."""
    overwrite: bool = False
    """Replace an existing non-empty --out folder."""
    timeout: float = 60.0
    """Seconds to wait for the server to connect or send more bytes."""
    progress: bool = True
    """Show a progress bar."""
    max_unpacked_bytes: int = 20 * 2**30
    """Refuse archives that unpack to more than this many bytes (zip-bomb guard)."""

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise ConfigError("--out is empty; give the folder to create")
        if self.url is not None:
            if self.source != "cohen":
                raise ConfigError(f"--url applies to cohen only; {self.source} is downloaded from Kaggle")
            if not re.match(r"^https?://", self.url):
                raise ConfigError(f"--url must start with http:// or https://, got {shown(self.url)}")
        if self.sha256 is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
                raise ConfigError(f"--sha256 must be 64 hexadecimal digits, got {shown(self.sha256)}")
            object.__setattr__(self, "sha256", self.sha256.lower())
        check_positive("timeout", self.timeout)
        check_positive("max_unpacked_bytes", self.max_unpacked_bytes)
