"""File helpers every stage shares: one atomic writer, JSON/YAML I/O, worker counts.

Every output file is written to a temporary name in its folder and renamed over the target, so a
crash or a kill never leaves half a file, and a reader sees either the old file or the new one.
"""

from __future__ import annotations

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


def atomic_write(path: str | Path, data: str | bytes | Iterable[bytes | memoryview]) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or chunks of bytes) to ``path`` via a temp file and a rename.

    The folder is created if needed. On any error the temp file is removed and the old ``path`` (if
    any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing or broken file is a :class:`~covid_cxr.errors.CovidCxrError` naming it."""
    from covid_cxr.errors import CovidCxrError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CovidCxrError(f"{what} {path} not found") from None
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

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
