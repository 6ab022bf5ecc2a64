"""Worker processes that never outlive the command that started them.

:func:`run_batches` spreads batches of work over a process pool with a bounded number in flight. Its
workers die with their parent however it ends, even by ``kill -9`` (``PR_SET_PDEATHSIG`` on Linux, a
watchdog thread elsewhere), and ignore Ctrl-C, which reaches the whole process group: the parent
handles it by stopping them. The pool is shut down on every exit path, so a killed or interrupted
``covid-cxr data build`` leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence


def _die_with_parent(parent: int) -> None:
    """Pool initializer: this worker ends when the build process ends, however it ends (even kill -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    done = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            done = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            done = False
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not done:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="covid-cxr-parent-watch").start()


def _stop(pool: ProcessPoolExecutor, clean: bool) -> None:
    """Shut the pool down; after an error or an interrupt, end its processes at once rather than wait."""
    if clean:
        pool.shutdown(wait=True)
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def make_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with this process and leave Ctrl-C to it."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))


def run_batches(fn: Callable, items: Sequence, workers: int, batch: int = 32, on_done: Callable | None = None):
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
    pool = make_pool(min(workers, n_batches))
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
