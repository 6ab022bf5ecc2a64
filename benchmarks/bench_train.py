"""Training speed: images/s of training steps for fp32 / bf16 autocast x channels_last x torch.compile, the share
of each step spent waiting for data, augmented-loader images/s with 1..N workers, augmentation on the device
(``--augment-on device``) alone and fed by the loader, and peak GPU memory.

    .venv/bin/python benchmarks/bench_train.py --out bench_train.json            # a GPU: 224 px, batch 64
    .venv/bin/python benchmarks/bench_train.py --device cpu --image-size 64 --batch-size 8 --steps 5 --workers-max 2
    .venv/bin/python benchmarks/bench_train.py --loader-only --workers-max 2     # the augmented loader alone

Everything runs through the library: the model is ``covid_cxr.model.networks.build_model`` (random init, no download),
the batches come from ``covid_cxr.training.train.make_train_loader`` over a ``StackDataset`` with the training
augmentation (acquisition augmentation as ``covid-cxr train`` has it by default), and each step is
``covid_cxr.training.loop.train_one_epoch``'s (AdamW, cross-entropy, a loss read back every step). The images are
synthetic phantoms (``covid_cxr.imaging.phantoms``, a few unique ones repeated; augmentation differs per index), so no
data is needed. A mode that cannot run (torch.compile unavailable or failing) is listed with the reason.

Columns: img/s over the timed steps (data wait included); compute img/s without the data wait; data wait as a
share of the timed steps; warm-up seconds (the untimed first steps: compilation happens there); peak GPU memory
(``torch.cuda.max_memory_allocated``) on CUDA. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, as `covid-cxr` sets it (set before torch is imported): on a busy
# small CPU spinning threads slow training steps down several times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from covid_cxr.imaging.augment import AugmentSpec
from covid_cxr.imaging.phantoms import LABELS, make_phantom
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.networks import build_model
from covid_cxr.model.runtime import amp_dtype, compile_unavailable, resolve_device
from covid_cxr.training.loaders import BatchAugment, EpochSampler, StackDataset
from covid_cxr.training.loop import train_one_epoch
from covid_cxr.training.options import TrainOptions
from covid_cxr.training.train import augment_location, loader_workers, make_train_loader

MODES = ["fp32", "fp32+cl", "bf16", "bf16+cl", "bf16+cl+compile", "bf16+compile", "fp32+cl+compile", "fp32+compile"]
"""fp32 or bf16 autocast, +cl: channels_last model and batches, +compile: torch.compile of the model. The eager
modes first (quick), then the compiled ones, the likely fastest first: a run cut short keeps the most useful."""


def _default(name: str):
    return next(f.default for f in fields(TrainOptions) if f.name == name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224, help="network input side in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before them (default 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--workers-max", type=int, default=None,
                   help="measure the loader with 1..N workers (default: the CPUs this process may use, at most 16)")
    p.add_argument("--train-workers", type=int, default=None,
                   help="loader workers feeding the training modes (default: what `covid-cxr train` uses here)")
    p.add_argument("--arch", default="densenet121", help="network (default densenet121, the study's)")
    p.add_argument("--weights", choices=["none"], default="none", help="random initialisation (no download)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="training modes to run (default all)")
    p.add_argument("--no-acquisition", action="store_true", help="geometry/photometry augmentation only")
    p.add_argument("--unique", type=int, default=32, help="distinct phantoms in the image stack (default 32)")
    p.add_argument("--loader-batches", type=int, default=None,
                   help="batches timed per worker count (default: max(--steps, 10))")
    p.add_argument("--loader-only", action="store_true", help="skip the training modes")
    p.add_argument("--augment-stages", action="store_true",
                   help="also time one image's augmentation in this process (one thread): geometry alone, with "
                        "acquisition, and the whole sample (augmentation + finish)")
    p.add_argument("--augment-on", choices=["auto", "workers", "device"], default="auto",
                   help="where the training modes' augmentation runs, as `covid-cxr train --augment-on` (default "
                        "auto: the device on CUDA, the loader workers on CPU); the loader rows measure the workers "
                        "and a last row the device either way")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="also write the results as JSON here (rewritten after every mode: a run cut short keeps them)")
    p.add_argument("--show", type=Path, default=None, help="print the table of a JSON written by --out, and exit")
    args = p.parse_args(argv)
    if args.workers_max is None:
        args.workers_max = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    if min(args.image_size, args.batch_size, args.steps, args.workers_max, args.unique) < 1 or args.warmup < 0:
        p.error("--image-size, --batch-size, --steps, --workers-max and --unique must be >= 1, --warmup >= 0")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (BatchNorm needs two images)")
    return args


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def phantom_stack(n: int, unique: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` model-pixel images (S, S) uint8 with alternating labels, ``unique`` distinct phantoms repeated."""
    rng = np.random.default_rng(seed)
    unique = min(unique, n)
    base = np.stack([make_phantom(LABELS[i % 2], size, rng)[0] for i in range(unique)])
    idx = np.arange(n) % unique
    return np.ascontiguousarray(base[idx]), (idx % 2).astype(np.int64)


