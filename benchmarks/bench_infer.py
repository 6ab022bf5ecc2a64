"""CPU inference benchmark: PyTorch eager, PyTorch channels_last, ONNX Runtime fp32 and ONNX Runtime int8 on
DenseNet-121.

Builds an untrained DenseNet-121 checkpoint at 224 px (or takes ``--run``), exports it with
:func:`covid_cxr.deploy.export.export_onnx`, quantises that graph with :func:`covid_cxr.deploy.quantize.quantize_model` (what
``covid-cxr export --quantize int8`` runs; calibrated on the run's validation pixels with ``--run``, else on random
model pixels: an untrained network's speed does not depend on them), and prints images/s and p50/p95 latency per
batch, for batch sizes 1 and 16, under a header naming the machine. Times cover the forward pass on an
already preprocessed float32 batch (decoding and :func:`~covid_cxr.imaging.pixels.preprocess` are
the same for every backend and are left out). All runtimes get the same number of threads.

``--levers`` adds a sweep of the settings that honestly change ONNX Runtime's and PyTorch's
speed at batch 1: ORT graph optimisation level (no fusion / Conv+BN folding / fused
Conv+activation / NCHWc layout), intra-op threads and thread spinning, and the torch thread count.

Usage::

    .venv/bin/python benchmarks/bench_infer.py [--run RUN_OR_CKPT] [--threads 2] [--levers]

This is a script, not a test; it writes only to a temporary folder (or ``--workdir``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from covid_cxr.deploy import quantize
from covid_cxr.deploy.export import export_onnx
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.machine import describe_cpu
from covid_cxr.model.checkpoint import load_model, new_meta, save_checkpoint
from covid_cxr.model.networks import build_model
from covid_cxr.model.onnx_model import OnnxModel
from covid_cxr.paths import locate_checkpoint

LABELS = ["normal", "covid"]


@dataclass(frozen=True)
class Result:
    section: str
    backend: str
    batch: int
    threads: int
    latencies_s: tuple[float, ...]
    note: str = ""

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.latencies_s)

    @property
    def p95_ms(self) -> float:
        lat = sorted(self.latencies_s)
        return 1000 * lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]

    @property
    def img_per_s(self) -> float:
        return self.batch * len(self.latencies_s) / sum(self.latencies_s)


@dataclass
class Context:
    """What every section gets: the model in both forms and the run settings."""

    model: torch.nn.Module
    onnx_path: Path
    int8_path: Path
    size: int
    threads: tuple[int, ...]
    batches: tuple[int, ...]
    warmup: int
    seconds: float
    min_iters: int
    rounds: int


def time_interleaved(runs: list[tuple[str, Callable[[], object]]], ctx: "Context") -> dict[str, tuple[float, ...]]:
    """Per-call wall times of each run, measured in ``ctx.rounds`` interleaved blocks.

    The cores are shared with other processes whose load drifts over minutes; interleaving gives
    every run the same mix of quiet and busy moments. Each block starts with one untimed call,
    so a run's threads are awake and no other runtime's idle threads are still spinning.
    Each run gets >= ``ctx.min_iters`` calls and >= ``ctx.seconds`` in all.
    """
    for _, fn in runs:
        for _ in range(ctx.warmup):
            fn()
    per_block_calls = -(-ctx.min_iters // ctx.rounds)
    out: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(ctx.rounds):
        for name, fn in runs:
            fn()
            start = time.perf_counter()
            calls = 0
            while calls < per_block_calls or time.perf_counter() - start < ctx.seconds / ctx.rounds:
                t0 = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t0)
                calls += 1
    return {name: tuple(v) for name, v in out.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _torch_parallel() -> str:
    """The parallel backend and oneDNN version from torch's build report."""
    lines = [ln.strip() for ln in torch.__config__.parallel_info().splitlines()]
    keep = [ln for ln in lines if ln.startswith(("ATen parallel backend", "OpenMP", "Intel(R) MKL-DNN"))]
    return ", ".join(ln.split(" (Git Hash")[0] for ln in keep)


