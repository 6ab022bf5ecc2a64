"""``covid-cxr data build`` at scale: the 1,255 real images, and 20,000 and 100,000 synthetic ones.

    nice -n 5 .venv/bin/python benchmarks/bench_build.py                # everything (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_build.py --sizes 2000 --workers 2 --no-real   # a quick look

For each collection and worker count it runs ``python -m covid_cxr.cli data build`` as a subprocess
into a new folder and reports: images/s end to end (files found by the source readers / wall time,
including decoding, hashing, fingerprints, the cache, the near-duplicate search, splits, the card and
the swap), the peak memory of the whole process tree (the build, its fork server and workers, sampled
every 0.1 s from /proc: the sum of resident sizes, and the sum of proportional set sizes, which counts a page
shared by several processes once), the duplicate-search time and pairs found (from ingest_report.json), and the
load average while it ran. Then:

* a re-run into the same folder (every image has a finished cache record: nothing is decoded);
* at the smallest synthetic size, a build killed with SIGKILL half-way through decoding, and the
  re-run that resumes it (how many images it decoded).

Synthetic collections (a folder source ``synthetic-N/{covid,normal}/``, README says SYNTHETIC) are
made of cheap chest-like procedural images (two lung fields of random size and position in a body,
random blobs and grain) at 96-128 px, and 2% near-duplicates of other images in the collection: JPEG
re-encodes, rescales, centre crops of 5%, brightness +12, each in the same class folder. They are
generated once into --work (reused on later runs) with all cores.

Targets on a 2-core machine: >= 400 images/s at 20k; peak RSS <= 2 GB at 100k; duplicate search at
100k < 60 s. Not a test: numbers depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REAL_SOURCES = {"cohen": "cohen-covid-chestxray-dataset", "actualmed": "actualmed-covid-chestxray-dataset",
                "figure1": "figure1-covid-chestxray-dataset", "radiography": "covid19-radiography-database",
                "mooney": "chest-xray-pneumonia"}
COPY_SHARE = 0.02


# ----------------------------------------------------------------------------- synthetic collections


def _chest(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    body = np.exp(-((xx - 0.5) / rng.uniform(0.35, 0.5)) ** 4)
    img = 40 + 170 * body - rng.uniform(10, 50) * yy
    for cx in (rng.uniform(0.25, 0.38), rng.uniform(0.62, 0.75)):
        sx, sy, cy = rng.uniform(0.08, 0.16), rng.uniform(0.18, 0.32), rng.uniform(0.4, 0.55)
        img -= rng.uniform(60, 130) * np.exp(-((xx - cx) / sx) ** 2 - ((yy - cy) / sy) ** 2)
    for _ in range(rng.integers(4, 10)):  # opacities, ribs, devices: what makes each radiograph its own
        cx, cy, s = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.02, 0.12)
        img += rng.uniform(-60, 60) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    img += rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _copy_of(image: np.ndarray, kind: int) -> tuple[np.ndarray, str]:
    h, w = image.shape
    if kind == 0:
        return image, "jpg"
    if kind == 1:
        return np.asarray(Image.fromarray(image).resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR)), "png"
    if kind == 2:
        dy, dx = round(h * 0.025), round(w * 0.025)
        return image[dy:h - dy, dx:w - dx], "png"
    return np.clip(image.astype(np.int16) + 12, 0, 255).astype(np.uint8), "png"


def _write_range(args: tuple[Path, int, int, int, int]) -> int:
    root, start, stop, n, seed = args
    for k in range(start, stop):
        label = "covid" if k % 2 else "normal"
        n_orig = n - int(n * COPY_SHARE)
        if k >= n_orig:  # a copy of an original of the same class
            src = (k - n_orig) * 7919 % n_orig
            src = src if src % 2 == k % 2 else (src + 1) % n_orig
            rng = np.random.default_rng((seed, src))
            h, w = 128, int(rng.integers(96, 129))
            image, ext = _copy_of(_chest(rng, h, w), k % 4)
        else:
            rng = np.random.default_rng((seed, k))
            h, w = 128, int(rng.integers(96, 129))
            image, ext = _chest(rng, h, w), "png"
        path = root / label / f"img-{k:06d}.{ext}"
        Image.fromarray(image).save(path, quality=80) if ext == "jpg" else Image.fromarray(image).save(path,
                                                                                                     compress_level=1)
    return stop - start


def synthetic_source(work: Path, n: int, seed: int = 0) -> Path:
    """A folder source of ``n`` synthetic images (made once; a DONE marker says it is complete)."""
    root = work / f"synthetic-{n}"
    if (root / "DONE").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for label in ("covid", "normal"):
        (root / label).mkdir(parents=True)
    (root / "README.txt").write_text("SYNTHETIC procedural chest-like images for benchmarks/bench_build.py\n")
    step = 500
    jobs = [(root, s, min(s + step, n), n, seed) for s in range(0, n, step)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        assert sum(pool.map(_write_range, jobs)) == n
    (root / "DONE").write_text("")
    print(f"generated {n} synthetic images in {time.perf_counter() - t0:.1f} s at {root}", flush=True)
    return root


# ----------------------------------------------------------------------------- measuring a build


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """(sum of resident sizes, sum of proportional set sizes) of ``pids``, in bytes. RSS counts a page shared by
    several processes once per process; PSS splits it among them (what the tree really occupies)."""
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def run_build(sources: list[tuple[str, Path]], out: Path, workers: int, kill_after_records: int | None = None
              ) -> dict:
    cmd = [sys.executable, "-m", "covid_cxr.cli", "data", "build", "--out", str(out), "--workers", str(workers),
           "--no-progress", "--test-per-class", "100"]
    for name, path in sources:
        cmd += ["--source", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    peak = peak_pss = 0
    killed = False
    records = out.parent / f".{out.name}.staging" / "cache" / "records"
    while proc.poll() is None:
        rss, pss = _memory(_tree(proc.pid))
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        if kill_after_records is not None and not killed and records.is_dir():
            if sum(len(files) for _, _, files in os.walk(records)) >= kill_after_records:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    result = {"wall": wall, "peak_rss": peak, "peak_pss": peak_pss, "rc": proc.returncode,
              "load": (load0, os.getloadavg()), "killed": killed}
    if killed:
        time.sleep(1.0)
        result["survivors"] = [p for p in _tree(proc.pid) if p != proc.pid]
        return result
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{output[-3000:]}")
    report = json.loads((out / "ingest_report.json").read_text())
    result.update(report["build"])
    result["in_manifest"] = report["images_in_manifest"]
    result["pairs"] = report["near_duplicates"]["pairs"]
    return result


def _line(name: str, workers: int, what: str, r: dict) -> str:
    if r.get("killed"):
        return (f"{name:<14}{workers:>3}  {what:<22} killed after {r['wall']:.1f} s; worker processes left: "
                f"{len(r['survivors'])}")
    n = r["files"]
    return (f"{name:<14}{workers:>3}  {what:<22}{n:>8}{r['wall']:>9.1f}{n / r['wall']:>10.0f}"
            f"{r['peak_rss'] / 2**20:>10.0f}{r['peak_pss'] / 2**20:>10.0f}{r['decoded']:>9}"
            f"{r.get('duplicate_search_seconds', float('nan')):>9.1f}"
            f"{r['pairs']:>7}   {r['load'][0][0]:.2f} -> {r['load'][1][0]:.2f}")


def machine_header() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (f"machine: {cpu}; {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable, "
            f"{int(mem) / 2**20:.0f} GiB RAM; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"python {platform.python_version()}, numpy {np.__version__}, Pillow {Image.__version__}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    p.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work", type=Path, default=Path("/tmp/covid-cxr-bench-build"),
                   help="folder for the synthetic collections and the datasets built")
    p.add_argument("--no-real", action="store_true", help="skip the 1,255 real images")
    p.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume measurement")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine_header(), flush=True)
    collections = []
    if not args.no_real and (args.data_root / "sources").is_dir():
        collections.append(("real-1255", [(n, args.data_root / "sources" / f) for n, f in REAL_SOURCES.items()]))
    for n in args.sizes:
        collections.append((f"synthetic-{n // 1000}k", [("folder", synthetic_source(args.work, n))]))
    print(f"{'collection':<14}{'w':>3}  {'run':<22}{'images':>8}{'wall s':>9}{'img/s':>10}{'RSS MB':>10}{'PSS MB':>10}"
          f"{'decoded':>9}{'dup s':>9}{'pairs':>7}   load 1-min (start -> end)", flush=True)
    for name, sources in collections:
        for w in args.workers:
            out = args.work / "datasets" / f"{name}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.parent / f".{out.name}.staging", ignore_errors=True)
            print(_line(name, w, "first build", run_build(sources, out, w)), flush=True)
        print(_line(name, w, "re-run (all cached)", run_build(sources, out, w)), flush=True)
    if not args.no_resume and args.sizes:
        n = min(args.sizes)
        name, sources = next(c for c in collections if c[0] == f"synthetic-{n // 1000}k")
        out = args.work / "datasets" / f"{name}-resume"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.staging", ignore_errors=True)
        w = max(args.workers)
        print(_line(name, w, "killed half-way", run_build(sources, out, w, kill_after_records=n // 2)), flush=True)
        print(_line(name, w, "resumed", run_build(sources, out, w)), flush=True)


if __name__ == "__main__":
    main()
