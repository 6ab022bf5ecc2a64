"""covid_cxr.workers: results in order, workers that never outlive the command, and workers that do not carry
the command's memory (a 100,000-image build holds ~0.6 GB of fingerprints when its duplicate search starts its
pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import covid_cxr
from covid_cxr.workers import make_pool, run_batches

SRC = Path(covid_cxr.__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_run_batches_returns_what_a_loop_returns_in_order() -> None:
    items = list(range(103))
    for workers in (1, 2):
        got = [x for part in run_batches(sorted, items[::-1], workers, batch=10) for x in part]
        want = [x for k in range(0, 103, 10) for x in sorted(items[::-1][k:k + 10])]
        assert got == want, workers


def test_fresh_workers_do_not_carry_the_commands_memory() -> None:
    """A fresh pool started after the command filled 400 MB: each worker's resident size stays far below it (a
    fork of the command would map all of it, and every worker's RSS would count it again)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read a worker's resident size")
    big = np.ones(400 * 2**20, dtype=np.uint8)  # touched: resident in this process
    assert _rss_mb(os.getpid()) > 400
    pool = make_pool(2, fresh=True)
    try:
        pids = {pool.submit(os.getpid).result(timeout=120) for _ in range(8)}
        assert os.getpid() not in pids
        sizes = [_rss_mb(pid) for pid in pids]
    finally:
        pool.shutdown()
    assert big[-1] == 1
    # memory, not time: a fresh worker is an interpreter with this package's imports (well under 250 MB); a fork of
    # this process would count the touched 400 MB again
    assert max(sizes) < 250, f"workers' RSS {sizes} MB: they carry the command's 400 MB"


@pytest.mark.parametrize("fresh", [False, True])
def test_workers_die_when_the_command_is_killed(tmp_path: Path, fresh: bool) -> None:
    """kill -9 of the command (not of its process group): its workers (and the fork server) end within seconds."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        import os
        from covid_cxr.workers import make_pool
        pool = make_pool(2, fresh={fresh})
        pids = {{pool.submit(os.getpid).result() for _ in range(6)}}
        print(" ".join(map(str, sorted(pids))), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=120), "the child never started its pool"
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and proc.pid not in pids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in pids if _running(p)]
        assert alive == [], f"workers {alive} outlived the killed command"
    finally:
        _end_group(proc)


def _end_group(proc: subprocess.Popen) -> None:
    """Kill a test's child and whatever is left of its process group."""
    if proc.poll() is None:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie waits for a parent that is gone or not reaping)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ctrl_c_reaches_it() -> None:
    """In the child before exec: Ctrl-C's default disposition, as in a terminal's foreground job. A suite launched as
    a background job of a shell without job control inherits SIGINT *ignored*, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # interrupts a pool sending 32 MB results: ~2 s
@pytest.mark.parametrize("fresh", [False, True])
def test_ctrl_c_while_workers_send_large_results_ends_the_command(fresh: bool) -> None:
    """Ctrl-C while workers are in the middle of sending results larger than a pipe holds (32 MB each here; a decode
    batch of large images is several MB): the command ends, with no traceback and no worker left. The bug: a worker
    stopped mid-send left the pool's manager thread waiting for the rest of the message forever (this process holds
    the pipe's write end too), and the interpreter's exit joined that thread: `data build` printed "interrupted" and
    never exited (CI, 180 s)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        import numpy as np
        from covid_cxr.workers import run_batches

        if __name__ == "__main__":
            try:
                for k, out in enumerate(run_batches(np.zeros, [4_000_000] * 10_000, 2, batch=1, fresh={fresh})):
                    if k == 3:
                        import faulthandler  # a hang prints every thread's stack and ends: the test shows where
                        faulthandler.dump_traceback_later(60, exit=True)
                        print("running", flush=True)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_ctrl_c_reaches_it)
    try:
        assert proc.stdout.readline().strip() == "running", proc.stderr.read()[-2000:]
        time.sleep(0.2)  # results are streaming: most of the time a worker is inside a send
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the whole group
        # Bound: workers._stop waits at most 5 + 5 s per worker, 1 + 10 s for the manager thread (31 s with 2
        # workers); it takes ~1 s on an idle 2-core machine. A hang (the bug) never ends.
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-2000:])
        assert err.strip().splitlines()[-1] == "interrupted"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a worker outlived the interrupted command")
    finally:
        _end_group(proc)
