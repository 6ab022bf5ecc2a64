"""The lung segmenter on real X-rays: trained on the OpenIST expert masks, measured on held-out patients, then
applied to COVID-19 films of other collections (other hospitals, scanners and figure pipelines) and to lateral films,
whose masks must be judged implausible.

    python benchmarks/bench_lungs.py --data-root ../shared/data/cxr --work /tmp/bench-lungs [--epochs 30 --size 256]

Steps (each through the CLI, as a user runs them):
1. ``covid-cxr data build --source openist=...`` (the images with lung masks);
2. ``covid-cxr lungs train`` (Dice and IoU with patient-bootstrap CIs on the held-out patients);
3. ``covid-cxr lungs predict`` on ``--per-source`` COVID-19 frontal films of each other collection and on every
   Cohen lateral (``L``) film; prints how many masks were judged plausible per group, and writes a contact sheet
   (``sheet.png``) of overlays.

OpenIST has no license: it is used here to measure, never shipped. Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

GROUPS = {
    # group name: (source folder, inventory filter)
    "cohen covid (frontal)": ("cohen-covid-chestxray-dataset", lambda r: r["label_as_in_source"].startswith("COVID-19")
                              and r["view"] in ("PA", "AP", "AP Supine")),
    "cxnet covid": ("covid-cxnet", lambda r: True),
    "radiography covid": ("covid19-radiography-database", lambda r: r["label_as_in_source"] == "COVID"),
    "radiography normal": ("covid19-radiography-database", lambda r: r["label_as_in_source"] == "Normal"),
    "cohen lateral (L)": ("cohen-covid-chestxray-dataset", lambda r: r["view"] == "L"),
}


def _cli(*args: str) -> str:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "covid_cxr.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"covid-cxr {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    print(f"  covid-cxr {' '.join(args[:2])}: {time.perf_counter() - t0:.0f} s", flush=True)
    return done.stdout


def _pick(root: Path, per_source: int, seed: int) -> dict[str, list[Path]]:
    rows = list(csv.DictReader(open(root / "inventory.csv", encoding="utf-8")))
    rng = np.random.default_rng(seed)
    picked = {}
    for name, (source, keep) in GROUPS.items():
        found = [root / r["relative_path"] for r in rows if r["source"] == source and keep(r)]
        found = [p for p in found if p.is_file()]
        if "lateral" not in name and len(found) > per_source:
            found = [found[i] for i in sorted(rng.choice(len(found), per_source, replace=False))]
        picked[name] = found
    return picked


def _sheet(rows: list[tuple[str, Path]], out: Path, tile: int = 160, columns: int = 8) -> None:
    """One row per group (in order), up to ``columns`` overlays each."""
    groups = list(dict.fromkeys(name for name, _ in rows))
    sheet = Image.new("RGB", (columns * tile, len(groups) * tile), "black")
    for g, name in enumerate(groups):
        for k, path in enumerate([p for n, p in rows if n == name][:columns]):
            img = Image.open(path).convert("RGB")
            img.thumbnail((tile, tile))
            sheet.paste(img, (k * tile, g * tile))
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("COVID_CXR_TEST_DATA", "../shared/data/cxr"))
    ap.add_argument("--work", default="/tmp/bench-lungs")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--per-source", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root, work = Path(args.data_root), Path(args.work)
    if not (root / "inventory.csv").is_file():
        sys.exit(f"{root}: no inventory.csv; pass --data-root with the real data")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # OpenIST carries the masks; COVID-CXNet gives the dataset its second class (a build needs both)
    _cli("data", "build", "--source", f"openist={root / 'sources' / 'openist-chest-xray'}",
         "--source", f"cxnet={root / 'sources' / 'covid-cxnet'}", "--out", str(work / "ds"), "--test-per-class", "20",
         "--no-progress")
    _cli("lungs", "train", "--data", str(work / "ds"), "--out", str(work / "lungs"), "--epochs", str(args.epochs),
         "--image-size", str(args.size), "--seed", str(args.seed))
    metrics = json.loads((work / "lungs" / "lungs_metrics.json").read_text())
    print(f"held-out Dice {metrics['dice']['mean']:.3f} (95% CI {metrics['dice']['ci95'][0]:.3f}-"
          f"{metrics['dice']['ci95'][1]:.3f}), IoU {metrics['iou']['mean']:.3f} (95% CI {metrics['iou']['ci95'][0]:.3f}-"
          f"{metrics['iou']['ci95'][1]:.3f}); {metrics['dice']['images']} images of {metrics['dice']['patients']} "
          f"patients; protocol: {metrics['protocol']}")
    overlays = []
    print(f"\n{'group':28s} {'images':>6s} {'plausible':>9s}  reasons when not")
    for name, files in _pick(root, args.per_source, args.seed).items():
        folder = work / "in" / name.replace(" ", "_").replace("(", "").replace(")", "")
        folder.mkdir(parents=True)
        for k, f in enumerate(files):
            shutil.copy2(f, folder / f"{k:03d}{f.suffix.lower()}")
        out = work / "masks" / folder.name
        _cli("lungs", "predict", str(folder), "--lungs", str(work / "lungs"), "--out", str(out))
        rows = list(csv.DictReader(open(out / "lungs.csv")))
        good = sum(r["plausible"] == "True" for r in rows)
        reasons = sorted({r["reason"] for r in rows if r["plausible"] == "False"})
        print(f"{name:28s} {len(rows):6d} {good:9d}  {'; '.join(reasons)[:160]}")
        overlays += [(name, out / r["overlay"]) for r in rows[:8] if r["overlay"]]
    _sheet(overlays, work / "sheet.png")
    print(f"\ncontact sheet of overlays (one row per group, in the order above): {work / 'sheet.png'}")


if __name__ == "__main__":
    main()
