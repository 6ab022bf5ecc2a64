"""Fault-injection hook for the ``covid-cxr`` subprocesses of tests/test_faults.py (imported at interpreter start
because tests put this folder on PYTHONPATH; never installed, never imported by the package).

With ``COVID_CXR_TEST_STOP_BEFORE_RENAME=NAME`` set, the process stops itself (SIGSTOP) when an atomic write of a
file called NAME has written its temporary file in full and is about to rename it over NAME. The test then sends a
real ``kill -9``: the kill lands inside the write, every time, however loaded the machine (polling for a temporary
file that exists for a few milliseconds does not).
"""

import os
import signal

_NAME = os.environ.get("COVID_CXR_TEST_STOP_BEFORE_RENAME")  # conftest.STOP_BEFORE_RENAME

if _NAME:
    _replace = os.replace

    def _stopping_replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == _NAME and os.path.basename(os.fspath(src)).startswith(f".{_NAME}"):
            os.kill(os.getpid(), signal.SIGSTOP)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _stopping_replace
