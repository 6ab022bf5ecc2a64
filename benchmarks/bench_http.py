"""HTTP benchmark of ``covid-cxr serve``: latency and throughput of ``POST /v1/predict``, and a bounded soak.

Default mode: serves a checkpoint (an untrained DenseNet-121 at 224 px unless ``--run``) with uvicorn on
127.0.0.1 in this process, once per backend, and sends one image over real HTTP with httpx: sequential
requests (p50/p95 latency), ``--clients`` concurrent clients (images/s), and requests with
``?heatmap=true``. Times cover the whole request: upload, sniffing, decoding, preprocessing, the
forward pass, JSON (and the Grad-CAM overlay PNG).

``--soak SECONDS``: starts the real server as a subprocess (``python -m covid_cxr.cli serve``, its log
to a file) and runs ``--soak-clients`` (32) asyncio clients for that long, each sending a weighted mix
of requests: valid uploads (PNG, JPEG, DICOM), invalid ones (truncated, not an image, no ``file``
field, broken multipart, over the size limit), heatmaps (a normal image, and a 10 x 5000 one that
must get a clear 422), slow uploads (stalled, trickling: 408) and clients that hang up mid-upload.
It reports statuses by kind, p50/p95 latency by kind, the server's RSS after a warm-up under the same
load (``--soak-warmup``, 30 s) and at the end,
and scans the server log for tracebacks. Targets: no unexpected status (a 5xx other than 503 with
Retry-After, or a status the kind should not get), RSS growth <= 5 %, no traceback. Exit status 1
when a target is missed.

Usage::

    .venv/bin/python benchmarks/bench_http.py [--run RUN] [--image FILE] [--backends torch onnx]
        [--concurrency 2] [--clients 1 2 4] [--seconds 10]
    .venv/bin/python benchmarks/bench_http.py --soak 120 [--soak-clients 32] [--run RUN]

This is a script, not a test; it writes only to a temporary folder. All traffic stays on 127.0.0.1,
and every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

BOUNDARY = "soakb0undary"


def synthetic_png(size: int = 1024, seed: int = 0, shape: tuple[int, int] | None = None) -> bytes:
    """A chest-X-ray-sized 8-bit grayscale PNG with smooth structure and noise (compresses like a radiograph)."""
    rng = np.random.default_rng(seed)
    h, w = shape or (size, size)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 110 + 70 * np.sin(6 * xx) * np.cos(5 * yy) + rng.normal(0, 12, (h, w))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def synthetic_jpeg(size: int = 768, seed: int = 1) -> bytes:
    buf = io.BytesIO()
    with Image.open(io.BytesIO(synthetic_png(size, seed))) as img:
        img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_dicom(size: int = 512, seed: int = 2) -> bytes:
    """A 12-bit MONOCHROME2 CR DICOM (synthetic pixels, no patient data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    with Image.open(io.BytesIO(synthetic_png(size, seed))) as img:
        pixels = np.asarray(img).astype(np.uint16) * 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_run(work: Path, run: str | None) -> Path:
    """A run folder to serve: a link to ``run``'s checkpoint, or an untrained DenseNet-121 at 224 px."""
    import torch

    from covid_cxr.imaging.pixels import PreprocessSpec
    from covid_cxr.model.checkpoint import new_meta, save_checkpoint
    from covid_cxr.model.networks import build_model
    from covid_cxr.paths import locate_checkpoint

    folder = work / "run"  # the onnx backend exports beside the checkpoint: keep that out of the user's run
    folder.mkdir()
    if run:
        os.symlink(locate_checkpoint(run)[1].resolve(), folder / "best.pt")
        return folder
    torch.manual_seed(0)
    labels = ("normal", "covid")
    meta = new_meta("densenet121", labels, "covid", PreprocessSpec.for_size(224), {"note": "untrained, benchmark"},
                    None)
    save_checkpoint(folder / "best.pt", build_model(labels, weights=None), meta)
    return folder


def machine_line() -> str:
    return (f"{platform.node()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# ----------------------------------------------------------------------------- latency and throughput


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

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


def latency_benchmark(args, run: Path) -> int:
    import torch

    from covid_cxr.deploy.serve import create_app

    data = Path(args.image).read_bytes() if args.image else synthetic_png()
    name = Path(args.image).name if args.image else "synthetic.png"
    with Image.open(io.BytesIO(data)) as im:
        shape = f"{im.width}x{im.height} {im.mode}"
    print(f"# covid-cxr serve HTTP benchmark: {machine_line()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"# image {name}: {shape}, {len(data) / 1e6:.2f} MB; server concurrency={args.concurrency}; "
          f"{args.seconds:g} s per row")
    print(f"{'backend':8} {'mode':16} {'img/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'n':>5}")
    for backend in args.backends:
        t0 = time.perf_counter()
        app = create_app(str(run), backend=backend, concurrency=args.concurrency, device="cpu")
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


# ----------------------------------------------------------------------------- soak


def multipart(payload: bytes, field: str = "file", filename: str = "image") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


class Mix:
    """The request kinds of the soak: name -> (weight, expected statuses)."""

    WEIGHTS = {"valid": 55, "invalid": 20, "heatmap": 10, "slow": 10, "disconnect": 5}

    def __init__(self, max_upload_mb: float, kinds: list[str] | None = None):
        png = synthetic_png()
        self.bodies = {
            "valid": [multipart(png), multipart(synthetic_jpeg()), multipart(synthetic_dicom())],
            "invalid": [multipart(png[: len(png) // 3]),  # truncated PNG: 422
                        multipart(b"just some text, not an X-ray\n" * 40),  # 415
                        multipart(png, field="image"),  # no 'file' field: 422
                        multipart(png).replace(f"--{BOUNDARY}--".encode(), b"--broken\r\n")[:-200]
                        + b"\r\n--" + BOUNDARY.encode() + b"X--\r\n",  # broken multipart: 400/422
                        multipart(os.urandom(int((max_upload_mb + 0.5) * 2**20)))],  # too large: 413
            "heatmap": [multipart(png), multipart(synthetic_png(shape=(10, 5000)))],  # 200 / 422
            "slow": [multipart(png)],
            "disconnect": [multipart(png)],
        }
        self.weights = {k: w for k, w in self.WEIGHTS.items() if not kinds or k in kinds}
        self.expected = {"valid": {200}, "invalid": {400, 413, 415, 422}, "heatmap": {200, 422},
                         "slow": {408}, "disconnect": {"hung up"}}

    def pick(self, rng: random.Random) -> tuple[str, bytes]:
        kind = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        return kind, rng.choice(self.bodies[kind])


def request_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def read_status(reader: asyncio.StreamReader, timeout: float) -> int | str:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return "no answer"
    m = re.match(rb"HTTP/1\.1 (\d{3})", line)
    return int(m.group(1)) if m else "connection closed"


async def raw_request(port: int, body: bytes, kind: str, rng: random.Random, idle_timeout: float) -> int | str:
    """A slow or vanishing client over a raw socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_head("/v1/predict", len(body)) + body[:2048])
        await writer.drain()
        if kind == "disconnect":
            await asyncio.sleep(rng.uniform(0.01, 0.2))
            return "hung up"
        if rng.random() < 0.5:  # stall: send nothing more
            return await read_status(reader, idle_timeout + 30)
        sent = 2048  # trickle: a little, often enough never to be idle, until the total deadline
        while sent < len(body):
            writer.write(body[sent:sent + 64])
            sent += 64
            try:
                await writer.drain()
            except ConnectionError:
                break
            status = await read_status(reader, idle_timeout / 4)
            if status != "no answer":
                return status
        return await read_status(reader, 30)
    except ConnectionError:
        return "connection reset"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def soak_client(i: int, port: int, mix: Mix, stop: float, results: list, idle_timeout: float) -> None:
    rng = random.Random(1000 + i)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=180) as client:
        while time.monotonic() < stop:
            kind, body = mix.pick(rng)
            path = "/v1/predict?heatmap=true" if kind == "heatmap" else "/v1/predict"
            t0 = time.perf_counter()
            retry_after = None
            if kind in ("slow", "disconnect"):
                status = await raw_request(port, body, kind, rng, idle_timeout)
            else:
                try:
                    r = await client.post(path, content=body,
                                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                except httpx.HTTPError as exc:
                    status = f"client error {type(exc).__name__}"
            results.append((kind, status, time.perf_counter() - t0, retry_after))
            if status in (429, 503) and retry_after:
                await asyncio.sleep(min(float(retry_after), 5.0))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(run: Path, log_path: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "covid_cxr.cli", "serve", "--run", str(run), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--concurrency", str(args.concurrency), "--max-upload-mb", str(args.max_upload_mb),
           "--idle-timeout", str(args.idle_timeout), "--upload-timeout", str(args.upload_timeout)]
    log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")


def soak(args, run: Path, work: Path) -> int:
    mix = Mix(args.max_upload_mb, args.soak_kinds)
    log_path = work / "server.log"
    proc, port = start_server(run, log_path, args)
    print(f"# covid-cxr serve soak: {args.soak:g} s, {args.soak_clients} clients, server pid {proc.pid} "
          f"(concurrency {args.concurrency}, idle timeout {args.idle_timeout:g} s, upload timeout "
          f"{args.upload_timeout:g} s, limit {args.max_upload_mb:g} MB)")
    print(f"# machine: {machine_line()} (at start)")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:  # warm-up: every lazy load
            ctype = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
            for body in mix.bodies["valid"]:
                c.post("/v1/predict", content=body, headers=ctype).raise_for_status()
            c.post("/v1/predict?heatmap=true", content=mix.bodies["heatmap"][0], headers=ctype).raise_for_status()

        async def phase(seconds: float, results: list, samples: list) -> None:
            stop = time.monotonic() + seconds
            clients = [soak_client(i, port, mix, stop, results, args.idle_timeout) for i in range(args.soak_clients)]

            async def sample() -> None:
                while time.monotonic() < stop:
                    await asyncio.sleep(5)
                    samples.append(rss_mb(proc.pid))

            await asyncio.gather(sample(), *clients)

        # Warm-up under the same load: thread pools, allocator arenas and caches reach their working size, so what
        # grows after this is what the soak is looking for (a leak), not the server settling.
        asyncio.run(phase(args.soak_warmup, [], []))
        time.sleep(3)
        rss_start = rss_mb(proc.pid)
        samples = [rss_start]
        results: list = []

        t0 = time.perf_counter()
        asyncio.run(phase(args.soak, results, samples))
        elapsed = time.perf_counter() - t0
        time.sleep(3)  # let the last hang-ups and timeouts land
        rss_end = rss_mb(proc.pid)
        load = os.getloadavg()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return soak_report(mix, results, elapsed, rss_start, rss_end, samples, load, log_path.read_text(errors="replace"))


def soak_report(mix: Mix, results: list, elapsed: float, rss_start: float, rss_end: float, samples: list[float],
                load: tuple, server_log: str) -> int:
    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, latency, retry_after in results:
        by_kind[kind].append((status, latency, retry_after))
    unexpected = Counter()
    print(f"# {len(results)} requests in {elapsed:.0f} s ({len(results) / elapsed:.1f}/s); busy = 503 with Retry-After")
    print(f"{'kind':11} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'busy':>5} {'unexp.':>6}  statuses")
    for kind in mix.weights:
        rows = by_kind.get(kind, [])
        if not rows:
            continue
        statuses = Counter(s for s, _, _ in rows)
        if kind == "slow" and os.environ.get("SOAK_DEBUG"):
            print(sorted(round(lat, 1) for _, lat, _ in rows))
        busy = sum(1 for s, _, ra in rows if s == 503 and ra)
        bad = sum(n for s, n in statuses.items() if s not in mix.expected[kind] and not (s == 503 and busy))
        unexpected[kind] = bad
        done = [lat for s, lat, _ in rows if s != 503]
        print(f"{kind:11} {len(rows):5d} {p(done, .5) if done else float('nan'):8.0f} "
              f"{p(done, .95) if done else float('nan'):8.0f} {busy:5d} {bad:6d}  "
              + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=lambda x: str(x[0]))))
    tracebacks = server_log.count("Traceback (most recent call last)")
    asgi = server_log.count("Exception in ASGI application")
    errors = len(re.findall(r"^\S+ ERROR ", server_log, flags=re.M))
    hangups = server_log.count("client disconnected during the upload")
    decoder_bugs = server_log.count("decoder bug")
    growth = 100 * (rss_end - rss_start) / rss_start
    print(f"# server RSS: {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB at the end ({growth:+.1f} %); "
          f"every 5 s: {' '.join(f'{x:.0f}' for x in samples)}")
    print(f"# server log: {len(server_log.splitlines())} lines, {tracebacks} tracebacks, {asgi} 'Exception in ASGI "
          f"application', {errors} ERROR lines, {hangups} one-line hang-up notes, {decoder_bugs} decoder bugs")
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in load)} (the machine is shared)")
    total_bad = sum(unexpected.values())
    fivexx = sum(1 for _, s, _, ra in results if isinstance(s, int) and s >= 500 and not (s == 503 and ra))
    checks = [(f"unexpected statuses: {total_bad} (5xx other than 503 + Retry-After: {fivexx})", total_bad == 0),
              (f"RSS growth {growth:+.1f} % <= 5 %", growth <= 5.0),
              (f"tracebacks in the server log: {tracebacks + asgi}", tracebacks + asgi == 0)]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0 if all(ok for _, ok in checks) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run folder or checkpoint (default: an untrained DenseNet-121 at 224 px)")
    ap.add_argument("--image", help="image to send (default: a synthetic 1024x1024 PNG)")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    ap.add_argument("--concurrency", type=int, default=2, help="server predictions at once (default 2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent clients (default 1 2 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    ap.add_argument("--min-calls", type=int, default=10, help="at least this many sequential calls (default 10)")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="run the soak for this long instead")
    ap.add_argument("--soak-clients", type=int, default=32, help="soak clients (default 32)")
    ap.add_argument("--soak-warmup", type=float, default=30, metavar="SECONDS",
                    help="the same load for this long before the starting RSS is taken (default 30)")
    ap.add_argument("--soak-kinds", nargs="+", choices=list(Mix.WEIGHTS),
                    help="only these kinds of request (to find which one costs what); default all")
    ap.add_argument("--max-upload-mb", type=float, default=2.0, help="soak server upload limit (default 2)")
    ap.add_argument("--idle-timeout", type=float, default=2.0, help="soak server idle timeout (default 2 s)")
    ap.add_argument("--upload-timeout", type=float, default=8.0, help="soak server upload timeout (default 8 s)")
    args = ap.parse_args(argv)
    if args.soak is not None and not 1 <= args.soak <= 3600:
        ap.error("--soak must be between 1 and 3600 seconds")
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-http-") as work:
        run = make_run(Path(work), args.run)
        if args.soak is not None:
            return soak(args, run, Path(work))
        return latency_benchmark(args, run)


if __name__ == "__main__":
    raise SystemExit(main())
