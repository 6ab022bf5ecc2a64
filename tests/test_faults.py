"""Fault injection with real faults, not mocks: ``kill -9`` of a training process (mid-epoch, mid-checkpoint-write,
during calibration), a full file system (a size-limited tmpfs), a read-only output folder (a read-only bind mount),
flipped bytes in checkpoints and cache entries, a source image deleted after the dataset was built, and two
trainings into one folder. After each: a clear one-line error, no half-written file, nothing finished lost, and
``--resume`` ends with the weights of an uninterrupted run, bit for bit.

Mounting needs root (CAP_SYS_ADMIN); those tests skip with the reason otherwise. The training tests drive the
``covid-cxr`` command in subprocesses on 32 px phantoms and are marked slow.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import covid_cxr
from conftest import is_stopped, stop_before_rename, write_image
from covid_cxr.cli import main
from covid_cxr.data.options import DataConfig
from covid_cxr.errors import CheckpointError, OutputError
from covid_cxr.files import TEMP_MARK, append_line, atomic_write
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.checkpoint import new_meta, read_checkpoint, save_checkpoint
from covid_cxr.model.networks import build_model

SRC = Path(covid_cxr.__file__).resolve().parents[1]
EPOCHS = 2
TRAIN = ["--epochs", str(EPOCHS), "--image-size", "32", "--batch-size", "8", "--weights", "none", "--patience", "0",
         "--workers", "0", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(SRC),
       "COVID_CXR_OFFLINE": "1", "PYTHONIOENCODING": "utf-8:strict"}
"""Subprocesses run the code under test, single-threaded (bit-identical results), offline."""


# ----------------------------------------------------------------------------- helpers


def covid_cxr_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "covid_cxr.cli", *map(str, args)]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(covid_cxr_cmd(*args), capture_output=True, text=True, env=ENV, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit status 2 and exactly one `covid-cxr: error:` line (log lines aside)."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("covid-cxr:")]
    assert len(errors) == 1 and errors[0].startswith("covid-cxr: error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Error:" not in errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if TEMP_MARK in p.name)


def assert_nothing_half_written(run: Path) -> None:
    """Every checkpoint verifies, every metrics line parses, config.yaml reads; no temporary file is left."""
    import yaml

    assert temp_files(run) == []
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():
            read_checkpoint(run / name)  # checksum verified
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    if (run / "config.yaml").exists():
        assert isinstance(yaml.safe_load((run / "config.yaml").read_text()), dict)


def assert_same_run(reference: Path, run: Path) -> None:
    """best.pt and last.pt hold bit-identical weights (gate included), the same calibration, and metrics.jsonl
    has each epoch once with the same numbers."""
    for name in ("best.pt", "last.pt"):
        a, b = read_checkpoint(reference / name), read_checkpoint(run / name)
        assert a.state_dict.keys() == b.state_dict.keys(), name
        for k in a.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k]), (name, k)
        assert a.meta.epoch == b.meta.epoch, name
        assert a.meta.temperature == b.meta.temperature and a.meta.threshold_log_odds == b.meta.threshold_log_odds
    keys = ("epoch", "train_loss", "val_loss", "val_auc", "lr", "best_epoch")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [[r[k] for k in keys] for r in lines] == [[r[k] for k in keys] for r in ref]
    assert temp_files(run) == []


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (a real file system that fills up: ENOSPC)."""
    path.mkdir(parents=True, exist_ok=True)
    res = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({res.stderr.strip()}); a full disk is tested as root "
                    "with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: int) -> None:
    res = _mount("-o", f"remount,size={size}", str(path))
    assert res.returncode == 0, res.stderr


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` made read-only for everyone, root included: a read-only bind mount, else ``chattr +i``."""
    path.mkdir(parents=True, exist_ok=True)
    if _mount("--bind", str(path), str(path)).returncode == 0:
        if _mount("-o", "remount,bind,ro", str(path)).returncode == 0:
            try:
                yield path
            finally:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
            return
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        return
    pytest.skip("cannot make a folder read-only for root here (no bind mount, no chattr +i); root ignores chmod")


def tiny_checkpoint(path: Path) -> Path:
    """A real (untrained) checkpoint, written by the one writer: no training needed."""
    torch.manual_seed(0)
    model = build_model(("normal", "covid"), weights=None)
    meta = new_meta("densenet121", ("normal", "covid"), "covid", PreprocessSpec.for_size(32), {"seed": 0}, None)
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 phantoms per class at 32 px with its cache (about 22 train and 6 validation images)."""
    from covid_cxr.data.manifest import build
    from covid_cxr.imaging.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("faults")
    generate_phantoms(root / "synthetic-phantoms", 16, size=32, seed=5)
    build(DataConfig(sources=(("folder", str(root / "synthetic-phantoms")),), out=str(root / "dataset"),
                     test_per_class=2, val_fraction=0.2, train_size=200, seed=0, workers=1, progress=False,
                     dedup=False))
    return root / "dataset"


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run through the command, as every interrupted one must end."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = run_cli("train", "--data", dataset, "--out", out, *TRAIN)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- kill -9


class Watched:
    """A `covid-cxr train` process and its run folder, watched every millisecond."""

    def __init__(self, dataset: Path, out: Path, resume: bool, log: Path, stop_before: str | None = None):
        """``stop_before``: the process stops itself (SIGSTOP) when it is about to rename the finished temporary
        file of that name into place (tests/hooks/sitecustomize.py), so a kill lands inside that write."""
        self.out = out
        self.log = open(log, "ab")
        args = ["train", "--data", dataset, "--out", out, *TRAIN] + (["--resume"] if resume else [])
        env = stop_before_rename(ENV, stop_before) if stop_before else ENV
        self.proc = subprocess.Popen(covid_cxr_cmd(*args), stdout=self.log, stderr=self.log, env=env)

    def stopped(self) -> bool:
        """The process has stopped itself (state T in /proc)."""
        return is_stopped(self.proc.pid)

    def metrics_lines(self) -> int:
        try:
            return len((self.out / "metrics.jsonl").read_text().splitlines())
        except OSError:
            return 0

    def temp(self, name: str) -> bool:
        try:
            return any(e.name.startswith(f".{name}{TEMP_MARK}") for e in os.scandir(self.out))
        except OSError:
            return False

    def wait_for(self, predicate, timeout: float = 300) -> bool:
        """Poll until ``predicate()``; False if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return predicate()
            time.sleep(0.001)
        raise AssertionError(f"timed out waiting in {self.out}")

    def kill(self) -> bool:
        """kill -9; True if the process was still running."""
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.log.close()
        return alive

    def finish(self) -> int:
        code = self.proc.wait(timeout=900)
        self.log.close()
        return code


def _final_last_written(w: Watched) -> bool:
    """All epochs recorded and the last epoch's last.pt in place (finalize is next)."""
    return (w.metrics_lines() >= EPOCHS and not w.temp("last.pt") and (w.out / "last.pt").exists()
            and (w.out / "last.pt").stat().st_mtime >= (w.out / "metrics.jsonl").stat().st_mtime)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_kill_9_at_random_points_then_resume_gives_the_weights_of_an_uninterrupted_run(dataset, reference, tmp_path,
                                                                                      seed):
    """One run killed four times, resumed after each kill: at a random moment of the first epoch, while last.pt is
    being written (its temporary file exists), at a random moment after the last epoch (calibration, gate), and
    while finalize rewrites best.pt. The end is bit-identical to the uninterrupted run."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    events = []

    # 1. a random moment of epoch 1, at the latest when epoch 1's last.pt is about to be renamed into place: the
    #    folder has config.yaml, maybe best.pt, no last.pt
    w = Watched(dataset, out, False, log, stop_before="last.pt")
    assert w.wait_for(lambda: (out / "config.yaml").exists())
    end = time.monotonic() + rng.uniform(0.0, 3.0)
    while time.monotonic() < end and not w.stopped() and w.proc.poll() is None:
        time.sleep(0.01)
    assert w.kill(), "the run ended before the first kill"
    events.append(("epoch 1", sorted(p.name for p in out.iterdir())))
    assert not (out / "last.pt").exists(), events
    assert_nothing_half_written_except_temp(out)

    # 2. while last.pt is being written: its temporary file is complete, the rename has not happened
    w = Watched(dataset, out, True, log, stop_before="last.pt")
    assert w.wait_for(w.stopped), "the resumed run ended without writing last.pt"
    assert w.temp("last.pt") and not (out / "last.pt").exists()
    assert w.kill(), "the run ended before the kill during the last.pt write"
    events.append(("last.pt write", sorted(p.name for p in out.iterdir())))
    assert_nothing_half_written_except_temp(out)

    # 3. a random moment after the last epoch: calibration, the gate, the final best.pt, the plots
    w = Watched(dataset, out, True, log)
    assert w.wait_for(lambda: _final_last_written(w))
    time.sleep(rng.uniform(0.0, 1.5))
    events.append(("finalize", w.kill()))
    assert_nothing_half_written_except_temp(out)

    # 4. while finalize rewrites best.pt (a resumed run with no epoch left only finalizes; every epoch is in
    #    last.pt, so the only best.pt write left is finalize's)
    w = Watched(dataset, out, True, log, stop_before="best.pt")
    assert w.wait_for(w.stopped), "the resumed run ended without rewriting best.pt"
    assert w.temp("best.pt") and w.metrics_lines() >= EPOCHS
    assert w.kill(), "the run ended before the best.pt rewrite was caught"
    events.append(("best.pt rewrite", sorted(p.name for p in out.iterdir())))

    w = Watched(dataset, out, True, log)
    assert w.finish() == 0, log.read_text()[-3000:]
    assert_same_run(reference, out)


def assert_nothing_half_written_except_temp(run: Path) -> None:
    """After kill -9 a temporary file may remain (the next start removes it); everything else is whole."""
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():
            read_checkpoint(run / name)
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)


@pytest.mark.slow
def test_a_second_training_into_the_same_folder_is_refused_and_metrics_are_never_interleaved(dataset, reference,
                                                                                             tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = Watched(dataset, out, False, log)
    assert first.wait_for(lambda: (out / ".lock").exists() and b"process" in (out / ".lock").read_bytes())
    os.kill(first.proc.pid, signal.SIGSTOP)  # hold it mid-run (with its lock), however slow the second is to start
    try:
        for extra in ([], ["--resume"]):
            res = run_cli("train", "--data", dataset, "--out", out, *TRAIN, *extra)
            one_line_error(res, "is in use by covid-cxr process", str(first.proc.pid))
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    assert first.finish() == 0, log.read_text()[-3000:]
    assert_same_run(reference, out)  # each epoch once, and the weights of a run nobody disturbed


# ----------------------------------------------------------------------------- a full disk


def test_writes_on_a_full_disk_fail_cleanly(tmp_path):
    """atomic_write, append_line and save_checkpoint on a real full file system: a one-line OutputError, no
    temporary file, the previous file untouched, and the same writes work once space is freed."""
    with tmpfs(tmp_path / "disk", 512 * 1024) as disk:
        atomic_write(disk / "kept.bin", b"k" * 100_000)
        append_line(disk / "metrics.jsonl", json.dumps({"epoch": 1}))
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
        os.close(fd)
        with pytest.raises(OutputError) as err:
            atomic_write(disk / "kept.bin", b"n" * 200_000)
        assert "no space left on the device" in str(err.value) and "kept.bin" in str(err.value)
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
        assert (disk / "kept.bin").read_bytes() == b"k" * 100_000
        with pytest.raises(OutputError):
            append_line(disk / "metrics.jsonl", json.dumps({"epoch": 2, "pad": "x" * 100_000}))
        assert (disk / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # not half a line
        with pytest.raises(OutputError) as err:
            tiny_checkpoint(disk / "best.pt")
        assert "no space left" in str(err.value) and "untouched" in str(err.value)
        assert temp_files(disk) == [] and not (disk / "best.pt").exists()
        filler.unlink()
        resize(disk, 64 * 2**20)  # room for a checkpoint
        tiny_checkpoint(disk / "best.pt")
        read_checkpoint(disk / "best.pt")
        append_line(disk / "metrics.jsonl", json.dumps({"epoch": 2}))
        assert (disk / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


@pytest.mark.slow
def test_training_on_a_full_disk_fails_clearly_and_resumes_to_the_same_weights(dataset, reference, tmp_path):
    """The issue's failure: a raw `RuntimeError: ... inline_container.cc:672 unexpected pos`, a 34 MB temporary
    file, and a run that could be neither resumed nor restarted. The disk fills (1) during epoch 1's last.pt,
    (2) during epoch 2, (3) during calibration; after each: a one-line error, no partial file, and once space is
    freed, --resume continues; the end equals the uninterrupted run."""
    best, last = (reference / "best.pt").stat().st_size, (reference / "last.pt").stat().st_size
    big = 4 * (best + last)
    with tmpfs(tmp_path / "disk", best + last // 2) as disk:
        out = disk / "run"
        args = ["train", "--data", dataset, "--out", out, *TRAIN]

        res = run_cli(*args)  # (1) best.pt fits, last.pt does not
        one_line_error(res, "no space left on the device", "last.pt", "--resume")
        assert_nothing_half_written(out)
        assert (out / "best.pt").exists() and not (out / "last.pt").exists()

        resize(disk, best + last + best // 2)  # (2) epoch 1 fits; epoch 2's checkpoint does not
        res = run_cli(*args, "--resume")
        one_line_error(res, "no space left on the device", "--resume")
        assert_nothing_half_written(out)
        assert read_checkpoint(out / "last.pt").meta.epoch == 1

        resize(disk, big)
        res = run_cli(*args, "--resume")
        assert res.returncode == 0, res.stderr[-3000:]

        resize(disk, used_bytes(disk) + 16 * 1024)  # (3) resuming a finished run calibrates again: no room for it
        before = (out / "best.pt").read_bytes()
        res = run_cli(*args, "--resume")
        one_line_error(res, "no space left on the device", "--resume")
        assert_nothing_half_written(out)
        assert (out / "best.pt").read_bytes() == before

        resize(disk, big)
        res = run_cli(*args, "--resume")
        assert res.returncode == 0, res.stderr[-3000:]
        assert_same_run(reference, out)


# ----------------------------------------------------------------------------- read-only output, damaged files


def test_a_read_only_output_folder_is_a_one_line_error(dataset, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    image = write_image(tmp_path / "x.png", 1)
    with read_only(tmp_path / "ro") as ro:
        cases = [
            (["train", "--data", str(dataset), "--out", str(ro / "run"), *TRAIN], "ro/run"),
            (["predict", "--run", str(ckpt), str(image), "--out", str(ro / "p.csv")], "ro/"),
            (["explain", "--run", str(ckpt), str(image), "--out", str(ro / "ex"), "--no-progress"], "ro/ex"),
            (["data", "build", "--source", f"folder={dataset.parent / 'synthetic-phantoms'}", "--out",
              str(ro / "ds"), "--no-progress", "--no-dedup", "--workers", "1"], "ro/"),  # its lock file ro/.ds.lock
        ]
        for argv, where in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            lines = [x for x in err.splitlines() if x.startswith("covid-cxr")]
            assert len(lines) == 1 and lines[0].startswith("covid-cxr: error: "), err
            assert ("read-only" in lines[0] or "permission denied" in lines[0]) and where in lines[0], lines[0]
            assert "Traceback" not in err
        assert list(ro.iterdir()) == []  # nothing half-written, no staging folder or lock left


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path, capsys):
    """Twenty bytes flipped one at a time at seeded positions of a real checkpoint: each damaged file is refused
    with CheckpointError (by the zip reader, the unpickler or the checksum), unless the byte changed nothing that
    is read (zip padding): then what is read equals the original. Through the command: one line."""
    path = tiny_checkpoint(tmp_path / "best.pt")
    original = path.read_bytes()
    reference = read_checkpoint(path)
    rng = random.Random(1)
    detected = 0
    for offset in sorted(rng.sample(range(len(original)), 20)):
        damaged = tmp_path / "damaged.pt"
        damaged.write_bytes(_flip(original, offset))
        try:
            ckpt = read_checkpoint(damaged)
        except CheckpointError as exc:
            detected += 1
            assert str(damaged) in str(exc)
            continue
        assert ckpt.checksum == reference.checksum and ckpt.meta == reference.meta, offset
        for k in reference.state_dict:
            assert torch.equal(ckpt.state_dict[k], reference.state_dict[k]), (offset, k)
    assert detected >= 18  # tensors are nearly all of the file
    # a byte in the middle of the weights: only the checksum can tell
    tensor_flip = tmp_path / "tensor.pt"
    tensor_flip.write_bytes(_flip(original, len(original) // 2))
    with pytest.raises(CheckpointError, match="is damaged: its contents do not match the checksum"):
        read_checkpoint(tensor_flip)
    image = write_image(tmp_path / "x.png", 1)
    assert main(["predict", "--run", str(tensor_flip), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "covid-cxr: error:" in err and str(tensor_flip) in err


@pytest.mark.slow
def test_flipped_bytes_in_last_pt_stop_resume_with_one_line(reference, dataset, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(_flip(data, len(data) // 3))
    res = run_cli("train", "--data", dataset, "--out", out, *TRAIN, "--resume")
    one_line_error(res, "last.pt")


def test_flipped_bytes_in_cache_entries_are_decoded_again(dataset, tmp_path, caplog):
    """A damaged cache entry (pixels, header, trailer) is reported with a warning, decoded again from its source
    file and rewritten: the pixels equal a fresh decode."""
    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.imaging.pixels import model_pixels

    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    ds = read_dataset(copy)
    rows = ds.rows("train").iloc[:3]
    spec = PreprocessSpec.for_size(32)
    cache = ds.cache()
    assert cache is not None
    entries = [cache.entry_path(sha) for sha in rows["sha256"]]
    for entry, where in zip(entries, ("pixels", "header", "trailer")):
        data = entry.read_bytes()
        at = {"pixels": len(data) // 2, "header": 20, "trailer": len(data) - 2}[where]
        entry.write_bytes(_flip(data, at))
    fresh = model_pixels(rows["path"].tolist(), spec, workers=1)
    with caplog.at_level(logging.WARNING, logger="covid_cxr.imaging.cache"):
        got = ds.pixels(rows, spec, workers=1)
    np.testing.assert_array_equal(got, fresh)
    assert caplog.text.count("damaged image cache entry") == 3
    assert all(cache.get(sha) is not None for sha in rows["sha256"])  # rewritten whole


def test_a_source_image_deleted_after_the_build_is_named(dataset, tmp_path, capsys):
    """Deleted and not in the cache: the error names the file. The whole source folder gone: it names the source,
    where it was looked for, and --source-root. (With the image in the dataset's cache, training needs no file.)"""
    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.data.manifest import build

    src = tmp_path / "phantoms"
    shutil.copytree(dataset.parent / "synthetic-phantoms", src)
    data = tmp_path / "dataset"
    build(DataConfig(sources=(("folder", str(src)),), out=str(data), test_per_class=2, val_fraction=0.2,
                     train_size=200, seed=0, workers=1, progress=False, dedup=False, cache=False))
    victim = Path(read_dataset(data).rows("train")["path"].iloc[0])
    victim.unlink()
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(victim) in err and "file not found" in err, err
    shutil.move(src, tmp_path / "moved")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"source '{src.name}'" in err and f"--source-root {src.name}=PATH" in err, err
    assert main(argv + ["--source-root", f"{src.name}={tmp_path / 'moved'}"]) == 2  # re-pointed: still that file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and victim.name in err and "file not found" in err, err
    assert not (tmp_path / "run" / "last.pt").exists()
