"""Pictures of data and results (matplotlib's object API: no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from covid_cxr import DISCLAIMER

_FOOTER = DISCLAIMER


def _save(fig: Figure, path: Path) -> None:
    fig.text(0.01, 0.005, _FOOTER, fontsize=6, color="0.4", ha="left", va="bottom")
    fig.savefig(path, dpi=110)


def confusion_matrix_png(cm: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """Counts with row-normalised shading; rows are true classes."""
    k = len(labels)
    fig = Figure(figsize=(1.6 * k + 2.4, 1.4 * k + 2.0))
    ax = fig.add_subplot()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n({norm[i, j]:.0%})", ha="center", va="center",
                    color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [f"{i}: {lab}" for i, lab in enumerate(labels)])
    ax.set_yticks(range(k), [f"{i}: {lab}" for i, lab in enumerate(labels)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)


def roc_png(targets: np.ndarray, probs: np.ndarray, labels: list[str], path: Path, title: str,
            auc_text: str) -> None:
    """ROC of the positive class (2 classes) or one curve per class (one-vs-rest)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    classes = [1] if len(labels) == 2 else range(len(labels))
    for c in classes:
        if len(np.unique(targets == c)) < 2:
            continue
        fpr, tpr, _ = roc_curve(targets == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"{labels[c]} vs rest" if len(labels) > 2 else labels[c])
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{title}\n{auc_text}", fontsize=9)
    ax.legend(loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)
