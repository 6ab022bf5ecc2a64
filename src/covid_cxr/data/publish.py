"""Building a dataset folder beside the existing one and swapping it in, so a build never corrupts what exists.

``covid-cxr data build --out PARENT/NAME`` works in ``PARENT/.NAME.staging``: the image cache fills
there during the decode pass, and every dataset file is written there at the end. Only when the
folder is complete is it swapped with ``PARENT/NAME`` in one step (``renameat2(RENAME_EXCHANGE)``
on Linux), and the previous dataset, now at the staging path, is moved aside and deleted. Until that
step the previous dataset is untouched, byte for byte: the new cache *links* (hard links, else
copies) the previous cache's entries instead of writing into it.

Where the exchange is not available the swap is two renames (``NAME`` -> ``.NAME.old``, staging ->
``NAME``); a build killed between them is repaired by the next one (:meth:`Staging.recover`): the
new folder is put in place if it was complete (it holds ``manifest.csv``, written last), else the
previous one is put back.

One build at a time per dataset: ``PARENT/.NAME.lock`` is held (``flock``) for the whole build, and
released by the kernel however the build ends. A killed or failed build leaves the staging folder
with its finished cache entries, which the next build reuses.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from covid_cxr.errors import DatasetError
from covid_cxr.files import RunLock
from covid_cxr.paths import DatasetDir

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    log.debug("renameat2(RENAME_EXCHANGE) failed (%s): falling back to two renames", os.strerror(err))
    return False


def _known_names() -> set[str]:
    """Every file name a dataset build writes (the properties of :class:`~covid_cxr.paths.DatasetDir`)."""
    d = DatasetDir(Path("."))
    return {getattr(d, k).name for k, v in vars(DatasetDir).items() if isinstance(v, property)}


class Staging:
    """The staging folder of one dataset folder, held under its lock (use as a context manager)."""

    def __init__(self, out: str | Path):
        out = Path(out).expanduser()
        self.out = out.resolve() if out.is_symlink() else Path(os.path.abspath(out))
        parent, name = self.out.parent, self.out.name
        self.dir = parent / f".{name}.staging"
        self.old = parent / f".{name}.old"
        self._trash = f".{name}.trash-"
        self._lock = RunLock(parent / f".{name}.lock")

    @property
    def cache(self) -> Path:
        return self.dir / "cache"

    def __enter__(self) -> "Staging":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self.recover()
            self.check_out()
            self.dir.mkdir(exist_ok=True)
            for p in self.dir.iterdir():  # what a killed build wrote besides finished cache entries
                if p.name != "cache":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None and self.dir.is_dir() and not any(
                    files for _, _, files in os.walk(self.dir)):
                shutil.rmtree(self.dir, ignore_errors=True)  # nothing worth keeping for the next build
        finally:
            self._lock.release()

    def recover(self) -> None:
        """Finish or undo a swap that a kill interrupted, and delete folders a swap left to delete."""
        if self.old.exists():
            if not self.out.exists():
                if (self.dir / "manifest.csv").is_file():
                    os.rename(self.dir, self.out)
                    log.warning("finished the swap of %s that an interrupted build left half done", self.out)
                else:
                    os.rename(self.old, self.out)
                    log.warning("put back the previous %s that an interrupted build had moved aside", self.out)
            if self.old.exists():
                shutil.rmtree(self.old)
        for trash in self.out.parent.glob(f"{self._trash}*"):
            shutil.rmtree(trash, ignore_errors=True)

    def check_out(self) -> None:
        """Refuse an ``--out`` that holds anything a dataset build did not write (the swap would delete it)."""
        if not self.out.exists():
            return
        if not self.out.is_dir():
            raise DatasetError(f"--out {self.out} is a file; give a folder for the dataset")
        foreign = sorted(p.name for p in self.out.iterdir() if p.name not in _known_names())
        if foreign:
            raise DatasetError(f"--out {self.out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                               "which covid-cxr data build did not write and a rebuild would delete; move them "
                               "elsewhere or choose another --out")

    def publish(self) -> None:
        """Swap the finished staging folder in as the dataset folder (the previous one is deleted)."""
        if not (self.dir / "manifest.csv").is_file():
            raise DatasetError(f"{self.dir} is incomplete (no manifest.csv); nothing was replaced")
        if not self.out.exists():
            os.rename(self.dir, self.out)
            return
        if exchange(self.dir, self.out):
            trash = self.out.parent / f"{self._trash}{uuid.uuid4().hex[:8]}"
            os.rename(self.dir, trash)  # the previous dataset, now at the staging path
            shutil.rmtree(trash, ignore_errors=True)
            return
        os.rename(self.out, self.old)
        os.rename(self.dir, self.out)
        shutil.rmtree(self.old, ignore_errors=True)
