"""Data-pipeline throughput on the real chest X-rays: decoding vs the preprocessed image cache,
one augmented DataLoader epoch, and how much of a CPU training step waits for data.

    .venv/bin/python benchmarks/bench_data.py --limit 400 --steps 5

Prints images/s for
  (a) decoding the original files and resizing them (``to_model_pixels(load_image(p))``),
  (b) loading the same model pixels from the cache (built first in a temporary folder),
  (c) one DataLoader epoch over ``StackDataset`` with training augmentation,
  (d) the share of a DenseNet-121 CPU training step spent waiting for the loader, with the
      loader fed from the cache-backed stack the way ``covid_cxr.train`` feeds it.
Targets: (b) >= 10x (a); data wait <= 10% of the step time.

Not a test: the numbers depend on the machine and on what else runs on it (the header says
which machine and its load).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_cxr.cache import ImageCache, default_workers, load_model_pixels
from covid_cxr.data import EpochSampler, StackDataset, worker_init
from covid_cxr.images import load_image, load_resized_stack, resize_uint8, to_model_pixels
from covid_cxr.model import build_model
from covid_cxr.train import loader_workers
from covid_cxr.transforms import AugmentSpec, PreprocessSpec

REPO = Path(__file__).resolve().parents[1]
LABELS = ["normal", "covid"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "cxr",
                   help="folder holding inventory.csv and sources/ (default: ../shared/data/cxr)")
    p.add_argument("--size", type=int, default=224, help="model input side in pixels")
    p.add_argument("--limit", type=int, default=None, help="use this many images (random, seeded); default all")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="decoding processes for building the cache and DataLoader workers for (c)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=None,
                   help="DataLoader workers in (d), one run per value (default: what covid_cxr.train uses on CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed training steps in (d)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache folder (default: a temporary folder, removed afterwards)")
    return p.parse_args(argv)


def machine_header() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        f"machine: {cpu}; {os.cpu_count()} logical cores, {usable} usable; load average {load}",
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op), numpy {np.__version__}, Pillow {PIL.__version__}",
    ])


def select_images(root: Path, limit: int | None, seed: int) -> pd.DataFrame:
    inv_path = root / "inventory.csv"
    if not inv_path.is_file():
        sys.exit(f"{inv_path} not found; pass --data-root (the folder holding inventory.csv and sources/)")
    inv = pd.read_csv(inv_path)
    if limit is not None and limit < len(inv):
        inv = inv.sample(limit, random_state=seed)
    inv = inv.drop_duplicates("sha256")
    return inv.assign(path=[str(root / p) for p in inv["relative_path"]])


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:9.1f} images/s ({n} in {seconds:.2f} s)"


def bench_decode(paths: list[str], size: int, base: int, workers: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    ref = np.stack([to_model_pixels(load_image(p), size, base) for p in paths])
    serial = time.perf_counter() - t0
    print(f"(a) decode originals + resize, 1 process:      {rate(len(paths), serial)}")
    if workers > 1:
        t0 = time.perf_counter()
        par = load_resized_stack(paths, size, base, workers=workers)
        print(f"    the same with {workers} processes:              {rate(len(paths), time.perf_counter() - t0)}")
        assert np.array_equal(par, ref)
    return len(paths) / serial, ref


def bench_cache(paths: list[str], shas: list[str], cache: ImageCache, size: int, ref: np.ndarray,
                decode_rate: float) -> np.ndarray:
    t0 = time.perf_counter()
    stage1 = [cache.get(s) for s in shas]
    get_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = load_model_pixels(paths, shas, size, cache.short_side, cache)
    load_s = time.perf_counter() - t0
    load_rate = len(paths) / load_s
    print(f"(b) load from cache + resize, 1 process:       {rate(len(paths), load_s)}   "
          f"= {load_rate / decode_rate:.0f}x (a)  [target >= 10x]")
    print(f"    of which reading entries (cache.get):      {rate(len(paths), get_s)}")
    identical = np.array_equal(images, ref)
    print(f"    pixels identical to (a):                   {identical}")
    if not identical:
        raise SystemExit("cached pixels differ from decoded pixels")
    bench_blob_alternative(stage1, size, get_s)
    return images


def bench_blob_alternative(stage1: list[np.ndarray], size: int, files_s: float) -> None:
    """The layout not chosen: every entry in one memory-mapped uint8 blob plus an offset index."""
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "s.u8"
        index, offset = [], 0
        with open(blob, "wb") as f:
            for a in stage1:
                f.write(a.tobytes())
                index.append((offset, a.shape))
                offset += a.size
        t0 = time.perf_counter()
        mm = np.memmap(blob, dtype=np.uint8, mode="r")
        loaded = [np.array(mm[o:o + h * w]).reshape(h, w) for o, (h, w) in index]
        get_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for a in loaded:
            resize_uint8(a, size)
        resize_s = time.perf_counter() - t0
        del mm
    n = len(stage1)
    print(f"    alternative, one memory-mapped blob:       {rate(n, get_s)} reading entries "
          f"({files_s / get_s:.1f}x files), {rate(n, get_s + resize_s)} with the resize")


def bench_epoch(images: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, batch_size: int, seed: int,
                workers: list[int]) -> None:
    ds = StackDataset(images, targets, spec, AugmentSpec(), seed=seed)
    threads = torch.get_num_threads()
    # (workers, intra-op threads of the main process): the 1-thread row shows the cost of running
    # tiny per-image ops on several threads when augmenting in the main process.
    runs = [(w, threads) for w in workers] + ([(0, 1)] if threads > 1 and 0 in workers else [])
    for w, t in runs:
        loader = DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(targets, seed), num_workers=w,
                            worker_init_fn=worker_init if w else None)
        torch.set_num_threads(t)
        try:
            t0 = time.perf_counter()
            n = sum(len(y) for _, y, _ in loader)
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        label = f"{w} workers" + (f", main process on {t} thread{'s' if t > 1 else ''}" if w == 0 else "")
        print(f"(c) augmented DataLoader epoch, {label + ':':<37}{rate(n, seconds)}")


def bench_train_step(images: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, workers: int, args) -> None:
    ds = StackDataset(images, targets, spec, AugmentSpec(), seed=args.seed)
    sampler = EpochSampler(targets, args.seed)
    # The loader covid_cxr.train builds (its _make_loader), minus pinning (CPU).
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                        worker_init_fn=worker_init if workers else None, persistent_workers=False)
    torch.manual_seed(args.seed)
    model = build_model(LABELS, weights=None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def batches():
        epoch = 0
        while True:
            ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()
    waits, totals = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y, _ = next(it)
        t1 = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if step >= args.warmup:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    wait, total = sum(waits), sum(totals)
    default = " (what covid_cxr.train uses on CPU)" if workers == loader_workers(None, torch.device("cpu")) else ""
    print(f"(d) DenseNet-121 CPU training, batch {args.batch_size} at {spec.size} px, AdamW, {workers} loader "
          f"workers{default}, {args.steps} steps after {args.warmup} warm-up:")
    print(f"    step {total / len(totals):.2f} s = data wait {wait / len(waits) * 1000:.0f} ms + compute "
          f"{(total - wait) / len(totals):.2f} s; {args.batch_size * len(totals) / total:.1f} images/s; per-step "
          f"waits {', '.join(f'{w * 1000:.0f}' for w in waits)} ms")
    print(f"    data wait = {100 * wait / total:.1f}% of step time  [target <= 10%]")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = PreprocessSpec.for_size(args.size)
    print(machine_header())
    rows = select_images(args.data_root, args.limit, args.seed)
    paths, shas = rows["path"].tolist(), rows["sha256"].tolist()
    targets = rows["label_as_in_source"].astype(str).str.upper().str.startswith("COVID").astype(np.int64).to_numpy()
    print(f"data: {len(paths)} images from {args.data_root} ({rows['source'].nunique()} sources); model input "
          f"{args.size} px, stage-1 short side {spec.base_short_side}; {args.workers} workers")
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-") as tmp:
        cache = ImageCache(args.cache_dir or Path(tmp) / "cache", spec.base_short_side)
        stats = cache.build(paths, shas, workers=args.workers)
        print(f"cache build ({args.workers} processes, sha256 checked): {stats['built']} built, {stats['reused']} "
              f"reused in {stats['seconds']:.1f} s; original files now in the page cache for (a) and (b)")
        decode_rate, ref = bench_decode(paths, args.size, spec.base_short_side, args.workers)
        images = bench_cache(paths, shas, cache, args.size, ref, decode_rate)
    bench_epoch(images, targets, spec, args.batch_size, args.seed, sorted({0, args.workers}))
    for workers in args.loader_workers or [loader_workers(None, torch.device("cpu"))]:
        bench_train_step(images, targets, spec, workers, args)


if __name__ == "__main__":
    main()
