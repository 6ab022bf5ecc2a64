"""The dataset card: ``DATASET_DIR/dataset_card.md`` and its pictures.

Written by ``covid-cxr data build`` from the manifest and the ingest report, so a reader sees
what went in, what was left out and why, and which confounders remain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from covid_cxr import DISCLAIMER
from covid_cxr.figures import save_figure
from covid_cxr.files import atomic_write
from covid_cxr.imaging.images import load_image
from covid_cxr.imaging.pixels import resize_square

SPLIT_ORDER = ("train", "val", "test")


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def class_distribution_png(df: pd.DataFrame, labels: list[str], path: Path) -> None:
    """Bar chart of images per split and class (the study's train-dataset picture, for every split)."""
    splits = [s for s in ("train", "val", "test") if (df["split"] == s).any()]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        counts = [int(((df["split"] == s) & (df["target"] == lab)).sum()) for s in splits]
        bars = ax.bar(np.arange(len(splits)) + j * width, counts, width, label=f"{j}: {lab}")
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(np.arange(len(splits)) + width * (len(labels) - 1) / 2, splits)
    ax.set_ylabel("images")
    ax.set_title("images per split and class (patient-level split)", fontsize=9)
    ax.legend()
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path)


def samples_png(images: dict[str, list[tuple[np.ndarray, str]]], path: Path, per_row: int = 6) -> None:
    """A grid: one row per class, each image captioned with its source."""
    rows = len(images)
    fig = Figure(figsize=(1.8 * per_row, 2.0 * rows + 0.3))
    for r, (label, items) in enumerate(images.items()):
        for c in range(per_row):
            ax = fig.add_subplot(rows, per_row, r * per_row + c + 1)
            ax.axis("off")
            if c < len(items):
                img, caption = items[c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.text(-0.1, 0.5, label, transform=ax.transAxes, rotation=90, va="center", ha="right",
                        fontsize=11, weight="bold")
    fig.tight_layout(rect=(0.02, 0.03, 1, 1))
    save_figure(fig, path)


def source_mix_png(df: pd.DataFrame, classes: list[str], path: Path) -> None:
    """Stacked bars: for each class, the share of each source (the confounder picture)."""
    used = df[(df["split"] != "unused") & (df["target"] != "")]
    sources = sorted(used["source"].unique())
    fig = Figure(figsize=(6.5, 0.9 * len(classes) + 1.8))
    ax = fig.add_subplot()
    left = np.zeros(len(classes))
    for src in sources:
        share = np.array([((used["target"] == c) & (used["source"] == src)).sum() / max(1, (used["target"] == c).sum())
                          for c in classes])
        ax.barh(classes, share, left=left, label=src)
        for y, (lft, w) in enumerate(zip(left, share)):
            if w >= 0.08:
                ax.text(lft + w / 2, y, f"{w:.0%}", ha="center", va="center", fontsize=8, color="white")
        left += share
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's images (train + val + test)")
    ax.set_title("where each class comes from: a source that dominates one class is a shortcut", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(sources), 5))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path)


def _samples(df: pd.DataFrame, classes: list[str], per_class: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    grid = {}
    for c in classes:
        rows = df[(df["target"] == c) & (df["split"] != "unused")]
        pick = rows.iloc[rng.permutation(len(rows))[:per_class]] if len(rows) else rows
        grid[c] = [(resize_square(load_image(p), 160), f"{s}\n{Path(p).name[:22]}")
                   for p, s in zip(pick["path"], pick["source"])]
    return grid


def write_card(out: Path, df: pd.DataFrame, report: dict) -> Path:
    """Write ``dataset_card.md``, ``class_distribution.png``, ``source_mix.png`` and ``samples.png`` into ``out``."""
    classes = list(report["labels"])
    class_distribution_png(df[df["target"] != ""], classes, out / "class_distribution.png")
    source_mix_png(df, classes, out / "source_mix.png")
    samples_png(_samples(df, classes), out / "samples.png")
    atomic_write(out / "dataset_card.md", render_card(df, report))
    return out / "dataset_card.md"


def render_card(df: pd.DataFrame, report: dict) -> str:
    """The card's Markdown text."""
    classes = list(report["labels"])
    p = report["protocol"]
    parts = [f"# Dataset card: {report['task']}", "", f"> {DISCLAIMER}", "",
             f"Task: {report.get('task_description', report['task'])}. Classes: "
             + ", ".join(f"{i} = {c}" for i, c in enumerate(classes)) + ".", "",
             f"Split protocol: **{p['name']}** (seed {p['seed']}). {p['description']}.", ""]
    if report["warnings"]:
        parts += ["## Warnings", ""] + [f"- **{w}**" for w in report["warnings"]] + [""]
    parts += ["## Sources", "", _md_table(
        ["source", "found (files, rows)", "not used", "in manifest", "labels in manifest", "views", "lung masks",
         "notes"],
        [[name, s["found"], s["not_used_total"], s["in_manifest"],
          ", ".join(f"{k} {v}" for k, v in s["labels_in_manifest"].items()),
          ", ".join(f"{k} {v}" for k, v in s.get("views_in_manifest", {}).items()), s.get("masks_in_manifest", 0),
          "; ".join(s["notes"])]
         for name, s in report["sources"].items()]), ""]
    parts += ["## What was left out, and why", "",
              f"{report['not_used_total']} files or metadata rows were not used (each is listed in `dropped.csv`):",
              "", _md_table(["reason", "count"], [[r, n] for r, n in report["not_used_by_reason"].items()]), "",
              "Images kept in the manifest but outside the splits (split `unused`):", "",
              _md_table(["why", "count"], [[k, v] for k, v in report["unused_in_manifest"].items()]), ""]
    nd = report.get("near_duplicates", {})
    if nd.get("enabled"):
        parts += ["## Duplicates", "", f"Method: {nd['method']}. {nd['pairs']} duplicate pairs in {nd['clusters']} "
                  "clusters; one image per cluster is kept (listed in `duplicates.csv`).", ""]
        if nd["pairs_by_source_pair"]:
            parts += [_md_table(["sources", "pairs"], [[k, v] for k, v in nd["pairs_by_source_pair"].items()]), ""]
    else:
        parts += ["## Duplicates", "", "Near-duplicate removal was switched off (`--no-dedup`): copies of one "
                  "radiograph may sit in different splits.", ""]
    if report["label_conflicts"]:
        parts += ["Label conflicts:", ""] + [f"- {n}" for n in report["label_conflicts"]] + [""]
    parts += ["## Classes by source and split", "", _split_table(df, classes), "",
              "Patients (split groups) per split: " + ", ".join(
                  f"{k} {v}" for k, v in report["patients_per_split"].items()) + ".", ""]
    if report.get("notes"):
        parts += [f"- {n}" for n in report["notes"]] + [""]
    parts += ["## Pictures", "", "![images per split and class](class_distribution.png)", "",
              "![source share per class](source_mix.png)", "", "![sample images per class](samples.png)", ""]
    return "\n".join(parts)


def _split_table(df: pd.DataFrame, classes: list[str]) -> str:
    used = df[df["split"].isin(SPLIT_ORDER) & (df["target"] != "")]
    sources = sorted(used["source"].unique())
    header = ["class", "source"] + list(SPLIT_ORDER) + ["total"]
    rows = []
    for c in classes:
        for src in sources:
            n = [int(((used["target"] == c) & (used["source"] == src) & (used["split"] == s)).sum())
                 for s in SPLIT_ORDER]
            if sum(n):
                rows.append([c, src, *n, sum(n)])
    return _md_table(header, rows)