def header(ctx: Context) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join([
        "covid-cxr inference benchmark (CPU)",
        f"machine      : {cpu_model()}; {os.cpu_count()} logical CPUs, {usable_cpus()} usable; {platform.platform()}",
        f"load average : {load} (1/5/15 min, at start; other processes share these cores)",
        f"python       : {sys.version.split()[0]}",
        f"torch        : {torch.__version__} (mkldnn {torch.backends.mkldnn.is_available()}), "
        f"{_torch_parallel()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        f"onnxruntime  : {ort.__version__}, providers {ort.get_available_providers()}",
        f"cpu          : {describe_cpu()} (int8 gains most with VNNI or AMX)",
        f"threads      : {', '.join(map(str, ctx.threads))} (torch.set_num_threads = ORT intra_op_num_threads; "
        "ORT inter-op 1)",
        f"model        : DenseNet-121, {len(LABELS)} classes, input (N, 3, {ctx.size}, {ctx.size}) float32; "
        "forward pass only; int8 = covid_cxr.deploy.quantize.quantize_model (QDQ, per-channel, 7-bit weights)",
        f"timing       : {ctx.warmup} warm-up calls, then >= {ctx.min_iters} calls and >= {ctx.seconds:g} s per row, "
        f"in {ctx.rounds} blocks interleaved across the rows of a table group",
    ])


