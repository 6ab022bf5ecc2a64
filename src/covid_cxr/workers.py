"""Worker processes that never outlive the command that started them.

:func:`run_batches` spreads batches of work over a process pool with a bounded number in flight. Its
workers die with their parent however it ends, even by ``kill -9`` (``PR_SET_PDEATHSIG`` on Linux, a
watchdog thread elsewhere), and ignore Ctrl-C, which reaches the whole process group: the parent
handles it by stopping them. The pool is shut down on every exit path, so a killed or interrupted
``covid-cxr data build`` leaves no process behind.

A pool for a command that already holds a large table its workers do not need (the near-duplicate search of a
100,000-image build holds ~0.6 GB of fingerprints) is started ``fresh``: its workers come from a *fork server*
(Linux, macOS) instead of being forked from the command, which would hand each worker a copy-on-write image of that
table that reference counting gradually copies and that every worker's resident size counts again. Other pools are
forked (quick to start). Tasks and their data reach the workers pickled either way, so results never depend on it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _die_with_parent(command: int) -> None:
    """Pool initializer: this worker ends when the command that started the pool ends, however it ends (even
    kill -9). Its direct parent is the fork server (or the command itself): the death signal covers that one,
    the watchdog thread the command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the command decides
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent or not _alive(command):  # a parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent and _alive(command):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="covid-cxr-parent-watch").start()


def _context(fresh: bool) -> multiprocessing.context.BaseContext:
    """``fresh``: the fork server where there is one (see the module's docstring); else the platform's default."""
    if fresh and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported what they run, so each starts in milliseconds.
        ctx.set_forkserver_preload(["covid_cxr.data.dedup", "covid_cxr.data.hamming"])  # what fresh pools run
        return ctx
    return multiprocessing.get_context()


def _stop(pool: ProcessPoolExecutor, clean: bool) -> None:
    """Shut the pool down; after an error or an interrupt, end its processes at once rather than wait.

    After an interrupt the pool's manager thread is given a bounded time to end: left running, it races the
    interpreter's exit handler (CPython's ``concurrent.futures`` writes to a wake-up pipe the thread may have
    closed), which prints an "Exception ignored ... Bad file descriptor" traceback after Ctrl-C. Nothing here waits
    without a bound."""
    if clean:
        pool.shutdown(wait=True)
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    results = getattr(pool, "_result_queue", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if manager is None:
        return
    manager.join(timeout=1)  # usually it sees the workers gone, fails what was pending and ends
    if manager.is_alive() and results is not None:
        # A worker ended in the middle of sending a result larger than the pipe holds: the manager thread waits in
        # recv() for the rest, and since this process holds the pipe's write end too, no end of file ever comes
        # (the interpreter's exit would then join that thread forever). With the workers gone, closing our write
        # end is what ends the wait: recv() fails, the thread treats the pool as broken and ends.
        writer = getattr(results, "_writer", None)
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
    manager.join(timeout=10)
    if manager.is_alive():  # pragma: no cover - no known way here; say so rather than hang without a word
        log.warning("a worker pool's manager thread did not end; the command may wait for it on exit")


def make_pool(workers: int, fresh: bool = False) -> ProcessPoolExecutor:
    """A process pool whose workers die with this process and leave Ctrl-C to it; ``fresh``: started from the fork
    server (see the module's docstring)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(fresh), initializer=_die_with_parent,
                               initargs=(os.getpid(),))


def run_batches(fn: Callable, items: Sequence, workers: int, batch: int = 32, on_done: Callable | None = None,
                fresh: bool = False):
    """Yield ``fn(items[k:k + batch])`` for consecutive batches, in order, computed by ``workers`` processes.

    A batch is sliced from ``items`` only when it is submitted and at most ``3 * workers`` are in flight, so a
    lazy ``items`` (whose slices build the work) keeps memory bounded. The pool is shut down on every exit path.
    """
    n_batches = -(-len(items) // batch)
    if workers <= 1 or n_batches <= 1:
        for k in range(n_batches):
            part = items[k * batch:(k + 1) * batch]
            out = fn(part)
            if on_done:
                on_done(len(part))
            yield out
        return
    pool = make_pool(min(workers, n_batches), fresh)
    clean = False
    try:
        pending: dict[int, tuple] = {}
        results: dict[int, object] = {}
        nxt = emitted = 0
        while emitted < n_batches:
            while nxt < n_batches and len(pending) < 3 * workers:
                part = items[nxt * batch:(nxt + 1) * batch]
                pending[nxt] = (pool.submit(fn, part), len(part))
                nxt += 1
            done, _ = wait([f for f, _ in pending.values()], return_when=FIRST_COMPLETED)
            for k in [k for k, (f, _) in pending.items() if f in done]:
                fut, size = pending.pop(k)
                results[k] = fut.result()
                if on_done:
                    on_done(size)
            while emitted in results:
                yield results.pop(emitted)
                emitted += 1
        clean = True
    finally:
        _stop(pool, clean)
