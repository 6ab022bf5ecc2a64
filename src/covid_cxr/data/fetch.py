"""Download public sources: ``covid-cxr data fetch --source cohen|mooney|radiography --out PATH`` (and print the
steps for the lung-mask sets montgomery, shenzhen, jsrt, which need a person to register or accept terms).

``cohen`` is the GitHub archive of ieee8023/covid-chestxray-dataset, fetched over HTTP(S)
with resume (HTTP Range into ``PATH.zip.part``), size and optional SHA-256 checks, then
unpacked safely into the layout :func:`covid_cxr.data.sources.read_cohen` reads
(``PATH/metadata.csv`` + ``PATH/images/``). ``mooney`` and ``radiography`` come from Kaggle
through the ``kaggle`` package when it is installed and credentials exist; otherwise
:class:`FetchError` says exactly how to download them by hand.

PATH appears only once complete: everything is unpacked into a temporary folder beside it
and renamed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from covid_cxr import __version__
from covid_cxr.data.options import FetchConfig
from covid_cxr.data.unzip import unpack_zip
from covid_cxr.errors import FetchError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.images import sha256_file

log = logging.getLogger(__name__)

COHEN_URL = "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetchable:
    """A source ``covid-cxr data fetch`` can download."""

    title: str
    page: str
    """Web page of the source."""
    url: str | None = None
    """Default archive URL (plain HTTP download), or None for a Kaggle dataset."""
    kaggle: str | None = None
    """Kaggle dataset slug ``owner/name``, or None."""


FETCHABLE: dict[str, Fetchable] = {
    "cohen": Fetchable("covid-chestxray-dataset (Cohen et al.)",
                       "https://github.com/ieee8023/covid-chestxray-dataset", url=COHEN_URL),
    "mooney": Fetchable("Chest X-Ray Images (Pneumonia) (Kermany et al., Mooney)",
                        "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia",
                        kaggle="paultimothymooney/chest-xray-pneumonia"),
    "radiography": Fetchable("COVID-19 Radiography Database (Rahman, Chowdhury et al.)",
                             "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
                             kaggle="tawsifurrahman/covid19-radiography-database"),
}
"""``covid-cxr data fetch --source NAME`` names and where each source comes from."""


MASK_SETS: dict[str, str] = {
    "montgomery": (
        "Montgomery County chest X-ray set (U.S. National Library of Medicine): 138 frontal films, 80 normal and 58 "
        "with tuberculosis, each with manual left and right lung masks.\n"
        "  1. Open https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html (Tuberculosis Chest X-ray Image Data Sets) "
        "and download the Montgomery County set (MontgomerySet.zip); read its terms and cite Jaeger et al., Quant "
        "Imaging Med Surg 2014.\n"
        "  2. Unzip it. The films are CXR_png/<name>.png; the masks ManualMask/leftMask/<name>.png and "
        "ManualMask/rightMask/<name>.png.\n"
        "  3. For each film whose ClinicalReadings/<name>.txt says normal, copy it to PATH/normal/<name>.png and save "
        "the union of its two masks (pixel-wise maximum) as PATH/normal/masks/<name>.png (the tuberculosis films "
        "go to PATH/other/ the same way).\n"
        "  4. covid-cxr data build --source folder=PATH ... --out DATASET_DIR, then covid-cxr lungs train --data "
        "DATASET_DIR --out LUNGS"),
    "shenzhen": (
        "Shenzhen chest X-ray set (NLM with Shenzhen No. 3 People's Hospital): 662 frontal films, 326 normal and 336 "
        "with tuberculosis. Its lung masks were published separately (Stirenko et al., 2018) for most films.\n"
        "  1. Download the Shenzhen set (ChinaSet_AllFiles.zip) from "
        "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html and read its terms.\n"
        "  2. Download the lung masks for it (search 'Shenzhen chest X-ray lung masks Stirenko'; they are "
        "distributed as <film name>_mask.png) and check their license.\n"
        "  3. Films named *_0.png are normal: copy each that has a mask to PATH/normal/<name>.png and its mask to "
        "PATH/normal/masks/<name>.png (*_1.png, tuberculosis, to PATH/other/).\n"
        "  4. covid-cxr data build --source folder=PATH ... --out DATASET_DIR, then covid-cxr lungs train --data "
        "DATASET_DIR --out LUNGS"),
    "jsrt": (
        "JSRT database (Japanese Society of Radiological Technology): 247 frontal films, with lung masks from the SCR "
        "database (van Ginneken et al., Med Image Anal 2006).\n"
        "  1. Register at http://db.jsrt.or.jp/eng.php and download the 247 images (2048 x 2048, 12-bit raw .IMG "
        "files: big-endian unsigned 16-bit, no header).\n"
        "  2. Download the SCR masks (left lung and right lung, per image, as .gif) from the SCR database's page and "
        "read its terms.\n"
        "  3. Convert each .IMG to PNG (numpy.fromfile(path, '>u2').reshape(2048, 2048); invert it if the lungs "
        "look white; scale to 8 bits) into PATH/normal/<name>.png (or PATH/other/ for films with a nodule), and save "
        "the union of its two lung masks, resized to the image's size, as PATH/normal/masks/<name>.png.\n"
        "  4. covid-cxr data build --source folder=PATH ... --out DATASET_DIR, then covid-cxr lungs train --data "
        "DATASET_DIR --out LUNGS"),
}
"""Lung-mask sets whose terms need a person (registration, a license to read): ``data fetch`` prints the steps."""


def run(cfg: FetchConfig) -> dict:
    """Download ``cfg.source`` and unpack it into ``cfg.out``.

    Returns:
        ``{"source", "out", "origin", "bytes", "sha256", "files", "skipped", "resumed_from",
        "seconds", "next"}``: the archive's size and SHA-256, the files unpacked, archive
        entries not created (symbolic links), and the ``covid-cxr data build`` option to use next.

    Raises:
        FetchError: the download, the checks or the unpacking failed, ``out`` is not empty
            (without ``overwrite``), or a Kaggle source cannot be fetched automatically (the
            message then lists the manual steps).
    """
    if cfg.source in MASK_SETS:  # nothing to download without a person: the steps, with the folder filled in
        steps = MASK_SETS[cfg.source].replace("PATH", shlex.quote(str(cfg.out)))
        return {"source": cfg.source, "steps": steps, "next": f"--source folder={shlex.quote(str(cfg.out))}"}
    t0 = time.monotonic()
    out = _check_out(Path(cfg.out), cfg.overwrite)
    src = FETCHABLE[cfg.source]
    if src.kaggle:
        archive, origin, resumed = _download_kaggle(cfg, out), f"kaggle:{src.kaggle}", 0
    else:
        origin = cfg.url or src.url
        archive = out.with_name(out.name + ".zip.part")
        resumed = download(origin, archive, timeout=cfg.timeout, progress=cfg.progress)["resumed_from"]
    size, digest = archive.stat().st_size, sha256_file(archive)
    if cfg.sha256 and digest != cfg.sha256:
        kept = _set_aside(archive, ".sha256-mismatch")
        raise FetchError(f"{origin}: the archive's SHA-256 is {digest}, not the expected {cfg.sha256}. "
                         f"{out} is unchanged; the download was moved to {kept} (delete it, or check "
                         "--sha256 and run again to download afresh)")
    try:
        files, skipped = _unpack_and_install(archive, out, cfg, layout=cfg.source if src.url else None)
    except FetchError as exc:
        kept = _set_aside(archive, ".rejected")
        raise FetchError(f"{exc}; {out} is unchanged and the download was moved to {kept}") from exc
    except OSError as exc:
        raise FetchError(f"cannot unpack {archive} into {out}: {exc}; the download is kept: free space "
                         "or fix permissions and run the same command again") from exc
    if src.kaggle:
        shutil.rmtree(archive.parent)
    else:
        archive.unlink()
        _meta_path(archive).unlink(missing_ok=True)
    summary = {"source": cfg.source, "out": str(out), "origin": origin, "bytes": size, "sha256": digest,
               "files": files, "skipped": skipped, "resumed_from": resumed,
               "seconds": round(time.monotonic() - t0, 2), "next": f"--source {cfg.source}={shlex.quote(str(out))}"}
    log.info("%s: %d files in %s (archive %d bytes, sha256 %s)", cfg.source, files, out, size, digest)
    return summary


def manual_steps(name: str, out: str | None = None) -> str:
    """How to download source ``name`` by hand into ``out`` (``PATH`` when None), one step a line."""
    if name not in FETCHABLE:
        raise FetchError(f"unknown source {name!r} to fetch; use one of {', '.join(FETCHABLE)}")
    src = FETCHABLE[name]
    path = shlex.quote(out) if out else "PATH"
    build = f"covid-cxr data build --source {name}={path} --out DATASET_DIR"
    if src.kaggle is None:
        return (f"To download {src.title} by hand:\n"
                f"  1. git clone --depth 1 {src.page} {path}\n"
                f"     (or download {src.url}, unzip it and rename its folder covid-chestxray-dataset-master "
                f"to {path})\n"
                f"  2. {build}")
    return (f"To download {src.title} from Kaggle by hand:\n"
            f"  1. Sign in at {src.page} and accept the dataset's terms.\n"
            f"  2. pip install kaggle\n"
            f"  3. At https://www.kaggle.com/settings, under API, choose 'Create New Token' and save kaggle.json "
            f"as ~/.kaggle/kaggle.json (chmod 600 ~/.kaggle/kaggle.json), or in the folder named by "
            f"KAGGLE_CONFIG_DIR, or set KAGGLE_USERNAME and KAGGLE_KEY.\n"
            f"  4. kaggle datasets download -d {src.kaggle} -p {path} --unzip\n"
            f"  5. {build}\n"
            f"After steps 2-3, `covid-cxr data fetch --source {name} --out {path}` does 4 for you.")


def kaggle_credentials() -> str | None:
    """Where Kaggle credentials were found (as text), or None when there are none."""
    env = os.environ
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_CONFIG_DIR"):
        candidates = [Path(env["KAGGLE_CONFIG_DIR"]).expanduser() / "kaggle.json"]
    else:
        xdg = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        candidates = [Path.home() / ".kaggle" / "kaggle.json", Path.home() / ".kaggle" / "access_token",
                      xdg / "kaggle" / "kaggle.json"]
    found = [p for p in candidates if p.is_file()]
    return str(found[0]) if found else None


def download(url: str, part: Path, *, timeout: float = 60.0, progress: bool = True) -> dict:
    """Download ``url`` into ``part``, resuming a previous partial download when possible.

    A sidecar ``part.json`` records the URL and the server's validators (ETag, Last-Modified),
    so a resumed request carries ``If-Range``: a server whose file changed sends it whole. A
    server that ignores Range (answers 200) is downloaded from the start again.

    Returns:
        ``{"bytes": size of part when complete, "resumed_from": bytes already there}``.

    Raises:
        FetchError: the server refused, the connection failed or the body is short of its
            announced size (the partial file is kept; calling again resumes).
    """
    meta_path = _meta_path(part)
    have = part.stat().st_size if part.is_file() else 0
    meta = _read_meta(meta_path) if have else None
    if have and (meta is None or meta.get("url") != url):
        log.info("%s is not a partial download of %s; starting afresh", part, url)
        have = 0
    headers = {"User-Agent": f"covid-cxr/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        etag = meta.get("etag") or ""
        validator = etag if etag and not etag.startswith("W/") else meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            if _content_range(exc.headers.get("Content-Range", ""))[2] == have:
                return {"bytes": have, "resumed_from": have}  # already complete
            part.unlink()
            return download(url, part, timeout=timeout, progress=progress)
        raise FetchError(f"{url}: the server answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot download {url}: {reason}. Check the network or proxy and run the same "
                         f"command again{_kept(part, have)}") from exc
    with resp:
        if resp.status == 206 and not have:
            raise FetchError(f"{url}: the server sent part of the file (HTTP 206) to a request for all of it")
        if resp.status == 206:
            start, _, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                raise FetchError(f"{url}: asked for bytes from {have}, the server sent from {start}; "
                                 f"delete {part} and run again")
            mode = "ab"
            log.info("resuming %s at byte %d", url, have)
        else:
            if have:
                log.warning("%s: the server sent the whole file instead of resuming at byte %d; "
                            "downloading it from the start", url, have)
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _write_meta(meta_path, {"url": url, "etag": resp.headers.get("ETag"),
                                    "last_modified": resp.headers.get("Last-Modified"), "total": total})
        size = _stream(resp, part, mode, have, total, url, progress)
    return {"bytes": size, "resumed_from": have}


def _stream(resp, part: Path, mode: str, have: int, total: int | None, url: str, progress: bool) -> int:
    """Append the response body to ``part``; check it against the announced ``total``."""
    from tqdm.auto import tqdm

    size = have
    with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=part.name, disable=not progress) as bar:
        try:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
                if total is not None and size > total:
                    break
        except (OSError, HTTPException) as exc:
            f.flush()
            raise FetchError(f"download of {url} interrupted after {_of(size, total)} ({exc}); run the same "
                             f"command again to resume{_kept(part, size)}") from exc
    if total is not None and size > total:
        part.unlink()
        raise FetchError(f"{url}: the server sent more than the {total} bytes it announced; the download was "
                         "discarded, run again")
    if total is not None and size < total:
        raise FetchError(f"download of {url} interrupted: the server closed the connection after "
                         f"{_of(size, total)}; run the same command again to resume{_kept(part, size)}")
    return size


def _of(size: int, total: int | None) -> str:
    return f"{size} of {total} bytes" if total is not None else f"{size} bytes"


def _kept(part: Path, size: int) -> str:
    return f" (the partial download, {size} bytes, is kept at {part})" if size else ""


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 99, 100); ``bytes */100`` -> (None, None, 100); unknown parts None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    start, end, total = m.groups()
    return (int(start) if start else None, int(end) if end else None,
            int(total) if total and total != "*" else None)


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write(path, json.dumps(meta))


def _set_aside(archive: Path, suffix: str) -> Path:
    """Move a complete but unusable download out of the way, so the next run starts afresh."""
    kept = archive.with_name(archive.name.removesuffix(".part") + suffix)
    os.replace(archive, kept)
    _meta_path(archive).unlink(missing_ok=True)
    return kept


def _check_out(out: Path, overwrite: bool) -> Path:
    out = out.expanduser().resolve()
    if not out.name:
        raise FetchError(f"--out {out} is a file system root; name a folder to create")
    if out.is_file():
        raise FetchError(f"--out {out} is a file; name a folder to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FetchError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite "
                         "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _download_kaggle(cfg: FetchConfig, out: Path) -> Path:
    """Download a Kaggle dataset's zip beside ``out`` with the kaggle package; returns the zip."""
    slug = FETCHABLE[cfg.source].kaggle
    try:
        installed = importlib.util.find_spec("kaggle") is not None
    except ValueError:  # imported already, without a spec
        installed = True
    credentials = kaggle_credentials()
    if not installed or credentials is None:
        reason = ("the kaggle package is not installed" if not installed else
                  "no Kaggle credentials were found (KAGGLE_USERNAME and KAGGLE_KEY, $KAGGLE_CONFIG_DIR/"
                  "kaggle.json, ~/.kaggle/kaggle.json)")
        raise FetchError(f"cannot download {cfg.source} ({slug}) automatically: {reason}.\n"
                         f"{manual_steps(cfg.source, str(out))}")
    staging = out.with_name(out.name + ".kaggle-download")
    staging.mkdir(exist_ok=True)
    log.info("downloading Kaggle dataset %s with credentials from %s", slug, credentials)
    try:
        # kaggle authenticates on import and raises on bad credentials, so import it only here.
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(slug, path=str(staging), force=False, quiet=not cfg.progress, unzip=False)
    except Exception as exc:  # the kaggle package raises many types (OSError, ValueError, HTTP errors)
        raise FetchError(f"the Kaggle download of {slug} failed: {exc}. If it is 401/403, check the "
                         f"credentials in {credentials} and accept the dataset's terms at "
                         f"{FETCHABLE[cfg.source].page}.\n{manual_steps(cfg.source, str(out))}") from exc
    zips = sorted(staging.glob("*.zip"))
    if len(zips) != 1:
        raise FetchError(f"expected one zip from Kaggle in {staging}, found {len(zips)}; delete {staging} and "
                         "run again")
    return zips[0]


def _unpack_and_install(archive: Path, out: Path, cfg: FetchConfig, layout: str | None) -> tuple[int, list[str]]:
    """Unpack ``archive`` into a temporary folder beside ``out``, check it, then rename it to ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.unpack-", dir=out.parent))
    try:
        files, skipped = unpack_zip(archive, tmp, strip_top=layout == "cohen",
                                    max_bytes=cfg.max_unpacked_bytes)
        if layout == "cohen" and not ((tmp / "metadata.csv").is_file() and (tmp / "images").is_dir()):
            top = ", ".join(sorted(p.name for p in tmp.iterdir())[:10]) or "nothing"
            raise FetchError(f"{archive} has no metadata.csv and images/ at its top (found: {top}); is it the "
                             "covid-chestxray-dataset archive?")
        _install(tmp, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files, skipped


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        if not overwrite:
            raise FetchError(f"{out} appeared while downloading; pass --overwrite to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
