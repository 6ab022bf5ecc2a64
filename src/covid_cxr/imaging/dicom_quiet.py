"""Keeping DICOM header values off the terminal and the logs.

pydicom validates the values it reads and writes, and says so with the value in the message (``Invalid value for VR
UI: '1.2.840.0123...'``, a person name, a path), on stderr as a warning and in its logger. A hospital's headers
break the rules often (leading zeros in UIDs), so every stage that reads a hospital's DICOM (the ingest, predict's
DICOM results, the C-STORE listener) reads inside :func:`quiet_pydicom`. The values themselves are used as the
source stores them, exactly as before.

pydicom is imported only inside, and its absence is not an error (the ONNX-only install predicts PNG and JPEG files
without it): there is then nothing to quiet.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """While inside, pydicom neither validates the values it reads and writes nor logs. Its settings and logger are
    process-wide: they are restored on leaving, so nesting is safe, and another thread only gets fewer messages
    meanwhile. (Warnings pydicom raises for other reasons are left to :func:`warnings.catch_warnings` callers, which
    are not thread-safe.)"""
    try:
        from pydicom import config
    except ModuleNotFoundError:
        yield
        return
    settings = config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    logger = logging.getLogger("pydicom")
    drop = _DropAll()
    settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
        settings.reading_validation_mode, settings.writing_validation_mode = modes
