"""The Python steps of benchmarks/gpu_check.sh; each prints one result line ``RESULT <step> PASS|FAIL|SKIP ...``.

    python benchmarks/gpu_check.py prepare --out DIR                   # phantoms -> DIR/dataset
    python benchmarks/gpu_check.py train --data DIR/dataset --out DIR/run --device cuda
    torchrun --nproc-per-node 2 benchmarks/gpu_check.py train --data DIR/dataset --out DIR/ddp --device cuda
    python benchmarks/gpu_check.py onnx --run DIR/run --device cuda     # CPU vs CUDA provider logits
    python benchmarks/gpu_check.py augment --device cuda                # batched augmentation vs per-image

``--device cpu`` runs every step on the CPU (a dry run of the script's plumbing; the ONNX step then compares the
CPU provider with itself). Everything goes through the library (phantoms, data build, train, export, OnnxModel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it


def result(step: str, status: str, text: str) -> None:
    print(f"RESULT {step} {status} {text}", flush=True)


def prepare(args) -> int:
    from covid_cxr.data.manifest import build
    from covid_cxr.data.options import DataConfig
    from covid_cxr.imaging.phantoms import generate_phantoms

    out = Path(args.out)
    t0 = time.perf_counter()
    generate_phantoms(out / "synthetic-phantoms", args.per_class, size=args.phantom_size, seed=0)
    build(DataConfig(sources=(("folder", str(out / "synthetic-phantoms")),), out=str(out / "dataset"),
                     test_per_class=max(4, args.per_class // 6), val_fraction=0.15, train_size=2 * args.per_class,
                     seed=0, progress=False, dedup=False))
    result("prepare", "PASS", f"{2 * args.per_class} phantoms at {args.phantom_size} px -> {out / 'dataset'} "
                              f"in {time.perf_counter() - t0:.0f} s")
    return 0


def train(args) -> int:
    import torch

    from covid_cxr.model.checkpoint import read_checkpoint
    from covid_cxr.model.runtime import amp_dtype, resolve_device, use_compile
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    step = "ddp" if world > 1 else "train"
    cfg = TrainConfig(data=args.data, out=args.out, device=args.device, epochs=args.epochs,
                      image_size=args.image_size, batch_size=args.batch_size, weights="none", lr=2e-3,
                      warmup_epochs=0.5, patience=0, progress=False, compile=args.compile)
    t0 = time.perf_counter()
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    seconds = time.perf_counter() - t0
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")), world > 1)
    records = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    keys = list(read_checkpoint(Path(args.out) / "last.pt").state_dict)
    dtype = amp_dtype(device, cfg.amp)
    problems = []
    if any(k.startswith("_orig_mod.") or k.startswith("module.") for k in keys):
        problems.append("checkpoint keys carry a wrapper prefix")
    if not all(isinstance(r["train_loss"], float) and r["train_loss"] == r["train_loss"] for r in records):
        problems.append("a non-finite training loss")
    speeds = ", ".join(f"{r['train_images_per_second']:.0f}" for r in records)
    text = (f"{len(records)} epochs at {cfg.image_size} px on {world} x {device} "
            f"({str(dtype).replace('torch.', '') if dtype else 'fp32'}, compile "
            f"{'on' if use_compile(cfg.compile, device) else 'off'}) in {seconds:.0f} s; train img/s per epoch "
            f"(epoch 1 includes compilation): {speeds}; best val AUC {summary['best_val_auc']:.3f}")
    result(step, "FAIL" if problems else "PASS", text + ("; " + "; ".join(problems) if problems else ""))
    return 1 if problems else 0


def onnx(args) -> int:
    import numpy as np

    from covid_cxr.deploy.export import run as export
    from covid_cxr.deploy.options import ExportConfig
    from covid_cxr.imaging.phantoms import LABELS, make_phantom
    from covid_cxr.model.onnx_model import OnnxModel

    try:
        import onnxruntime as ort
    except ImportError:
        result("onnx", "SKIP", "onnxruntime is not installed")
        return 0
    available = ort.get_available_providers()
    if args.device != "cpu" and "CUDAExecutionProvider" not in available:
        result("onnx", "SKIP", f"this onnxruntime has no CUDA provider ({', '.join(available)}); install "
                               "onnxruntime-gpu for the CUDA parity check")
        return 0
    path = Path(args.run) / "model.onnx"
    export(ExportConfig(run=args.run))
    cpu = OnnxModel(path, device="cpu")
    other = OnnxModel(path, device="cpu" if args.device == "cpu" else "cuda")
    if args.device != "cpu" and other.session.get_providers()[0] != "CUDAExecutionProvider":
        result("onnx", "FAIL", f"the CUDA session fell back to {other.session.get_providers()}")
        return 1
    rng = np.random.default_rng(0)
    size = cpu.meta.preprocess.size
    pixels = np.stack([make_phantom(LABELS[i % 2], size, rng)[0] for i in range(16)])
    a, b = cpu.forward_pixels(pixels, batch_size=8), other.forward_pixels(pixels, batch_size=8)
    diff = float(np.abs(a.logits - b.logits).max())
    same = bool((a.logits.argmax(1) == b.logits.argmax(1)).all())
    ok = diff <= args.tolerance and same
    result("onnx", "PASS" if ok else "FAIL",
           f"{'CPU' if args.device == 'cpu' else 'CUDA'} vs CPU provider on 16 phantoms at {size} px: max |logit "
           f"difference| {diff:.2e} (tolerance {args.tolerance:g}; ONNX Runtime's CUDA provider may use TF32), "
           f"same argmax: {same}")
    return 0 if ok else 1


def augment(args) -> int:
    """augment_batch on the device vs augment() image by image on the CPU, with the same draws (noise off: each
    implementation draws its own numbers); and its speed at 224 px."""
    import numpy as np
    import torch

    from covid_cxr.imaging.augment import AugmentSpec
    from covid_cxr.imaging.augment import augment as augment_one
    from covid_cxr.imaging.augment import augment_batch, draw
    from covid_cxr.imaging.phantoms import LABELS, make_phantom

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    imgs = np.stack([make_phantom(LABELS[k % 2], 224, rng)[0] for k in range(64)])
    spec = AugmentSpec(acquisition=True, p_noise=0.0)
    gens = [torch.Generator().manual_seed(1000 + k) for k in range(64)]
    cpu = np.stack([augment_one(im, spec, g) for im, g in zip(imgs, gens)])
    draws = [draw((224, 224), spec, torch.Generator().manual_seed(1000 + k)) for k in range(64)]
    x = torch.from_numpy(imgs).to(device)
    out = augment_batch(x, draws).cpu().numpy()
    diff = np.abs(cpu.astype(int) - out.astype(int))
    ok = diff.mean() < 2.0 and (diff > 10).mean() < 0.03
    full = [draw((224, 224), AugmentSpec(acquisition=True), torch.Generator().manual_seed(k)) for k in range(64)]
    augment_batch(x, full)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        augment_batch(x, full)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = reps * 64 / (time.perf_counter() - t0)
    result("augment", "PASS" if ok else "FAIL",
           f"on {device} vs per-image on the CPU: mean |diff| {diff.mean():.2f} grey levels, "
           f"{100 * (diff > 10).mean():.2f}% of pixels > 10 apart (bars 2.0, 3%); augment_batch {rate:.0f} img/s at 224 px, batches of 64")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("prepare", help="phantoms and a dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=96)
    s.add_argument("--phantom-size", type=int, default=160)
    s = sub.add_parser("train", help="a short training run (under torchrun: DDP)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    s = sub.add_parser("onnx", help="export a run; ONNX Runtime CPU vs CUDA provider logits")
    s.add_argument("--run", required=True)
    s.add_argument("--device", default="cuda")
    s.add_argument("--tolerance", type=float, default=1e-2)
    s = sub.add_parser("augment", help="batched augmentation on the device vs image by image on the CPU")
    s.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    return {"prepare": prepare, "train": train, "onnx": onnx, "augment": augment}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