def torch_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def ort_session(onnx_path: Path, threads: int,
                level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                spinning: bool = True) -> ort.InferenceSession:
    """A CPU session with one setting changed from ORT's defaults (levels and spinning are ORT's defaults)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    return lambda: session.run(["logits"], {"image": x})


def _batch(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def in_process_section(ctx: Context) -> list[Result]:
    """The backends as shipped: eager, channels_last, OnnxModel's ONNX Runtime session on model.onnx and on
    model.int8.onnx (the same session options: OnnxModel's)."""
    eager = ctx.model
    cl = copy.deepcopy(ctx.model).to(memory_format=torch.channels_last)  # leave eager's weights NCHW
    results = []
    for threads in ctx.threads:
        torch.set_num_threads(threads)
        onnx_model = OnnxModel(ctx.onnx_path, device="cpu", threads=threads)
        int8 = ort_session(ctx.int8_path, threads, spinning=False)
        for n in ctx.batches:
            x = _batch(n, ctx.size)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            runs = [("torch eager", torch_runner(eager, x)),
                    ("torch channels_last", torch_runner(cl, x_cl)),
                    ("onnxruntime (OnnxModel)", ort_runner(onnx_model.session, x.numpy())),
                    ("onnxruntime int8", ort_runner(int8, x.numpy()))]
            for name, lat in time_interleaved(runs, ctx).items():
                results.append(Result("in-process", name, n, threads, lat))
            print(f"  done: batch {n}, {threads} thread(s)", file=sys.stderr, flush=True)
    return results


def lever_section(ctx: Context) -> list[Result]:
    """Batch 1 under the settings that change speed: ORT optimisation level, threads, spinning."""
    x = _batch(1, ctx.size)
    levels = [("DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "exported ops as they are"),
              ("ENABLE_BASIC", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "constant folding, Conv+BN folded"),
              ("ENABLE_EXTENDED", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "+ fused Conv+activation"),
              ("ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "+ NCHWc layout (x86 blocked kernels)")]
    results = []
    for threads in ctx.threads:
        torch.set_num_threads(threads)
        runs = [("torch eager", torch_runner(ctx.model, x), f"torch.set_num_threads({threads})")]
        for name, level, what in levels:
            runs.append((f"ort {name}", ort_runner(ort_session(ctx.onnx_path, threads, level), x.numpy()), what))
        runs.append(("ort ENABLE_ALL no-spin", ort_runner(ort_session(ctx.onnx_path, threads, spinning=False),
                                                          x.numpy()), "idle threads sleep (OnnxModel's default)"))
        notes = {name: note for name, _, note in runs}
        for name, lat in time_interleaved([(name, fn) for name, fn, _ in runs], ctx).items():
            results.append(Result("levers", name, 1, threads, lat, notes[name]))
        print(f"  done: levers at {threads} thread(s)", file=sys.stderr, flush=True)
    return results


# Extension point: a later HTTP section (the serve/ app under load) is a function
# ``(ctx: Context) -> list[Result]`` appended to SECTIONS; main() prints its rows like these.
# None is registered until that section measures real requests.
SECTIONS: list[Callable[[Context], list[Result]]] = [in_process_section]


def format_table(results: list[Result]) -> str:
    lines = [f"{'section':<11} {'backend':<24} {'batch':>5} {'thr':>3} {'n':>4} {'img/s':>8} {'p50 ms':>9} "
             f"{'p95 ms':>9}  note"]
    for r in results:
        lines.append(f"{r.section:<11} {r.backend:<24} {r.batch:>5} {r.threads:>3} {len(r.latencies_s):>4} "
                     f"{r.img_per_s:>8.2f} {r.p50_ms:>9.2f} {r.p95_ms:>9.2f}  {r.note}")
    return "\n".join(lines)


def speedups(results: list[Result]) -> str:
    """ONNX Runtime and channels_last relative to eager torch, per section/batch/threads (by p50)."""
    lines = []
    base = {(r.section, r.batch, r.threads): r for r in results if r.backend == "torch eager"}
    for r in results:
        ref = base.get((r.section, r.batch, r.threads))
        if ref is not None and r is not ref:
            lines.append(f"  {r.section:<11} batch {r.batch:>2}, {r.threads} thr: {r.backend:<24} "
                         f"{ref.p50_ms / r.p50_ms:5.2f}x eager (p50)")
    fp32 = {(r.section, r.batch, r.threads): r for r in results if r.backend == "onnxruntime (OnnxModel)"}
    for r in results:
        ref = fp32.get((r.section, r.batch, r.threads))
        if ref is not None and r.backend == "onnxruntime int8":
            lines.append(f"  {r.section:<11} batch {r.batch:>2}, {r.threads} thr: {r.backend:<24} "
                         f"{ref.p50_ms / r.p50_ms:5.2f}x onnxruntime fp32 (p50)")
    return "\n".join(lines)


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, Path, Path, int]:
    run_dir = None
    if args.run:
        run_dir, ckpt = locate_checkpoint(args.run)
    else:
        ckpt = workdir / "untrained-224.pt"
        torch.manual_seed(0)
        model = build_model(tuple(LABELS), weights=None).eval()
        save_checkpoint(ckpt, model, new_meta("densenet121", tuple(LABELS), "covid", PreprocessSpec.for_size(args.size),
                                              {"benchmark": True}, None))
    model, meta = load_model(ckpt, "cpu")
    t0 = time.perf_counter()
    summary = export_onnx(ckpt, workdir / "model.onnx")
    print(f"exported {ckpt} -> {summary['onnx']} (opset {summary['opset']}, {summary['bytes'] / 1e6:.1f} MB) in "
          f"{time.perf_counter() - t0:.1f} s; max diff vs torch {summary['max_abs_diff']}")
    spec = meta.preprocess
    if run_dir is not None:
        calib, what = quantize.load_data(run_dir, meta).calibration, "validation images of the run's dataset"
    else:
        calib = np.random.default_rng(0).integers(0, 256, (32, spec.size, spec.size), dtype=np.uint8)
        what = "random model pixels"
    int8_path = quantize.int8_path(workdir / "model.onnx")
    t0 = time.perf_counter()
    quantize.quantize_model(workdir / "model.onnx", int8_path, calib, spec)
    print(f"quantised -> {int8_path} ({int8_path.stat().st_size / 1e6:.1f} MB) on {len(calib)} {what} in "
          f"{time.perf_counter() - t0:.1f} s")
    return model, workdir / "model.onnx", int8_path, spec.size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run folder or checkpoint (default: an untrained DenseNet-121 at --size)")
    p.add_argument("--size", type=int, default=224, help="input side for the untrained model (default 224)")
    p.add_argument("--threads", type=int, nargs="+", default=[usable_cpus()],
                   help="thread counts to run, each used by both runtimes (default: the usable CPUs)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per row (default 3)")
    p.add_argument("--seconds", type=float, default=6.0, help="minimum timed seconds per row (default 6)")
    p.add_argument("--min-iters", type=int, default=6, help="minimum timed calls per row (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved blocks per row (default 3)")
    p.add_argument("--levers", action="store_true", help="also sweep ORT optimisation level/threads/spinning at batch 1")
    p.add_argument("--workdir", help="where to write the checkpoint and ONNX file (default: a temporary folder)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(max(args.threads))
        model, onnx_path, int8_path, size = prepare(args, workdir)
        ctx = Context(model, onnx_path, int8_path, size, tuple(args.threads), tuple(args.batches), args.warmup, args.seconds,
                      args.min_iters, args.rounds)
        print(header(ctx))
        sections = SECTIONS + ([lever_section] if args.levers else [])
        results = [r for section in sections for r in section(ctx)]
        print()
        print(format_table(results))
        print("\nspeed-up over torch eager at the same batch and thread count:")
        print(speedups(results))
        load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"\nload average at end: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
