"""Unpacking a downloaded zip archive that nobody vouches for: every entry is checked before anything is written
(absolute paths, ``..``, drive letters, encrypted or duplicate entries, file/folder clashes, the number of entries
and the total uncompressed size), symbolic links are never created, and each file is streamed to disk.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import zipfile
from pathlib import Path

from covid_cxr.data.options import FetchConfig
from covid_cxr.errors import FetchError

log = logging.getLogger(__name__)

MAX_UNPACKED_BYTES = FetchConfig.max_unpacked_bytes
"""Default limit on the total uncompressed size of an archive (zip-bomb guard); the Cohen
archive unpacks to well under this."""

MAX_MEMBERS = 500_000
"""Most entries an archive may hold."""

_CHUNK = 1 << 20


def unpack_zip(archive: Path, dest: Path, *, strip_top: bool = False,
               max_bytes: int = MAX_UNPACKED_BYTES) -> tuple[int, list[str]]:
    """Unpack a zip into the existing folder ``dest``, refusing unsafe archives.

    Entries with absolute paths, ``..`` components or drive letters, encrypted or duplicate
    entries, more than :data:`MAX_MEMBERS` entries or more than ``max_bytes`` in all are refused
    before anything is written. Symbolic links are not created (their names are returned).

    Args:
        archive: the zip file.
        dest: an existing, empty folder.
        strip_top: drop the single top folder every entry is inside (GitHub archives have one).
        max_bytes: limit on the total uncompressed size.

    Returns:
        (files written, names of symbolic-link entries skipped).

    Raises:
        FetchError: the file is not a zip, is unsafe, or an entry is corrupt.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{archive} is not a readable zip archive ({exc})") from exc
    with zf:
        plan, skipped = _plan(zf.infolist(), archive, strip_top, max_bytes)
        files = 0
        for info, parts in plan:
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
                raise FetchError(f"{archive}: entry {info.filename!r} is corrupt ({exc})") from exc
            files += 1
    for name in skipped:
        log.warning("%s: symbolic link %r not created", archive, name)
    return files, skipped


def _plan(infos: list[zipfile.ZipInfo], archive: Path, strip_top: bool,
          max_bytes: int) -> tuple[list[tuple[zipfile.ZipInfo, list[str]]], list[str]]:
    """Check every entry and map it to its relative path parts; nothing is written here."""
    if len(infos) > MAX_MEMBERS:
        raise FetchError(f"{archive} has {len(infos)} entries, more than the {MAX_MEMBERS} allowed")
    entries, skipped, total = [], [], 0
    for info in infos:
        name = info.filename
        parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise FetchError(f"{archive}: entry {name!r} has an absolute path; refusing to unpack it")
        if ".." in parts:
            raise FetchError(f"{archive}: entry {name!r} points outside the folder (..); refusing to unpack it")
        if info.flag_bits & 0x1:
            raise FetchError(f"{archive}: entry {name!r} is encrypted")
        if stat.S_ISLNK(info.external_attr >> 16):
            skipped.append(name)
            continue
        total += info.file_size
        if total > max_bytes:
            raise FetchError(f"{archive} unpacks to more than {max_bytes} bytes (limit); refusing to unpack it "
                             "(possible zip bomb)")
        if parts:
            entries.append((info, parts))
    tops = {parts[0] for _, parts in entries}
    if strip_top and len(tops) == 1 and all(len(p) > 1 or i.is_dir() for i, p in entries):
        entries = [(i, p[1:]) for i, p in entries if len(p) > 1]
    seen: dict[tuple[str, ...], bool] = {}  # path -> is a folder
    for info, parts in entries:
        for k in range(1, len(parts)):
            if seen.setdefault(tuple(parts[:k]), True) is False:
                raise FetchError(f"{archive}: {'/'.join(parts[:k])!r} is both a file and a folder")
        key, is_dir = tuple(parts), info.is_dir()
        if key in seen and not (is_dir and seen[key]):
            raise FetchError(f"{archive}: entry {info.filename!r} appears twice or is both a file and a folder")
        seen[key] = is_dir
    return entries, skipped