class Batches:
    """Endless training batches from the library's loader (the epoch advanced each pass, as in training).

    ``on_device``: the loader hands over model pixels and :attr:`augment` (a BatchAugment) augments them on the
    device inside each training step, as ``covid-cxr train --augment-on device`` does."""

    def __init__(self, pixels: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, aug: AugmentSpec,
                 batch_size: int, workers: int, device: torch.device, seed: int, on_device: bool = False):
        if on_device:
            self.ds = StackDataset(pixels, targets, spec, seed=seed, pixels_only=True)
            self.augment = BatchAugment(spec, aug, seed)
        else:
            self.ds = StackDataset(pixels, targets, spec, aug, seed=seed)
            self.augment = None
        self.sampler = EpochSampler(targets, seed)
        self.loader = make_train_loader(self.ds, self.sampler, batch_size, workers, device)
        self._it = self._forever()

    def _forever(self):
        epoch = 0
        while True:
            epoch += 1
            self.ds.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            yield from self.loader

    def take(self, n: int) -> "Timed":
        return Timed(self._it, n)

    def close(self) -> None:
        """Stop the loader's workers now (before another loader forks new ones)."""
        self._it.close()


class Timed:
    """``n`` batches from an iterator, recording how long each one was waited for (a loader for train_one_epoch)."""

    def __init__(self, it, n: int):
        self.it, self.n, self.waits = it, n, []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            t0 = time.perf_counter()
            batch = next(self.it)
            self.waits.append(time.perf_counter() - t0)
            yield batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def run_mode(mode: str, batches: Batches, args, device: torch.device) -> dict:
    """One training mode: warm-up steps, then timed steps, through train_one_epoch."""
    bf16, cl, comp = "bf16" in mode, "+cl" in mode, "+compile" in mode
    row: dict = {"mode": mode}
    if comp:
        reason = compile_unavailable(device)
        if reason:
            return {**row, "skipped": f"torch.compile unavailable: {reason}"}
    dtype = None
    if bf16:
        dtype = amp_dtype(device, True) if device.type == "cuda" else torch.bfloat16
        row["dtype"] = str(dtype).replace("torch.", "")
    torch.manual_seed(args.seed)
    model = build_model(list(LABELS), arch=args.arch, weights=None).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    train_model = model
    if comp:
        from torch import _dynamo

        _dynamo.reset()
        train_model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss()

    def steps(loader) -> dict:
        return train_one_epoch(train_model, loader, optimizer, scheduler, loss_fn, device, dtype, scaler,
                               channels_last=cl, batch_augment=batches.augment)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = time.perf_counter()
        if args.warmup:
            steps(batches.take(args.warmup))
        _sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        timed = batches.take(args.steps)
        t0 = time.perf_counter()
        out = steps(timed)
        _sync(device)
        total = time.perf_counter() - t0
    except Exception as exc:  # a compile failure shows up at the first call; report it and go on
        if not comp:
            raise
        return {**row, "skipped": f"torch.compile failed: {_reason(exc)}"}
    wait = sum(timed.waits)
    row.update(images_per_s=round(out["images"] / total, 1),
               compute_images_per_s=round(out["images"] / max(total - wait, 1e-9), 1),
               data_wait_pct=round(100 * wait / total, 1), step_ms=round(1000 * total / args.steps, 1),
               loss=round(out["loss"], 4))
    if device.type == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return row


