"""An ASGI app served by uvicorn on 127.0.0.1 at a free port, in a daemon thread (browser and fault tests)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serve_in_thread(app, timeout: float = 30.0, **options) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (``http://127.0.0.1:PORT``). ``options`` go to
    ``uvicorn.Config`` (e.g. the proxy-header settings of ``covid_cxr.deploy.serve.uvicorn_options``)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # uvicorn serves this socket: no window for another process to take the port
    port = sock.getsockname()[1]
    # log_config=None: uvicorn leaves logging alone, so its records reach the root logger (and pytest's caplog)
    server = uvicorn.Server(uvicorn.Config(app, **{"log_config": None, "log_level": "info", "access_log": False,
                                                   **options}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
