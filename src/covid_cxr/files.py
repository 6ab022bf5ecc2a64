"""File helpers every stage shares: one atomic writer, JSON/YAML I/O, worker counts.

Every output file is written to a temporary name in its folder and renamed over the target, so a
crash or a kill never leaves half a file, and a reader sees either the old file or the new one. A
write that fails (disk full, read-only folder) removes its temporary file and raises
:class:`~covid_cxr.errors.OutputError`, one line saying what to do.
"""

from __future__ import annotations

import errno
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import yaml


def default_workers(limit: int = 8) -> int:
    """CPUs this process may use (its affinity mask, not the machine's count), at most ``limit``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, limit))


TEMP_MARK = ".tmp-"
"""Temporary files are named ``.<name>.tmp-<pid>-<random>`` next to their target."""


def _encode_text(text: str) -> bytes:
    """UTF-8; file names that are not UTF-8 (lone surrogates in Python) keep their original bytes, so a CSV names
    the file that exists; other lone surrogates are written as ``\\udNNN``."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace")


def printable(text: object) -> str:
    """``text`` as it can always be printed: bytes of a file name that are not UTF-8 (which Python keeps as lone
    surrogates) are shown as ``\\xNN``, as ``ls -b`` would."""
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _encode_text(s).decode("utf-8", "backslashreplace")


def describe_os_error(exc: OSError) -> str | None:
    """A one-line description with the fix of an error the environment causes (disk full, read-only, no
    permission...); None for other errors (those are bugs, not the user's to fix)."""
    name = printable(exc.filename) if exc.filename is not None else "a file"
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"cannot write {name}: no space left on the device (or the disk quota is used up); free some space " \
               "and run the command again"
    if code == errno.EROFS:
        return f"cannot write {name}: the file system is read-only; choose an output folder on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write or read {name}: permission denied; choose a folder you may write to, or fix its " \
               "permissions"
    if code == errno.EIO:
        return f"input/output error on {name}: the disk or network file system failed; check it and run again"
    if code == errno.ENAMETOOLONG:
        return f"file name too long: {name}"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; raise the limit (ulimit -n) or use fewer --workers"
    if code == errno.EEXIST or code == errno.ENOTDIR:
        return f"cannot write {name}: {exc.strerror}; a file stands where a folder is needed (or the reverse)"
    return None


def output_error(exc: OSError, path: str | Path | None = None) -> OSError:
    """``exc`` as an :class:`~covid_cxr.errors.OutputError` when the environment caused it, else ``exc`` itself."""
    from covid_cxr.errors import OutputError

    if isinstance(exc, OutputError):
        return exc
    if exc.filename is None and path is not None and exc.errno is not None:  # (a bare OSError keeps its text)
        exc = OSError(exc.errno, exc.strerror, str(path))
    message = describe_os_error(exc)
    if message is None:
        return exc
    return OutputError(exc.errno, exc.strerror, exc.filename, message)


def atomic_write(path: str | Path, data: str | bytes | Iterable[bytes | memoryview], durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or chunks of bytes) to ``path`` via a temp file and a rename.

    The folder is created if needed. On any error the temp file is removed and the old ``path`` (if
    any) is untouched. Text that names files whose names are not UTF-8 keeps their bytes.

    Args:
        durable: also flush the file and the rename to the disk (``fsync``), so that not even a power cut can
            leave an empty file behind (for checkpoints; it costs a disk round trip).

    Raises:
        OutputError: the disk is full, the folder read-only or not writable (the message says so and what to do).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, str):
                    f.write(_encode_text(data))
                elif isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    for chunk in data:
                        f.write(chunk)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - the folder vanished or turned read-only meanwhile
                pass
            raise
        if durable:
            _fsync_dir(path.parent)
    except OSError as exc:
        if exc.filename is not None and TEMP_MARK in str(exc.filename):
            exc = OSError(exc.errno, exc.strerror, str(path))  # name the file the user asked for
        raise output_error(exc, path) from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not supported here
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (e.g. metrics.jsonl) in a single write; if it fails (disk full), the file
    is cut back to where it was, so it never ends in half a line.

    Raises:
        OutputError: the disk is full or the file not writable.
    """
    path = Path(path)
    data = _encode_text(line.rstrip("\n") + "\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, path) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:  # pragma: no cover
                pass
            raise output_error(exc, path) from None
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (call it only while holding the folder's
    :class:`RunLock`: no live writer can then be writing there). Returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _json_default(obj: Any):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # NumPy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _clean(obj: Any) -> Any:
    """NaN and infinities become None: JSON has no such numbers (Python writes invalid JSON for them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Indented, valid JSON (NaN -> null), with dataclasses that have ``to_dict`` and NumPy values."""
    return json.dumps(_clean(json.loads(json.dumps(obj, default=_json_default))), indent=2) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, to_json(obj))


def read_json(path: str | Path, what: str = "file", max_bytes: int | None = None) -> Any:
    """Parse a JSON file; a missing, broken, absurdly nested or (with ``max_bytes``) oversized file is a
    :class:`~covid_cxr.errors.CovidCxrError` naming it. The size is checked before anything is read."""
    from covid_cxr.errors import CovidCxrError

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise CovidCxrError(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} such a file can "
                                    "need; it is not one covid-cxr wrote: use another copy or write it again")
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CovidCxrError(f"{what} {path} not found") from None
    except RecursionError:
        raise CovidCxrError(f"{what} {path} is nested too deep to be one covid-cxr wrote; write it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CovidCxrError(f"{what} {path} is unreadable ({exc}); write it again") from None


def write_yaml(path: str | Path, data: dict) -> Path:
    """Write ``data`` as YAML (keys in their given order), atomically."""
    return atomic_write(path, yaml.safe_dump(_clean(json.loads(json.dumps(data, default=_json_default))),
                                             sort_keys=False))


def relative_or_absolute(target: str | Path, start: str | Path) -> str:
    """``target`` relative to the folder ``start`` (for files that move together), else absolute."""
    target, start = Path(target).resolve(), Path(start).resolve()
    try:
        return os.path.relpath(target, start)
    except ValueError:  # pragma: no cover - another drive on Windows
        return str(target)


class RunLock:
    """An exclusive lock on a file (``fcntl.flock``), so two writers never share one folder.

    The lock is released when the process ends, however it ends (the kernel drops it), so a killed run
    never leaves a stale lock behind.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`~covid_cxr.errors.RunError` naming the process that holds it."""
        import fcntl

        from covid_cxr.errors import RunError

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise output_error(exc, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by {holder}; wait for it to finish or choose another "
                           "--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"covid-cxr process {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