def bench_loader(pixels: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, aug: AugmentSpec, args,
                 device: torch.device) -> list[dict]:
    """Augmented batches/s of the training loader alone, 1..N workers (the first batch, worker start-up, untimed)."""
    n = args.loader_batches or max(args.steps, 10)
    rows = []
    for workers in range(1, args.workers_max + 1):
        batches = Batches(pixels, targets, spec, aug, args.batch_size, workers, device, args.seed)
        it = batches.take(n + 1)
        seen, t0 = 0, None
        for x, _, _ in it:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += len(x)
        seconds = time.perf_counter() - t0
        rows.append({"workers": workers, "images_per_s": round(seen / seconds, 1), "images": seen,
                     "seconds": round(seconds, 2)})
        print(f"  loader, {workers:2d} workers: {seen / seconds:8.1f} img/s", file=sys.stderr, flush=True)
        batches.close()
    return rows


def bench_device_augment(pixels: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, aug: AugmentSpec, args,
                         device: torch.device) -> dict:
    """Images/s of augmentation on the device (covid_cxr.training.loaders.BatchAugment: draws, augment_batch, finish) on
    batches already there, and of the whole input pipeline with it: the loader handing over pixels (the workers
    `covid-cxr train` uses for that) plus the device augmentation."""
    n = args.loader_batches or max(args.steps, 10)
    ba = BatchAugment(spec, aug, args.seed)
    stack = torch.from_numpy(pixels).to(device)
    b = args.batch_size
    idx = torch.arange(len(pixels))
    ba(stack[:b], idx[:b], 0)  # warm-up (kernels, JPEG codec)
    _sync(device)
    t0 = time.perf_counter()
    for k in range(n):
        lo = (k * b) % max(1, len(pixels) - b + 1)
        ba(stack[lo:lo + b], idx[lo:lo + b], 1)
    _sync(device)
    alone = n * b / (time.perf_counter() - t0)
    workers = loader_workers(None, device, augmenting=False)
    batches = Batches(pixels, targets, spec, aug, b, workers, device, args.seed, on_device=True)
    it = batches.take(n + 1)
    seen, t0 = 0, None
    for x, _, i in it:
        x = batches.augment(x.to(device, non_blocking=True), i, 1)
        if t0 is None:
            _sync(device)
            t0 = time.perf_counter()
            continue
        seen += len(x)
    _sync(device)
    piped = seen / (time.perf_counter() - t0)
    batches.close()
    print(f"  augmentation on {device}: {alone:8.1f} img/s alone, {piped:8.1f} img/s with the loader "
          f"({workers} workers)", file=sys.stderr, flush=True)
    return {"device": str(device), "images_per_s": round(alone, 1), "with_loader_images_per_s": round(piped, 1),
            "loader_workers": workers, "batch_size": b}


def bench_augment_stages(pixels: np.ndarray, targets: np.ndarray, spec: PreprocessSpec, n: int = 64) -> dict:
    """Milliseconds per image of augment() without and with acquisition, and of a whole StackDataset sample."""
    from covid_cxr.imaging.augment import augment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a loader worker has (covid_cxr.training.loaders.worker_init)
    try:
        out = {}
        runs = [(name, lambda i, aug=aug: augment(pixels[i % len(pixels)], aug, torch.Generator().manual_seed(i)))
                for name, aug in (("geometry", AugmentSpec()), ("geometry+acquisition", AugmentSpec(acquisition=True)))]
        ds = StackDataset(pixels, targets, spec, AugmentSpec(acquisition=True))
        runs.append(("sample (augment + finish)", lambda i: ds[i % len(ds)]))
        for name, fn in runs:
            t0, c0 = time.perf_counter(), time.thread_time()
            for i in range(n):
                fn(i)
            # CPU time of this thread: what the image costs a worker, whatever else the machine runs
            out[name] = {"wall_ms": round(1000 * (time.perf_counter() - t0) / n, 2),
                         "cpu_ms": round(1000 * (time.thread_time() - c0) / n, 2)}
    finally:
        torch.set_num_threads(threads)
    return out


