"""Real faults in ``covid-cxr data build``: SIGKILL and Ctrl-C of the command at several points, the state a
kill between two renames leaves, links and ``../`` that lead out of a source, malformed metadata CSVs
(also fuzzed with hypothesis), and file names that are not UTF-8.

What must hold: the previous dataset folder stays byte-identical until the new one is complete; no
worker process outlives the build; a re-run finishes and decodes only what the killed build had not
finished; bad input is one line naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import is_stopped, make_gray, stop_before_rename
from covid_cxr.data.manifest import build
from covid_cxr.data.options import DataConfig
from covid_cxr.data.publish import Staging
from covid_cxr.data.sources import SOURCE_COLUMNS, SourceRead, read_actualmed, read_cohen, read_figure1, read_folder
from covid_cxr.errors import SourceError

SRC = Path(__file__).resolve().parents[1] / "src"
CORPUS = Path(__file__).resolve().parent / "corpus"


# --------------------------------------------------------------------------- helpers


def _image(path: Path, seed: int, side: int = 160) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = make_gray(seed, (side, side - 16)).astype(np.int16)
    Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)).save(
        path, compress_level=1)


def _site(root: Path, counts: dict[str, int], seed: int, side: int = 48) -> Path:
    for k, (label, n) in enumerate(counts.items()):
        for i in range(n):
            _image(root / label / f"{label}-{i:04d}.png", seed=seed * 100_000 + k * 10_000 + i, side=side)
    return root


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (recursively), by relative path."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "covid_cxr.cli", "data", "build", "--no-progress", *args]


def _group(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group ``pgid``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(d))
    return found


def _assert_group_ends(pgid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group(pgid) == [], "worker processes outlived the build"


def _records(staging: Path) -> int:
    root = staging / "cache" / "records"
    return sum(len([f for f in files if f.endswith(".rec")]) for _, _, files in os.walk(root))


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    """SIGKILL the build (its main process only) as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the build ended (rc {proc.returncode}) before the kill point:\n" \
                                    f"{proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _report(out: Path) -> dict:
    return json.loads((out / "ingest_report.json").read_text())


# --------------------------------------------------------------------------- kill -9 and Ctrl-C


@pytest.fixture()
def rebuilt(tmp_path: Path) -> dict:
    """A finished 2-class dataset, and a source with a pneumonia folder its 3-class rebuild must decode."""
    src = _site(tmp_path / "site", {"covid": 40, "normal": 40}, seed=1)
    out = tmp_path / "ds"
    build(DataConfig(sources=(("folder", str(src)),), out=str(out), test_per_class=5, workers=1, progress=False))
    _site(src, {"pneumonia": 400}, seed=2, side=160)  # new images: the rebuild decodes these
    return {"src": src, "out": out, "before": tree_hashes(out), "staging": tmp_path / ".ds.staging",
            "cmd": _cli("--source", f"folder={src}", "--out", str(out), "--task", "covid-pneumonia-normal",
                        "--test-per-class", "5", "--workers", "2")}


def _start(cmd: list[str], stop_before: str | None = None) -> subprocess.Popen:
    """``stop_before``: the build stops itself (SIGSTOP) when it is about to rename a finished temporary file of
    that name into place (tests/hooks/sitecustomize.py), so a kill lands there every time."""
    env = stop_before_rename(_env(), stop_before) if stop_before else _env()
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_kill_during_decoding_keeps_previous_dataset_and_resumes(rebuilt: dict) -> None:
    proc = _start(rebuilt["cmd"])
    # The 80 images of the previous build are linked from its cache first; then the 400 new ones are decoded.
    _kill_when(proc, lambda: _records(rebuilt["staging"]) >= 100)
    _assert_group_ends(proc.pid)
    assert tree_hashes(rebuilt["out"]) == rebuilt["before"]  # byte-identical, cache included
    finished = _records(rebuilt["staging"])
    # Which records the killed build finished: the previous build's 80 images (linked from its cache, interleaved
    # with decoding in batches, so not necessarily all of them before the kill) and some of the 400 new ones.
    previous = set(pd.read_csv(rebuilt["out"] / "manifest.csv", dtype=str)["sha256"])
    new_finished = {p.stem for p in (rebuilt["staging"] / "cache" / "records").rglob("*.rec")} - previous
    done = subprocess.run(rebuilt["cmd"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = _report(rebuilt["out"])
    assert len(report["labels"]) == 3
    assert report["build"]["files"] == 480
    # Nothing is decoded twice: the new images the killed build finished are reused, the previous build's are linked
    # (by whichever build got to them); only the remaining new images are decoded.
    assert len(previous) == 80 and report["build"]["decoded"] == 400 - len(new_finished)
    assert finished >= 100 and not rebuilt["staging"].exists()


@pytest.mark.slow
def test_kill_during_write_phase_keeps_previous_dataset(rebuilt: dict) -> None:
    proc = _start(rebuilt["cmd"], stop_before="manifest.csv")
    # dataset.json is written before the card and the manifest: the bug was a 3-class dataset.json beside a
    # 2-class manifest.csv after a kill here. The build stops itself as it is about to rename manifest.csv.
    _kill_when(proc, lambda: is_stopped(proc.pid))
    assert (rebuilt["staging"] / "dataset.json").is_file()
    _assert_group_ends(proc.pid)
    assert tree_hashes(rebuilt["out"]) == rebuilt["before"]
    assert sorted(json.loads((rebuilt["out"] / "dataset.json").read_text())["labels"]) == ["covid", "normal"]
    done = subprocess.run(rebuilt["cmd"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = _report(rebuilt["out"])
    assert report["build"]["decoded"] == 0 and report["build"]["reused_from_cache"] == 480
    assert len(json.loads((rebuilt["out"] / "dataset.json").read_text())["labels"]) == 3
    assert set(pd.read_csv(rebuilt["out"] / "manifest.csv")["target"].dropna()) == {"covid", "normal", "pneumonia"}


@pytest.mark.slow
def test_ctrl_c_stops_workers_and_prints_one_line(rebuilt: dict) -> None:
    # preexec: Ctrl-C's default disposition, as in a terminal's foreground job (a suite run as a background job of a
    # shell without job control inherits SIGINT ignored, and Python leaves it ignored)
    proc = subprocess.Popen(rebuilt["cmd"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while _records(rebuilt["staging"]) < 100:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole foreground group
    # Bound: the interrupt path waits at most 5 + 5 s per worker and 1 + 10 s for the pool's manager thread
    # (workers._stop: 31 s with 2 workers) plus the interpreter's exit; on an idle 2-core machine it takes 1-2 s, and
    # 180 s leaves room for a machine running other test suites at the same time (it once took over 60 s there).
    # It once never ended (CI): a worker stopped mid-send left the manager thread waiting forever; the unit test
    # test_workers.py::test_ctrl_c_while_workers_send_large_results_ends_the_command reproduces that every time.
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == "covid-cxr: interrupted"
    _assert_group_ends(proc.pid)
    assert tree_hashes(rebuilt["out"]) == rebuilt["before"]


def test_rerun_decodes_nothing_and_previous_cache_is_linked(tmp_path: Path) -> None:
    src = _site(tmp_path / "site", {"covid": 12, "normal": 12}, seed=3)
    out = tmp_path / "ds"
    cfg = DataConfig(sources=(("folder", str(src)),), out=str(out), test_per_class=3, workers=1, progress=False,
                     dedup=False)
    first = build(cfg)
    assert first["build"]["decoded"] == 24
    entry = next((out / "cache" / "s256").rglob("*.npy"))
    second = build(cfg)
    assert second["build"]["decoded"] == 0 and second["build"]["reused_from_cache"] == 24
    fresh = out / "cache" / "s256" / entry.relative_to(out / "cache" / "s256")
    assert fresh.is_file() and fresh.stat().st_nlink == 1  # the previous folder (and its links) are gone
    # A changed file has another sha256: it is decoded again, the others are not.
    _image(src / "covid" / "covid-0000.png", seed=999)
    third = build(cfg)
    assert third["build"]["decoded"] == 1


def _finished_dataset(tmp_path: Path, name: str, seed: int) -> tuple[Path, DataConfig]:
    src = _site(tmp_path / f"site{seed}", {"covid": 10, "normal": 10}, seed=seed)
    out = tmp_path / name
    cfg = DataConfig(sources=(("folder", str(src)),), out=str(out), test_per_class=3, workers=1, progress=False,
                     dedup=False)
    build(cfg)
    return out, cfg


@pytest.mark.parametrize("staging_complete", [True, False])
def test_kill_between_two_renames_is_recovered(tmp_path: Path, staging_complete: bool) -> None:
    """Where RENAME_EXCHANGE is missing the swap is two renames; a kill between them leaves NAME missing,
    the previous dataset at .NAME.old and the new one at .NAME.staging. The next build repairs that."""
    out, cfg = _finished_dataset(tmp_path, "ds", seed=4)
    previous = tree_hashes(out)
    staging, old = tmp_path / ".ds.staging", tmp_path / ".ds.old"
    shutil.copytree(out, staging)  # the new dataset: the same build with another card
    (staging / "dataset_card.md").write_text("the new one")
    os.rename(out, old)
    if not staging_complete:
        (staging / "manifest.csv").unlink()
    with Staging(out):  # what every build does first, under the lock
        pass
    assert not old.exists()
    if staging_complete:  # the swap is finished: the new dataset is in place
        assert (out / "dataset_card.md").read_text() == "the new one"
        assert {k: v for k, v in tree_hashes(out).items() if k != "dataset_card.md"} == {
            k: v for k, v in previous.items() if k != "dataset_card.md"}
    else:  # the previous dataset is put back, byte for byte
        assert tree_hashes(out) == previous
        report = build(cfg)  # and the next build goes on, reusing every cache entry
        assert report["build"]["decoded"] == 0 and (out / "manifest.csv").is_file() and not staging.exists()


def test_out_with_foreign_files_is_refused(tmp_path: Path) -> None:
    out, cfg = _finished_dataset(tmp_path, "ds", seed=6)
    (out / "my-notes.txt").write_text("mine")
    before = tree_hashes(out)
    with pytest.raises(Exception, match="my-notes.txt.*another --out"):
        build(cfg)
    assert tree_hashes(out) == before


# --------------------------------------------------------------------------- paths that lead out of a source


def test_links_and_dotdot_never_leave_the_source(tmp_path: Path) -> None:
    site = _site(tmp_path / "site", {"covid": 8, "normal": 8}, seed=7)
    secret = tmp_path / "secret"
    _site(secret, {"covid": 2}, seed=8)
    (site / "covid" / "etc").symlink_to("/etc")  # a folder link out of the source
    (site / "normal" / "passwd.png").symlink_to("/etc/passwd")  # a file link out of the source
    (site / "covid" / "stolen.png").symlink_to(secret / "covid" / "covid-0000.png")
    (site / "other").symlink_to(secret)  # a whole class folder that is a link out
    read = read_folder(site)
    reasons = {Path(d["item"]).name: d["reason"] for d in read.dropped}
    assert "outside the source folder" in reasons["etc"] and "outside the source folder" in reasons["passwd.png"]
    assert "outside the source folder" in reasons["stolen.png"] and "outside the source folder" in reasons["other"]
    assert len(read.images) == 16
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in read.images["path"])
    assert not any(d["item"].startswith("/etc") for d in read.dropped)
    # Metadata rows that lead out: ../ in a file name, a patient id that is a path.
    cohen = tmp_path / "cohen"
    _image(cohen / "images" / "a.png", seed=9)
    _write_meta(cohen / "metadata.csv", ["patientid", "finding", "view", "modality", "filename"],
                [["1", "COVID-19", "PA", "X-ray", "a.png"], ["2", "COVID-19", "PA", "X-ray", "../../../../etc/passwd"]])
    assert "outside the source folder" in read_cohen(cohen).dropped[0]["reason"]
    fig = tmp_path / "figure1"
    _image(fig / "images" / "COVID-1.png", seed=10)
    _write_meta(fig / "metadata.csv", ["patientid", "finding", "view", "modality"],
                [["COVID-1", "COVID-19", "PA", "X-ray"], ["../../../../../etc/passwd", "COVID-19", "PA", "X-ray"]])
    got = read_figure1(fig)
    assert len(got.images) == 1 and "outside the source folder" in got.dropped[0]["reason"]
    # metadata.csv and README.txt are not read through links out of the source either.
    (cohen / "metadata.csv").unlink()
    (cohen / "metadata.csv").symlink_to(fig / "metadata.csv")
    with pytest.raises(SourceError, match="outside the source folder"):
        read_cohen(cohen)
    (site / "README.txt").symlink_to(secret / "README.txt")
    (secret / "README.txt").write_text("SYNTHETIC (a file outside the source)")
    assert read_folder(site).synthetic is False
    # The whole build: counted in dropped.csv, nothing from /etc anywhere.
    out = tmp_path / "ds"
    build(DataConfig(sources=(("folder", str(site)),), out=str(out), test_per_class=2, workers=1, progress=False))
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    assert sorted(dropped.loc[dropped["reason"].str.contains("outside the source"), "item"]) == [
        "README.txt", "covid/etc", "covid/stolen.png", "normal/passwd.png", "other"]
    assert not (out / "manifest.csv").read_text().count("passwd")


def test_file_names_that_are_not_utf8_are_skipped_and_counted(tmp_path: Path) -> None:
    site = _site(tmp_path / "site", {"covid": 8, "normal": 8}, seed=11)
    raw = os.fsencode(site / "covid")
    with open(raw + b"/\xff.png", "wb") as f:
        f.write((site / "covid" / "covid-0000.png").read_bytes() + b"x")
    os.mkdir(raw + b"/\xfe-folder")
    with open(raw + b"/\xfe-folder/x.png", "wb") as f:
        f.write(b"not read")
    out = tmp_path / "ds"
    report = build(DataConfig(sources=(("folder", str(site)),), out=str(out), test_per_class=2, workers=1,
                              progress=False, dedup=False))
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    bad = dropped[dropped["reason"].str.contains("not valid UTF-8")]
    assert sorted(bad["item"]) == ["covid/\\xfe-folder", "covid/\\xff.png"]
    assert report["images_in_manifest"] == 16 and (out / "manifest.csv").is_file()
    assert set(p.name for p in out.iterdir()) >= {"manifest.csv", "dataset.json", "dropped.csv", "cache"}


# --------------------------------------------------------------------------- malformed metadata.csv


COHEN = ["patientid", "finding", "view", "modality", "folder", "filename"]
ACTUALMED = ["patientid", "finding", "view", "modality", "imagename"]
FIGURE1 = ["patientid", "finding", "view", "modality"]


def _write_meta(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def _cohen_site(root: Path) -> Path:
    for i in range(3):
        _image(root / "images" / f"p{i}.png", seed=20 + i, side=40)
    _write_meta(root / "metadata.csv", COHEN, [[str(i), "COVID-19", "PA", "X-ray", "images", f"p{i}.png"]
                                               for i in range(3)])
    return root


MALFORMED = {
    "empty file": b"",
    "only blank lines": b"\n\n  \n",
    "extra commas": b"patientid,finding,view,modality,folder,filename\n1,COVID-19,PA,X-ray,images,p0.png,,\n",
    "shifted row": b"patientid,finding,view,modality,folder,filename\n1,COVID-19,X-ray,images,p0.png\n",
    "unbalanced quote": b'patientid,finding,view,modality,folder,filename\n1,"COVID-19,PA,X-ray,images,p0.png\n',
    "utf-16 without bom": "patientid,finding,view,modality,folder,filename\n".encode("utf-16-le"),
    "odd utf-16": b"\xff\xfep\x00a\x00t",
    "column twice": b"patientid,finding,view,modality,folder,filename,finding\n1,a,PA,X-ray,images,p0.png,b\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_one_clear_error(tmp_path: Path, case: str) -> None:
    root = _cohen_site(tmp_path / "cohen")
    (root / "metadata.csv").write_bytes(MALFORMED[case])
    with pytest.raises(SourceError) as info:
        read_cohen(root)
    msg = str(info.value)
    assert str(root / "metadata.csv") in msg and "\n" not in msg
    assert any(w in msg for w in ("save it", "fix that row", "header row", "rename or remove"))


def test_malformed_metadata_through_the_cli_has_no_traceback(tmp_path: Path) -> None:
    root = _cohen_site(tmp_path / "cohen")
    (root / "metadata.csv").write_bytes(MALFORMED["unbalanced quote"])
    done = subprocess.run(_cli("--source", f"cohen={root}", "--out", str(tmp_path / "ds")), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("covid-cxr: error: ") and "metadata.csv, line 2" in line
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "cp1252"])
def test_metadata_encodings_with_a_mark_are_read(tmp_path: Path, encoding: str) -> None:
    root = _cohen_site(tmp_path / "cohen")
    rows = [[str(i), "COVID-19 pneumonie" + ("é" if i else ""), "PA", "X-ray", "images", f"p{i}.png"] for i in range(3)]
    _write_meta(root / "metadata.csv", COHEN, rows, encoding=encoding)
    got = read_cohen(root)
    assert sorted(Path(p).name for p in got.images["path"]) == ["p0.png", "p1.png", "p2.png"]
    assert "COVID-19 pneumonieé" in set(got.images["finding"])


# --------------------------------------------------------------------------- fuzzing the metadata readers


READERS = {"cohen": (read_cohen, COHEN), "actualmed": (read_actualmed, ACTUALMED), "figure1": (read_figure1, FIGURE1)}


def _valid_text(reader: str) -> str:
    rows = {"cohen": [["1", "COVID-19", "PA", "X-ray", "images", "p0.png"], ["2", "No Finding", "AP", "X-ray", "", "p1.png"],
                      ["3", "Pneumonia", "L", "CT", "images", "p2.png"]],
            "actualmed": [["1", "COVID-19", "PA", "X-ray", "p0.png"], ["2", "No finding", "AP", "X-ray", "p1.png"]],
            "figure1": [["p0", "COVID-19", "PA", "X-ray"], ["p1", "Pneumonia", "AP", "X-ray"]]}[reader]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([READERS[reader][1]] + rows)
    return buf.getvalue()


_PIECES = st.sampled_from([",", '"', "\n", "\r\n", "\x00", "é", "\ufeff", " ", "..", "/", "../../../../etc/passwd",
                           "p0.png", "images", "COVID-19", "\t", ";", "'", "\\", "*", "[", "ÿ"])


@st.composite
def mutated(draw, reader: str) -> bytes:
    text = _valid_text(reader)
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate", "duplicate line"]))
        if op == "insert":
            text = text[:pos] + draw(_PIECES) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)):]
        elif op == "truncate":
            text = text[:pos]
        else:
            lines = text.split("\n")
            k = draw(st.integers(0, max(0, len(lines) - 1)))
            text = "\n".join(lines[:k + 1] + lines[k:])
    encoding = draw(st.sampled_from(["utf-8", "utf-16", "utf-16-le", "cp1252", "latin-1"]))
    return text.encode(encoding, errors="replace")


def _site_for(reader: str, root: Path) -> Path:
    for name in ("p0.png", "p1.png", "p2.png"):
        if not (root / "images" / name).is_file():
            _image(root / "images" / name, seed=30, side=40)
    return root


def _check(reader: str, data: bytes, root: Path) -> None:
    fn = READERS[reader][0]
    _site_for(reader, root)
    (root / "metadata.csv").write_bytes(data)
    try:
        got = fn(root)
    except SourceError as exc:
        assert "\n" not in str(exc) and "metadata.csv" in str(exc)
        return
    assert isinstance(got, SourceRead) or type(got).__name__ == "SourceRead" and list(got.images.columns) == SOURCE_COLUMNS
    for p in got.images["path"]:
        assert Path(p).resolve().is_relative_to(root.resolve()) and Path(p).is_file()
    for d in got.dropped:
        d["item"].encode("utf-8")
        assert not d["item"].startswith("/etc")


def _corpus(reader: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / reader).glob("*.csv"))] if (CORPUS / reader).is_dir() else []


def _fuzz(reader: str):
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=mutated(reader))
    @example(data=b"")
    @example(data=b"\xff\xfe")
    @example(data=(",".join(READERS[reader][1]) + "\n\x00,\x00\n").encode())
    def run(tmp_path_factory, data: bytes) -> None:
        _check(reader, data, tmp_path_factory.getbasetemp() / f"fuzz-{reader}")

    return run


test_fuzz_cohen_metadata = _fuzz("cohen")
test_fuzz_actualmed_metadata = _fuzz("actualmed")
test_fuzz_figure1_metadata = _fuzz("figure1")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzz_seed_corpus(tmp_path: Path, reader: str) -> None:
    """Every mutated CSV that once found a bug (tests/corpus/<reader>/*.csv) stays handled."""
    cases = _corpus(reader)
    assert len(cases) >= 4
    for k, data in enumerate(cases):
        _check(reader, data, tmp_path / f"{reader}-{k}")
