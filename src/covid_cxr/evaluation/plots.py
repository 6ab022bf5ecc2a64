"""Pictures of results: confusion matrix, ROC curves, learning curves (matplotlib's object API: no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from covid_cxr.figures import save_figure
from covid_cxr.model.meta import class_log_odds


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
    ax.set_xticks(range(k), [f"{lab} ({i})" for i, lab in enumerate(labels)])
    ax.set_yticks(range(k), [f"{lab} ({i})" for i, lab in enumerate(labels)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path)


def roc_png(targets: np.ndarray, lp: np.ndarray, labels: list[str], positive: int | None, path: Path, title: str,
            auc_text: str, operating_point: tuple[float, float, str] | None = None, synthetic: bool = False) -> None:
    """ROC of the positive class (2 classes) or one curve per class (one-vs-rest), from log-odds.

    ``operating_point`` is (1 - specificity, sensitivity, label) of the chosen threshold, marked on the curve.
    """
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    classes = [positive if positive is not None else 1] if len(labels) == 2 else range(len(labels))
    for c in classes:
        if len(np.unique(targets == c)) < 2:
            continue
        fpr, tpr, _ = roc_curve(targets == c, class_log_odds(lp, c))
        ax.plot(fpr, tpr, label=f"{labels[c]} vs rest" if len(labels) > 2 else f"{labels[c]} (positive class)")
    if operating_point is not None:
        x, y, text = operating_point
        ax.plot([x], [y], marker="o", color="#b3261e", markersize=7, linestyle="none", label=text)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{title}\n{auc_text}", fontsize=9)
    ax.legend(loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, synthetic)


def learning_curves_png(records: list[dict], path: Path, best_epoch: int | None = None, synthetic: bool = False) -> None:
    """Training and validation loss, and validation ROC AUC, per epoch (from metrics.jsonl)."""
    fig = Figure(figsize=(8, 3.6))
    ax_loss, ax_auc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r.get("train_loss") for r in records], marker="o", markersize=3, label="training loss")
    if any(r.get("val_loss") is not None for r in records):
        ax_loss.plot(epochs, [r.get("val_loss") for r in records], marker="o", markersize=3, label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(fontsize=8)
    aucs = [r.get("val_auc") for r in records]
    if any(a is not None for a in aucs):
        ax_auc.plot(epochs, [np.nan if a is None else a for a in aucs], marker="o", markersize=3, color="tab:green")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation ROC AUC")
    ax_auc.set_ylim(0.4, 1.01)
    for ax in (ax_loss, ax_auc):
        if best_epoch:
            ax.axvline(best_epoch, color="0.6", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle("learning curves" + (f" (dotted: best epoch {best_epoch}, the saved model)" if best_epoch else ""),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, synthetic)
