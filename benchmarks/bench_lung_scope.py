"""Who does a lung check turn away? The share of a dataset's images whose lung mask is judged plausible, per source
and class, with Wilson 95% CIs; and how much of each image a lung-view crop keeps.

A model that carries a segmenter calls an image without two plausible lung fields out of scope (``train --lungs``),
and a lung view (``--lung-view crop|mask``) crops nothing from it. If the check turned away COVID-19 films (dense
consolidation hides lung borders) more often than normal ones, a screening tool would miss the sickest patients
silently. This measures it on a built dataset, with the segmenter the model would carry:

    python benchmarks/bench_lung_scope.py --data /tmp/cvbench/dataset-seven --lungs /tmp/bench-lungs/lungs

Masks are read from (and written to) the dataset's mask cache, as training does. Prints the machine it ran on.
Research use only, not a diagnostic device.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a built dataset (covid-cxr data build)")
    ap.add_argument("--lungs", required=True, help="the segmenter (lungs.pt from covid-cxr lungs train)")
    args = ap.parse_args()

    import torch

    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.evaluation.metrics import wilson_ci
    from covid_cxr.imaging.cache import MaskCache
    from covid_cxr.imaging.lung_masks import check_lungs, lung_box
    from covid_cxr.imaging.pixels import PreprocessSpec
    from covid_cxr.model.lungs import TorchLungMasker, load_segmenter

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    seg = load_segmenter(args.lungs)
    masker = TorchLungMasker(seg.model, "cpu", seg.checksum)
    ds = read_dataset(args.data)
    rows = ds.df[ds.df["target"].isin(ds.labels)].reset_index(drop=True)
    spec = PreprocessSpec(size=64, lung_view="crop")
    t0 = time.perf_counter()
    _, checks = ds.pixels_and_lungs(rows, spec, lungs=masker)
    seconds = time.perf_counter() - t0
    cache = ds.cache()
    store = MaskCache(cache.root, masker.key, masker.size, spec.base_short_side) if cache is not None else None
    kept = []
    for sha, check in zip(rows["sha256"], checks):
        mask = store.get(sha) if store is not None else None
        if mask is None or not check.plausible:
            kept.append(np.nan)
            continue
        top, bottom, left, right = lung_box(mask)
        kept.append((bottom - top) * (right - left))
    rows = rows.assign(plausible=[c.plausible for c in checks], reason=[c.reason for c in checks], kept=kept)
    print(f"dataset {ds.dir.root}: {len(rows)} images of {', '.join(ds.labels)}; segmenter {args.lungs} "
          f"(held-out Dice {seg.meta.val_metrics.get('dice')}); {seconds:.0f} s for the masks "
          f"(cached ones are read, not recomputed)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}\n")
    print("| source | class | images | two plausible lung fields (95% CI) | crop keeps of the image (median) "
          "| most common reason when not |")
    print("|---|---|---|---|---|---|")
    for (source, target), g in rows.groupby(["source", "target"]):
        k, n = int(g["plausible"].sum()), len(g)
        lo, hi = wilson_ci(k, n) or (float("nan"), float("nan"))
        reasons = Counter(r.split(" (")[0] for r in g.loc[~g["plausible"], "reason"])
        top = f"{reasons.most_common(1)[0][0]} ({reasons.most_common(1)[0][1]})" if reasons else "-"
        kept_median = g["kept"].median()
        print(f"| {source} | {target} | {n} | {k / n:.2f} ({lo:.2f}-{hi:.2f}) | "
              f"{'n/a' if kept_median != kept_median else f'{kept_median:.0%}'} | {top} |")
    for target, g in rows.groupby("target"):
        k, n = int(g["plausible"].sum()), len(g)
        lo, hi = wilson_ci(k, n)
        print(f"| all | {target} | {n} | {k / n:.2f} ({lo:.2f}-{hi:.2f}) | {g['kept'].median():.0%} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
