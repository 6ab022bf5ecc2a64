"""HTTP benchmark of ``covid-cxr serve``: end-to-end latency and throughput of ``POST /v1/predict``.

Serves a checkpoint (an untrained DenseNet-121 at 224 px unless ``--run``) with uvicorn on
127.0.0.1 in this process, once per backend, and sends one image over real HTTP with httpx:
sequential requests (p50/p95 latency), ``--clients`` concurrent clients (images/s), and
requests with ``?heatmap=true``. Times cover the whole request: upload, sniffing, decoding,
preprocessing, the forward pass, JSON (and the Grad-CAM overlay PNG). The clients run in the
same process as the server, so on few cores they take a little CPU from it.

Usage::

    .venv/bin/python benchmarks/bench_http.py [--run RUN] [--image FILE] [--backends torch onnx]
        [--workers 2] [--clients 1 2 4] [--seconds 10]

This is a script, not a test; it writes only to a temporary folder. Network traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from covid_cxr.model import build_model, resolve_checkpoint, save_checkpoint
from covid_cxr.serve import create_app
from covid_cxr.transforms import PreprocessSpec


def synthetic_png(size: int = 1024, seed: int = 0) -> bytes:
    """A chest-X-ray-sized 8-bit grayscale PNG with smooth structure and noise (compresses like a radiograph)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 110 + 70 * np.sin(6 * xx) * np.cos(5 * yy) + rng.normal(0, 12, (size, size))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def timed_requests(url: str, data: bytes, name: str, seconds: float, min_calls: int,
                   heatmap: bool = False) -> list[float]:
    """Sequential request latencies (s) over one keep-alive connection."""
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        def call() -> None:
            r = client.post(f"/v1/predict?heatmap={str(heatmap).lower()}", files={"file": (name, data)})
            r.raise_for_status()

        call()  # warm-up
        start = time.perf_counter()
        while len(out) < min_calls or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)
    return out


def throughput(url: str, data: bytes, name: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Images/s and latencies with ``clients`` threads each sending requests back to back."""
    stop = time.perf_counter() + seconds
    counts: list[list[float]] = [[] for _ in range(clients)]

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.post("/v1/predict", files={"file": (name, data)}).raise_for_status()
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                client.post("/v1/predict", files={"file": (name, data)}).raise_for_status()
                counts[i].append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    elapsed = time.perf_counter() - start
    lat = [x for c in counts for x in c]
    return len(lat) / elapsed, lat


def p(lat: list[float], q: float) -> float:
    s = sorted(lat)
    return 1000 * s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run folder or checkpoint (default: an untrained DenseNet-121 at 224 px)")
    ap.add_argument("--image", help="image to send (default: a synthetic 1024x1024 PNG)")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    ap.add_argument("--workers", type=int, default=2, help="server inference threads (default 2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent clients (default 1 2 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    ap.add_argument("--min-calls", type=int, default=10, help="at least this many sequential calls (default 10)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-http-") as work:
        work = Path(work)
        if args.run:
            ckpt = resolve_checkpoint(args.run)
            run = work / "run"  # the onnx backend exports beside the checkpoint: keep that out of the user's run
            run.mkdir()
            os.symlink(ckpt.resolve(), run / "best.pt")
        else:
            run = work / "run"
            run.mkdir()
            torch.manual_seed(0)
            save_checkpoint(run / "best.pt", build_model(["normal", "covid"], weights=None), ["normal", "covid"],
                            PreprocessSpec.for_size(224), {"note": "untrained, for benchmarking"})
        data = Path(args.image).read_bytes() if args.image else synthetic_png()
        name = Path(args.image).name if args.image else "synthetic.png"
        with Image.open(io.BytesIO(data)) as im:
            shape = f"{im.width}x{im.height} {im.mode}"
        print(f"# covid-cxr serve HTTP benchmark: {platform.node()}, {os.cpu_count()} CPUs "
              f"({len(os.sched_getaffinity(0))} usable), torch {torch.__version__} ({torch.get_num_threads()} threads)")
        print(f"# image {name}: {shape}, {len(data) / 1e6:.2f} MB; server workers={args.workers}; "
              f"{args.seconds:g} s per row")
        print(f"{'backend':8} {'mode':16} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'n':>5}")
        for backend in args.backends:
            t0 = time.perf_counter()
            app = create_app(str(run), backend=backend, workers=args.workers, device="cpu")
            print(f"# {backend}: app ready in {time.perf_counter() - t0:.1f} s (includes the ONNX export the first time)")
            with LiveServer(app) as srv:
                lat = timed_requests(srv.url, data, name, args.seconds, args.min_calls)
                print(f"{backend:8} {'sequential':16} {len(lat) / sum(lat):7.2f} {p(lat, .5):8.1f} {p(lat, .95):8.1f} "
                      f"{len(lat):5d}")
                for clients in args.clients:
                    rate, lat = throughput(srv.url, data, name, clients, args.seconds)
                    print(f"{backend:8} {f'{clients} clients':16} {rate:7.2f} {p(lat, .5):8.1f} {p(lat, .95):8.1f} "
                          f"{len(lat):5d}")
                lat = timed_requests(srv.url, data, name, args.seconds, max(3, args.min_calls // 3), heatmap=True)
                print(f"{backend:8} {'heatmap, seq.':16} {len(lat) / sum(lat):7.2f} {p(lat, .5):8.1f} "
                      f"{p(lat, .95):8.1f} {len(lat):5d}")
        print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; median is p50")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
