"""Reading a source folder that covid-cxr did not write: its metadata CSV, decoded with an error that names the file
and the fix, its files walked without leaving the folder, and paths checked to lie inside it.

The readers of each collection's layout (:mod:`covid_cxr.data.sources`) use these; nothing here knows a collection.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import pandas as pd

from covid_cxr.errors import SourceError
from covid_cxr.files import printable


class Drops(Protocol):
    """Where a refused file is counted with its reason (a :class:`~covid_cxr.data.sources.SourceRead`)."""

    def drop(self, item: str | Path, reason: str) -> None: ...


LINK_HINT = "; --allow-links-to DIR follows links into DIR"
"""Appended to the reason a link out of a source is refused: the way to follow it."""

_CSV_FIX = "save it from a spreadsheet program as CSV (comma-separated, UTF-8)"


def _decode_metadata(path: Path, raw: bytes) -> tuple[str, str]:
    """The text of a metadata file and its encoding: UTF-16 and UTF-8 with a byte-order mark, UTF-8, Windows-1252."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise SourceError(f"{path} starts with a UTF-16 byte-order mark but is not valid UTF-16; {_CSV_FIX}") from None
    if b"\x00" in raw:
        raise SourceError(f"{path} contains NUL bytes (UTF-16 without a byte-order mark, or not a text file); {_CSV_FIX}")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding), "utf-8" if encoding == "utf-8-sig" else encoding
        except UnicodeDecodeError:
            continue
    raise SourceError(f"{path}: cannot decode as UTF-8 or Windows-1252; {_CSV_FIX}")


def read_metadata_csv(path: Path, required: list[str]) -> tuple[pd.DataFrame, str]:
    """Read a metadata CSV as strings (UTF-8, UTF-16 with a byte-order mark, or Windows-1252). Returns (frame,
    encoding); the frame's ``_line`` column is each row's line in the file.

    Raises:
        SourceError: one line naming the file and the fix: the file is missing, empty or not a well-formed
            CSV (a row with more or fewer fields than the header, an unbalanced quote), or lacks a required column.
    """
    if not path.is_file():
        raise SourceError(f"{path} not found: point --source at the folder that holds the source's metadata.csv")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    text, encoding = _decode_metadata(path, raw)
    if not text.strip():
        raise SourceError(f"{path} is empty; it needs a header row ({', '.join(required)}) and one row per image")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, lines = [], []
    try:
        header = [c.strip() for c in next(reader)]
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                raise SourceError(
                    f"{path}, line {reader.line_num}: {len(row)} fields but the header has {len(header)} (a field "
                    "with a comma that is not in double quotes, or a missing field that shifts the row); fix that "
                    f"row or {_CSV_FIX}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise SourceError(f"{path}, line {reader.line_num}: not a well-formed CSV ({exc}; often an unbalanced double "
                          f"quote); fix that row or {_CSV_FIX}") from None
    named = [c for c in header if c]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise SourceError(f"{path}: column {twice[0]!r} appears twice in the header; rename or remove one of them")
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path} has no column {', '.join(repr(m) for m in missing)} "
                          f"(columns: {', '.join(named)}); is this the right source's metadata.csv?")
    df = pd.DataFrame(rows, columns=header, dtype=str)
    df = df.loc[:, [bool(c) for c in header]]  # unnamed columns carry nothing we read
    df["_line"] = lines
    return df, encoding


def is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def walk_files(root: Path, out: Drops) -> list[Path]:
    """Every regular file under ``root`` (sorted), never leaving it, each refusal counted in ``out``.

    Links to folders are not followed; a link to a file is kept only if it resolves inside ``root``; a name
    that is not valid UTF-8 is skipped (it could not be written to the manifest).
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in list(dirnames):
            p = d / name
            if not is_utf8(p):
                out.drop(printable(p), "folder name is not valid UTF-8 (its files were not read); rename the folder")
                dirnames.remove(name)
            elif p.is_symlink():
                out.drop(p, f"link to a folder outside the source folder (refused{LINK_HINT})" if not is_inside(p, root)
                         else "link to a folder (not followed: its files are read where they are)")
                dirnames.remove(name)
        dirnames.sort()
        for name in filenames:
            p = d / name
            if not is_utf8(p):
                out.drop(printable(p), "file name is not valid UTF-8; rename the file")
            elif p.is_symlink() and not is_inside(p, root):
                out.drop(p, f"link pointing outside the source folder (refused{LINK_HINT})")
            elif not p.is_file():
                out.drop(p, "broken link or not a regular file")
            else:
                files.append(p)
    return sorted(files)


def require_dir(root: Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not is_utf8(root):
        raise SourceError(f"{what} folder {printable(root)}: its path is not valid UTF-8; rename the folder")
    if not root.is_dir():
        raise SourceError(f"{what} folder {root} does not exist; pass --source NAME=PATH with the unpacked download")
    return root.resolve()


_LINK_TARGETS: ContextVar[tuple[Path, ...]] = ContextVar("covid_cxr_link_targets", default=())
"""Folders that links in a source may lead into besides the source itself (``--allow-links-to``); set only by
:func:`links_allowed_into` around one source's reading."""


@contextmanager
def links_allowed_into(folders: Sequence[str | Path]) -> Iterator[tuple[Path, ...]]:
    """While reading a source: links that resolve inside one of ``folders`` (shared storage the user named) count as
    inside the source. Each folder must exist; it is resolved once, here."""
    resolved = []
    for f in folders:
        p = Path(f).expanduser()
        if not p.is_dir():
            raise SourceError(f"--allow-links-to {printable(p)}: no such folder; name the folder the source's links "
                              "lead to (e.g. the shared storage that holds the images)")
        resolved.append(p.resolve())
    token = _LINK_TARGETS.set(tuple(resolved))
    try:
        yield tuple(resolved)
    finally:
        _LINK_TARGETS.reset(token)


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` (after resolving links and ``..``) lies inside ``root``, or inside a folder that links
    may lead into (``--allow-links-to``, see :func:`links_allowed_into`)."""
    try:
        real = path.resolve()
        return any(_under(real, r) for r in (root.resolve(), *_LINK_TARGETS.get()))
    except (OSError, RuntimeError):
        return False


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