def markdown(result: dict) -> str:
    a, m = result["args"], result["machine"]
    gpu = f"; GPU {m['gpu']} x{m['gpu_count']}" if "gpu" in m else ""
    end = f" at the start, {', '.join(map(str, m['load_average_end']))} at the end" if "load_average_end" in m else ""
    lines = [f"machine: {m['cpu']}; {m['logical_cores']} logical cores, {m['usable_cores']} usable; load average "
             f"{', '.join(map(str, m['load_average']))}{end}{gpu}",
             f"python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); device {result['device']}",
             f"{a['arch']} (random init) at {a['image_size']} px, batch {a['batch_size']}, {a['warmup']} warm-up + "
             f"{a['steps']} timed steps per mode, AdamW; augmentation: {result['augmentation']}; "
             f"{result['train_workers']} loader workers feed the training modes", ""]
    if result["train"]:
        cuda = result["device"].startswith("cuda")
        head = "| mode | img/s | compute img/s | data wait % | step ms | warm-up s |" + (" peak GPU MiB |" if cuda else "")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in result["train"]:
            if "skipped" in r:
                lines.append(f"| {r['mode']} | skipped: {r['skipped']} |" + " |" * (head.count("|") - 3))
                continue
            mode = r["mode"] + (f" ({r['dtype']})" if r.get("dtype", "bfloat16") != "bfloat16" else "")
            lines.append(f"| {mode} | {r['images_per_s']} | {r['compute_images_per_s']} | {r['data_wait_pct']} | "
                         f"{r['step_ms']} | {r['warmup_s']} |" + (f" {r.get('peak_gpu_mib')} |" if cuda else ""))
        lines.append("")
    if result.get("augment_ms"):
        lines += ["| one image, one thread | wall ms | CPU ms | img/s per busy core |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['wall_ms']} | {v['cpu_ms']} | {1000 / max(v['cpu_ms'], 1e-9):.0f} |"
                  for k, v in result["augment_ms"].items()] + [""]
    if not result["loader"]:
        return "\n".join(lines)
    lines += ["| loader workers | augmented img/s |", "|---|---|"]
    lines += [f"| {r['workers']} | {r['images_per_s']} |" for r in result["loader"]]
    d = result.get("device_augment")
    if d:
        lines += ["", f"augmentation on {d['device']} (--augment-on device), batches of {d['batch_size']}: "
                  f"{d['images_per_s']} img/s alone; {d['with_loader_images_per_s']} img/s fed by the loader "
                  f"({d['loader_workers']} workers handing over pixels)"]
    return "\n".join(lines)


def _save(result: dict, path: Path | None, partial: bool) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "partial": partial}, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.show is not None:
        result = json.loads(args.show.read_text(encoding="utf-8"))
        print(markdown(result) + ("\n(partial: the run stopped before it finished)" if result.get("partial") else ""))
        return result
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    spec = PreprocessSpec.for_size(args.image_size)
    acquisition = _default("acquisition_augment") and not args.no_acquisition
    aug = AugmentSpec(acquisition=acquisition)
    per_mode = args.warmup + args.steps
    n_images = args.batch_size * max(per_mode, (args.loader_batches or max(args.steps, 10)) + 1)
    t0 = time.perf_counter()
    pixels, targets = phantom_stack(n_images, args.unique, args.image_size, args.seed)
    print(f"{n_images} phantom images ({args.unique} distinct) at {args.image_size} px in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    on_device = augment_location(args.augment_on, device) == "device"
    train_workers = (args.train_workers if args.train_workers is not None
                     else loader_workers(None, device, augmenting=not on_device))
    result = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": str(device), "train_workers": train_workers,
              "augmentation": "geometry, photometry" + (", acquisition" if acquisition else "")
              + (f", batched on {device}" if on_device else ", in the loader workers"), "train": [],
              "loader": []}
    if not args.loader_only:
        batches = Batches(pixels, targets, spec, aug, args.batch_size, train_workers, device, args.seed, on_device)
        for mode in args.modes:
            t0 = time.perf_counter()
            row = run_mode(mode, batches, args, device)
            result["train"].append(row)
            _save(result, args.out, partial=True)
            print(f"  {mode}: {row.get('images_per_s', row.get('skipped'))} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        batches.close()
    if args.augment_stages:
        result["augment_ms"] = bench_augment_stages(pixels, targets, spec)
    result["loader"] = bench_loader(pixels, targets, spec, aug, args, device)
    result["device_augment"] = bench_device_augment(pixels, targets, spec, aug, args, device)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(markdown(result))
    _save(result, args.out, partial=False)
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
