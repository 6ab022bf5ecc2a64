"""Start-up benchmark: how long `covid-cxr predict --backend onnx` takes on one image, and what it imports.

Measures, each in a fresh interpreter, the median of ``--repeat`` runs of

* ``import covid_cxr`` and ``import covid_cxr.cli`` (wall time of ``python -c "import ..."``);
* ``covid-cxr --help``;
* ``covid-cxr predict --backend onnx --run RUN IMAGE`` (the whole command, model load included);

and lists the heavy packages (torch, torchvision, pandas, matplotlib, sklearn, scipy, onnx) that the
predict command had imported when it finished. ``--run`` is a run folder (or ``.onnx`` file) with an
exported model; without it an untrained 224 px DenseNet-121 is saved and exported to a temporary folder
(that needs PyTorch; the measurements themselves do not).

Usage::

    .venv/bin/python benchmarks/bench_startup.py [--run RUN_DIR] [--image IMG] [--repeat 7]

This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "pandas", "matplotlib", "sklearn", "scipy", "onnx", "onnxscript", "fastapi")


def _untrained_run(folder: Path) -> Path:
    from covid_cxr.deploy.export import export_onnx
    from covid_cxr.imaging.pixels import PreprocessSpec
    from covid_cxr.model.checkpoint import new_meta, save_checkpoint
    from covid_cxr.model.networks import build_model

    labels = ("normal", "covid")
    model = build_model(labels, weights=None)
    meta = new_meta("densenet121", labels, "covid", PreprocessSpec.for_size(224, "none"), {}, None)
    save_checkpoint(folder / "best.pt", model, meta)
    export_onnx(folder / "best.pt", folder / "model.onnx")
    return folder


def _image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = folder / "cxr.png"
    Image.fromarray(rng.integers(0, 256, (1024, 880), dtype=np.uint8)).save(path)
    return path


def _wall(argv: list[str], env: dict, repeat: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        out = proc.stdout
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="run folder or .onnx file with an exported model")
    ap.add_argument("--image", type=Path, default=None, help="image to predict (default: a 1024x880 PNG)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="covid-cxr-startup-"))
    run = args.run or _untrained_run(work)
    image = args.image or _image(work)
    env = dict(os.environ)
    py = sys.executable
    predict = ["predict", "--backend", "onnx", "--run", str(run), str(image), "--device", "cpu"]
    cases = {
        "import covid_cxr": [py, "-c", "import covid_cxr"],
        "import covid_cxr.cli": [py, "-c", "import covid_cxr.cli"],
        "covid-cxr --help": [py, "-m", "covid_cxr.cli", "--help"],
        "covid-cxr predict --backend onnx (1 image)": [py, "-m", "covid_cxr.cli", *predict],
    }
    print(f"# bench_startup: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"# model: {run}; image: {image}; median of {args.repeat} runs each, fresh interpreter per run")
    for name, argv in cases.items():
        seconds, _ = _wall(argv, env, args.repeat)
        print(f"{name:<46} {seconds * 1000:8.0f} ms")
    probe = ("import sys, json\nfrom covid_cxr.cli import main\nrc = main(sys.argv[1:])\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\nsys.exit(rc)\n")
    proc = subprocess.run([py, "-c", probe, *predict], capture_output=True, text=True, env=env)
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    print(f"heavy packages imported by predict --backend onnx: {', '.join(loaded) or 'none'}")
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
