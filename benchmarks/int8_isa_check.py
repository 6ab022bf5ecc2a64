"""Does the int8 ONNX model compute the same logits on an x86 CPU without VNNI / AVX-512 (AVX2 only) as here?

ONNX Runtime's MLAS picks its uint8 x int8 kernels by cpuid: with AVX512_VNNI or AVX_VNNI the products go straight to
int32 (``vpdpbusd``); on AVX2 alone pairs of products are summed in int16 (``vpmaddubsw``), which saturates once
2 * 255 * |w| > 32767. ``covid-cxr export --quantize int8`` therefore writes 7-bit weights (|w| <= 64, see
src/covid_cxr/deploy/quantize.py). This script checks that claim on one machine by emulating an AVX2-only CPU with
QEMU user mode (``qemu-x86_64 -cpu Haswell``: AVX2 + FMA, no AVX-512, no VNNI; TCG emulates those instructions, so
MLAS really runs its AVX2 kernels) and comparing against the host:

1. ``build`` (native, through the library as the test suite does it): 60 phantoms per class at 64 px -> dataset ->
   1-epoch 32 px model (tests/conftest.py's ``tiny_run``) -> ``model.onnx`` (fp32) -> ``model.int8.onnx`` (the
   shipped recipe, 7-bit weights) and, as a control, ``model.int8full.onnx`` (the same recipe with
   ``reduce_range=False``: full-range int8 weights, which can saturate on AVX2). Inputs: 32 held-out phantoms
   (16 per class, a seed the training set does not use) preprocessed by ``covid_cxr.imaging.pixels.preprocess``,
   saved as ``inputs.npy``. Plus ``probe.onnx``: one MatMulInteger of 255s by 127s, whose exact result AVX2's int16
   pair sums cannot reach - a positive control that the emulated CPU really runs the non-VNNI kernel.
2. ``run-one`` (onnxruntime + numpy only, no torch, cheap enough under emulation): one graph on ``inputs.npy``, CPU
   provider, 1 thread, ``ORT_ENABLE_ALL`` as ``OnnxModel`` does; saves every output, prints the CPU features the
   process sees (numpy's cpuid-based ``__cpu_features__`` and a raw ``cpuid`` call; /proc/cpuinfo under qemu-user is
   the host's and is printed only to show that).
3. ``compare``: native vs emulated for every graph, int8 vs fp32 on each side, and decision / in-scope flips.

What it showed (host: AMD EPYC with AVX512_VNNI and AVX_VNNI; QEMU 7.2 ``-cpu Haswell``; onnxruntime 1.32.0): the
emulated side's cpuid has AVX2 + FMA and no AVX-512 / VNNI, and the probe saturates there (1048544, not 2072640), so
MLAS did take its AVX2 U8S8 path. ``model.int8.onnx`` (7-bit) gave bit-identical logits and gate scores on both sides;
``model.int8full.onnx`` differed by up to 0.049 (1-epoch 32 px model) and 0.17 (``--epochs 6 --size 64``, where it
also flipped 1 of 32 decisions and 1 in-scope flag); fp32 differed by < 1e-6 (other float kernels).

Run (needs ``apt-get install qemu-user``; about 1 min on 2 cores at the defaults, half of it the emulated runs):

    python benchmarks/int8_isa_check.py                      # all steps, work folder /tmp/int8-isa
    python benchmarks/int8_isa_check.py --work DIR --cpu Haswell --qemu qemu-x86_64 --epochs 6 --size 64
    python benchmarks/int8_isa_check.py --skip-build         # rerun both sides on the graphs already in --work

Timings printed for the emulated side measure QEMU's translator, not any CPU: only the native ones mean anything.
QEMU's TCG has no AVX-512, so the VNNI side is always the host: run this on a host with VNNI (or AMX) to compare the
two kernel families; on an AVX2-only host both sides take the same path and the check shows nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it

GRAPHS = ("model.onnx", "model.int8.onnx", "model.int8full.onnx", "probe.onnx")
PROBE_K = 64
"""MatMulInteger probe: A (1, K) of 255 (uint8) times B (K, 1) of 127 (int8). Exact: 255 * 127 * K; with int16 pair
sums saturating at 32767: 32767 * K / 2."""


# ----------------------------------------------------------------------------- CPU features (no torch, no covid_cxr)

_CPUID_CODE = bytes([
    0x53,                    # push rbx
    0x89, 0xF8,              # mov eax, edi   (leaf)
    0x89, 0xF1,              # mov ecx, esi   (subleaf)
    0x49, 0x89, 0xD0,        # mov r8, rdx    (out pointer)
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


def cpuid_features() -> dict[str, bool] | str:
    """The bits MLAS reads, straight from ``cpuid`` (x86-64 Linux only; under qemu-user QEMU answers it)."""
    import ctypes
    import mmap
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError) as exc:
        return f"cannot map executable memory: {exc}"
    buf.write(_CPUID_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(addr)

    def cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        fn(leaf, sub, ctypes.byref(out))
        return tuple(out)

    max_leaf = cpuid(0)[0]
    _, _, c1, _ = cpuid(1)
    _, b7, c7, d7 = cpuid(7, 0) if max_leaf >= 7 else (0, 0, 0, 0)
    a71 = cpuid(7, 1)[0] if max_leaf >= 7 else 0
    bit = lambda reg, n: bool(reg >> n & 1)  # noqa: E731
    feats = {"fma": bit(c1, 12), "avx": bit(c1, 28), "avx2": bit(b7, 5), "avx512f": bit(b7, 16),
             "avx512bw": bit(b7, 30), "avx512vl": bit(b7, 31), "avx512_vnni": bit(c7, 11), "avx_vnni": bit(a71, 4),
             "amx_int8": bit(d7, 25)}
    del fn
    return feats


def numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as f
    keys = ("FMA3", "AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512_ICL", "AVX512_SPR")
    return {k: bool(f[k]) for k in keys if k in f}


def proc_cpuinfo() -> list[str]:
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in want if f in have]
    except OSError:
        pass
    return []


def run_one(args) -> int:
    """One ONNX graph on one .npy batch; writes ``--out`` (.npz of every output) and prints one JSON line."""
    import numpy as np
    import onnxruntime as ort

    x = np.load(args.inputs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.model, sess_options=opts, providers=["CPUExecutionProvider"])
    t_load = time.perf_counter() - t0
    feed_name = sess.get_inputs()[0].name
    if Path(args.model).name == "probe.onnx":
        x = np.full((1, PROBE_K), 255, np.uint8)
    t0 = time.perf_counter()
    outs = sess.run(None, {feed_name: x})
    t_run = time.perf_counter() - t0
    np.savez(args.out, **{o.name: v for o, v in zip(sess.get_outputs(), outs)})
    print(json.dumps({"model": Path(args.model).name, "load_s": round(t_load, 3), "run_s": round(t_run, 3),
                      "batch": int(len(x)), "onnxruntime": ort.__version__, "numpy": np.__version__,
                      "cpuid": cpuid_features(), "numpy_cpu_features": numpy_features(),
                      "proc_cpuinfo_flags": proc_cpuinfo()}), flush=True)
    return 0


# ----------------------------------------------------------------------------- build (native; torch + covid_cxr)

def build(work: Path, n_inputs: int, epochs: int, size: int) -> None:
    import logging

    import numpy as np
    import onnx
    import onnxruntime.quantization as ortq
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from covid_cxr.data.manifest import build as build_dataset
    from covid_cxr.data.options import DataConfig
    from covid_cxr.deploy import quantize
    from covid_cxr.deploy.export import export_onnx
    from covid_cxr.imaging.phantoms import LABELS, generate_phantoms, make_phantom
    from covid_cxr.imaging.pixels import preprocess
    from covid_cxr.model.onnx_model import OnnxModel
    from covid_cxr.paths import RunDir
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run as train

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if work.exists():
        shutil.rmtree(work)
    src, data, run = work / "synthetic-phantoms", work / "dataset", work / "run"
    generate_phantoms(src, 60, size=64, seed=1)  # tests/conftest.py: phantom_dataset, tiny_run
    build_dataset(DataConfig(sources=(("folder", str(src)),), out=str(data), test_per_class=12, val_fraction=0.15,
                             train_size=200, seed=0, workers=1, progress=False, dedup=False))
    train(TrainConfig(data=str(data), out=str(run), epochs=epochs, image_size=size, batch_size=16, weights="none",
                      progress=False))
    export_onnx(run / "best.pt", run / "model.onnx")
    fp32 = OnnxModel(run / "model.onnx", device="cpu", threads=1)
    qd = quantize.load_data(RunDir(run), fp32.meta, workers=1)
    summary = quantize.quantize_export(run / "model.onnx", qd, max_auc_drop=1.0)  # the shipped recipe, 7-bit weights
    # control: the same recipe with full-range int8 weights (reduce_range=False), the pre-7-bit export
    real = ortq.quantize_static
    ortq.quantize_static = lambda *a, **k: real(*a, **{**k, "reduce_range": False})
    try:
        quantize.quantize_model(run / "model.onnx", work / "model.int8full.onnx", qd.calibration, fp32.meta.preprocess)
    finally:
        ortq.quantize_static = real
    for name in ("model.onnx", "model.int8.onnx", "model.json", "model.int8.json"):
        shutil.copy2(run / name, work / name)

    def max_weight(path: Path) -> int:
        m = onnx.load(str(path))
        init = {i.name: i for i in m.graph.initializer}
        ws = [numpy_helper.to_array(init[n.input[0]]) for n in m.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in init and init[n.input[0]].data_type == TensorProto.INT8]
        return max(int(np.abs(w.astype(np.int16)).max()) for w in ws)

    # held-out inputs: phantoms from a seed the training set (seed 1) does not use, half per class
    rng = np.random.default_rng(20240611)
    images = [make_phantom(LABELS[i % len(LABELS)], 64, rng)[0] for i in range(n_inputs)]
    x = np.stack([preprocess(im, fp32.meta.preprocess) for im in images]).astype(np.float32)
    np.save(work / "inputs.npy", x)
    # positive control: MatMulInteger 255 x 127 over K = PROBE_K
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, PROBE_K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        [numpy_helper.from_array(np.full((PROBE_K, 1), 127, np.int8), "b")]),
        opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(probe, str(work / "probe.onnx"))
    info = {"inputs": list(x.shape), "labels": list(fp32.meta.labels), "test_auc_fp32": summary["fp32_auc"],
            "test_auc_int8": summary["int8_auc"], "max_abs_int8_weight": max_weight(work / "model.int8.onnx"),
            "max_abs_int8full_weight": max_weight(work / "model.int8full.onnx"), "build_s": time.perf_counter() - t0}
    (work / "build.json").write_text(json.dumps(info, indent=1))
    print(f"built in {info['build_s']:.0f} s: {json.dumps(info)}", flush=True)


# ----------------------------------------------------------------------------- run both sides, compare

def run_side(work: Path, side: str, prefix: list[str]) -> dict[str, dict]:
    out = {}
    for g in GRAPHS:
        cmd = prefix + [sys.executable, os.path.abspath(__file__), "run-one", "--model", str(work / g),
                        "--inputs", str(work / "inputs.npy"), "--out", str(work / f"{side}.{g}.npz")]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise SystemExit(f"{side} {g} failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
        out[g] = {**json.loads(line), "wall_s": time.perf_counter() - t0}
        print(f"  {side:8s} {g:20s} session.run {out[g]['run_s']:8.3f} s (process {out[g]['wall_s']:.1f} s)",
              flush=True)
    return out


def compare(work: Path, sides: dict[str, dict], emulated: str) -> int:
    import numpy as np

    from covid_cxr.model.onnx_model import read_onnx_meta

    meta, _ = read_onnx_meta(work / "model.onnx")
    load = lambda side, g: dict(np.load(work / f"{side}.{g}.npz"))  # noqa: E731
    print("\nCPU features each side saw (cpuid | numpy __cpu_features__ | /proc/cpuinfo):")
    for side, runs in sides.items():
        r = runs["model.onnx"]
        cid = r["cpuid"] if isinstance(r["cpuid"], str) else ",".join(k for k, v in r["cpuid"].items() if v)
        npf = ",".join(k for k, v in r["numpy_cpu_features"].items() if v)
        host = "  (the host's: qemu-user passes it through)" if side != "native" else ""
        print(f"  {side:8s} cpuid: {cid}\n  {'':8s} numpy: {npf}\n  {'':8s} /proc/cpuinfo: "
              f"{','.join(r['proc_cpuinfo_flags'])}{host}")
    (probe_n,), (probe_e,) = (load(s, "probe.onnx")["y"].ravel() for s in ("native", emulated))
    exact, saturated = 255 * 127 * PROBE_K, 32767 * PROBE_K // 2
    def kind(v: int) -> str:
        return "exact (int32 sums)" if v == exact else "saturated (int16 pair sums)" if v == saturated else "?"

    print(f"\nprobe MatMulInteger 255 x 127 x {PROBE_K}: exact {exact}, int16-saturated {saturated}")
    print(f"  native   {probe_n:>9d}  {kind(int(probe_n))}\n  {emulated:8s} {probe_e:>9d}  {kind(int(probe_e))}")

    t = meta.gate.threshold if meta.gate is not None else None
    rows = []

    def row(name: str, a: dict, b: dict) -> None:
        la, lb = a["logits"].astype(np.float64), b["logits"].astype(np.float64)
        da, db = meta.decide(meta.log_probs(la)), meta.decide(meta.log_probs(lb))
        r = {"pair": name, "max_logit": float(np.abs(la - lb).max()),
             "bit_equal": bool(np.array_equal(a["logits"], b["logits"])),
             "argmax_flips": int((la.argmax(1) != lb.argmax(1)).sum()),
             "margin_sign_flips": int((np.sign(la[:, 1] - la[:, 0]) != np.sign(lb[:, 1] - lb[:, 0])).sum()),
             "decision_flips": int((da != db).sum())}
        if t is not None and "scope" in a:
            r["max_scope"] = float(np.abs(a["scope"] - b["scope"]).max())
            r["scope_flips"] = int(((a["scope"] <= t) != (b["scope"] <= t)).sum())
        rows.append(r)

    for g in ("model.onnx", "model.int8.onnx", "model.int8full.onnx"):
        row(f"{g}: native vs {emulated}", load("native", g), load(emulated, g))
    for side in ("native", emulated):
        for g in ("model.int8.onnx", "model.int8full.onnx"):
            row(f"{side}: {g} vs fp32", load(side, g), load(side, "model.onnx"))
    n = len(load("native", "model.onnx")["logits"])
    lg = load("native", "model.onnx")["logits"]
    print(f"\n{n} held-out phantoms; fp32 native logit range [{lg.min():.3f}, {lg.max():.3f}], "
          f"margin (l1 - l0) |min| {np.abs(lg[:, 1] - lg[:, 0]).min():.4f}"
          + (f"; gate threshold {t:.3f}" if t is not None else ""))
    head = f"{'pair':52s} {'max|dlogit|':>11s} {'bit-equal':>9s} {'argmax':>6s} {'sign':>4s} {'decide':>6s}" + \
        (f" {'max|dscope|':>11s} {'in-scope':>8s}" if t is not None else "")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['pair']:52s} {r['max_logit']:11.3e} {str(r['bit_equal']):>9s} {r['argmax_flips']:6d} "
              f"{r['margin_sign_flips']:4d} {r['decision_flips']:6d}"
              + (f" {r['max_scope']:11.3e} {r['scope_flips']:8d}" if "max_scope" in r else ""))
    print("(flip columns: images of", n, "whose argmax / sign of l1-l0 / calibrated decision / in-scope flag differ)")
    probe = {"native": int(probe_n), emulated: int(probe_e)}
    (work / "comparison.json").write_text(json.dumps({"rows": rows, "probe": probe, "sides": sides}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    one = sub.add_parser("run-one", help="(internal) one graph, onnxruntime + numpy only")
    one.add_argument("--model", required=True)
    one.add_argument("--inputs", required=True)
    one.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/int8-isa", help="work folder (rebuilt unless --skip-build)")
    ap.add_argument("--qemu", default="qemu-x86_64")
    ap.add_argument("--cpu", default="Haswell", help="QEMU CPU model without AVX-512 and VNNI (qemu-x86_64 -cpu help)")
    ap.add_argument("--inputs", type=int, default=32, help="held-out phantoms to run")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=32, help="model input size in px")
    ap.add_argument("--skip-build", action="store_true", help="reuse the graphs and inputs in --work")
    args = ap.parse_args(argv)
    if args.cmd == "run-one":
        return run_one(args)
    work = Path(args.work)
    qemu = shutil.which(args.qemu)
    if qemu is None:
        print(f"{args.qemu} not found: apt-get install qemu-user", file=sys.stderr)
        return 2
    if not args.skip_build:
        build(work, args.inputs, args.epochs, args.size)
    sides = {"native": run_side(work, "native", []),
             args.cpu: run_side(work, args.cpu, [qemu, "-cpu", args.cpu])}
    emulated = sides[args.cpu]["model.onnx"]["cpuid"]
    if isinstance(emulated, dict) and (emulated.get("avx512_vnni") or emulated.get("avx_vnni")
                                       or emulated.get("avx512f") or not emulated.get("avx2")):
        print(f"warning: -cpu {args.cpu} reports {emulated}: not an AVX2-only CPU", file=sys.stderr)
    rc = compare(work, sides, args.cpu)
    print("\nemulated timings measure QEMU's translator, not an AVX2 CPU; only the native ones are speeds")
    return rc


if __name__ == "__main__":
    sys.exit(main())
