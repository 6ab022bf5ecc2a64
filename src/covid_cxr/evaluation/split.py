"""A run's model and one manifest split's pixels, as evaluate, audit and the int8 check all need them.

Running a model is not reading a dataset: :mod:`covid_cxr.data.dataset` reads the folder, this module brings the
model and the pixels of one split together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr.data.dataset import Dataset, read_dataset
from covid_cxr.errors import DatasetError
from covid_cxr.model.inference import Predictor, load_predictor
from covid_cxr.paths import RunDir

ALL = "all"
"""The ``--split`` that takes every image of the task's classes, whatever its manifest split."""


@dataclass
class SplitData:
    """A run's model and one manifest split's pixels, as evaluate and audit both need them."""

    predictor: Predictor
    """The model (PyTorch backend)."""
    run: RunDir
    dataset: Dataset
    split: str
    rows: pd.DataFrame
    pixels: np.ndarray
    targets: np.ndarray
    lungs: list | None = None
    """With a lung-view model, each image's lung verdict (its pixels are the lung view): pass it to
    ``predictor.outputs``."""


def load_split(run: str | Path, split: str, data: str | None = None, checkpoint: str = "best", device: str = "auto",
               workers: int | None = None, source_roots=None, progress: bool = False) -> SplitData:
    """Load a run's checkpoint and the model pixels of one split of its dataset (or of ``data``).

    ``split`` ``all`` takes every image whose target is one of the model's classes, whatever its split (``unused``
    included): a hospital's own dataset is measured as a whole. Every image is loaded; an unreadable one stops with
    its name.

    Raises:
        RunError, CheckpointError: no usable checkpoint. DatasetError: no dataset, labels that differ from the
            model's, or an empty split.
    """
    predictor = load_predictor(run, "torch", device, checkpoint)
    run_dir = predictor.run
    ds = read_dataset(run_dir.dataset(data), source_roots)
    if tuple(ds.labels) != tuple(predictor.meta.labels):
        raise DatasetError(f"{ds.dir.root} has labels {ds.labels} but the model predicts {list(predictor.meta.labels)}; "
                           "pass --data with a dataset of the same task")
    rows = ds.rows(tuple(sorted(set(ds.df["split"]))) if split == ALL else split)
    if rows.empty:
        which = "" if split == ALL else f"{split!r} "
        raise DatasetError(f"{ds.dir.manifest} has no {which}images of the classes {', '.join(ds.labels)}")
    pixels, lungs = ds.pixels_and_lungs(rows, predictor.meta.preprocess, workers=workers, progress=progress,
                                        lungs=predictor.lung_masker())
    return SplitData(predictor, run_dir, ds, split, rows, pixels, ds.targets(rows), lungs)
