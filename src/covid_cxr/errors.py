"""Exception types. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class CovidCxrError(Exception):
    """Base class for errors the CLI reports without a traceback."""


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
    """A dataset cannot be built or a manifest violates the contract."""


class WeightsNotFound(CovidCxrError):
    """Pretrained weights are not cached and cannot be downloaded."""


class CheckpointError(CovidCxrError):
    """A checkpoint file is missing, corrupt or incompatible."""
