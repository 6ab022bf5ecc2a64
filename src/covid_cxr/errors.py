"""Every exception type covid-cxr raises on purpose. Each message says what went wrong and what to do.

The CLI prints :class:`CovidCxrError` messages as one line (no traceback); anything else is a bug.
"""

from __future__ import annotations


class CovidCxrError(Exception):
    """Base class for errors the CLI reports without a traceback."""


class ConfigError(CovidCxrError):
    """An option value is invalid."""


class SourceError(CovidCxrError):
    """A data source folder or its metadata is missing or malformed."""


class ImageReadError(CovidCxrError):
    """An image file cannot be decoded (or is unsafe to decode)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # picklable, so worker processes can raise it to the parent
        return (type(self), (self.path, self.reason))


class DatasetError(CovidCxrError):
    """A dataset cannot be built, or a manifest violates the contract, or a dataset folder is incomplete."""


class RunError(CovidCxrError):
    """A run folder is missing, incomplete or in use."""


class OutputError(CovidCxrError, OSError):
    """A file or folder cannot be written (disk full, read-only file system, no permission). It is also an
    :class:`OSError` with the original ``errno`` and ``filename``, so code that handles OSError still does."""

    def __init__(self, errno: int | None, strerror: str | None, filename, message: str):
        OSError.__init__(self, errno, strerror, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror, self.filename, self.message))


class WeightsNotFound(CovidCxrError):
    """Pretrained weights are not cached and cannot be downloaded."""


class CheckpointError(CovidCxrError):
    """A checkpoint file is missing, corrupt or incompatible."""


class CacheError(CovidCxrError):
    """The preprocessed image cache cannot be used as it is (the message says how to rebuild it)."""


class CalibrationError(CovidCxrError, ValueError):
    """Inputs that cannot be calibrated or thresholded (wrong shape, one class only, bad option)."""


class ExportError(CovidCxrError):
    """A model cannot be exported, or the exported graph does not reproduce PyTorch."""


class FetchError(CovidCxrError):
    """A source cannot be downloaded or unpacked; the message says what to do."""


class UploadError(CovidCxrError):
    """A request that does not carry one acceptable image; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


class PacsError(CovidCxrError):
    """A PACS (DICOMweb or DIMSE) refused, failed or answered something unusable; the message never carries
    credentials or patient data."""
