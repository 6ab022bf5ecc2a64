"""Datasets and samplers over a manifest split, shared by training and evaluation.

Images are decoded once per run into an in-memory uint8 stack at the model's input size
(:func:`covid_cxr.images.load_resized_stack`), so epochs do not decode full-resolution
files again. Randomness (shuffling, balanced sampling, augmentation) is a pure function
of (seed, epoch, index): results do not depend on the number of workers or on resuming,
and each rank of a multi-process run draws its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from covid_cxr.cache import ImageCache, load_model_pixels
from covid_cxr.transforms import AugmentSpec, PreprocessSpec, augment, normalize


def load_rows(rows: pd.DataFrame, dataset_dir: str | Path, spec: PreprocessSpec, workers: int | None = None,
              progress: bool = False) -> np.ndarray:
    """Model pixels (N, size, size) uint8 of manifest rows, from the dataset's cache where it has them.

    The cache (``DATASET_DIR/cache``, written by data build) holds preprocessing stage 1, so the
    pixels equal those of :func:`covid_cxr.transforms.preprocess` on the original file. Images not
    cached yet are decoded and added. Unreadable files raise ImageReadError naming them.
    """
    root = Path(dataset_dir) / "cache"
    cache = ImageCache(root, spec.base_short_side) if root.is_dir() else None
    return load_model_pixels(rows["path"].tolist(), rows["sha256"].tolist(), spec.size, spec.base_short_side,
                             cache=cache, workers=workers, progress=progress)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StackDataset(Dataset):
    """(image, target, index) samples from a pre-decoded (N, S, S) uint8 stack."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, spec: PreprocessSpec,
                 augment_spec: AugmentSpec | None = None, seed: int = 0):
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (spec.size, spec.size):
            raise ValueError(f"expected a (N, {spec.size}, {spec.size}) uint8 stack, got {images.dtype} "
                             f"{images.shape}")
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.spec = spec
        self.augment_spec = augment_spec
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before iterating, like DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = torch.from_numpy(self.images[i])
        if self.augment_spec is not None:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, i))
            x = augment(x, self.augment_spec, g)
        return normalize(x, self.spec), int(self.targets[i]), i


class EpochSampler(Sampler[int]):
    """Shuffled (or class-balanced, with replacement) indices for one rank, reproducible per epoch.

    Args:
        targets: class index per sample.
        balanced: draw classes equally often (with replacement) instead of a permutation.
        rank, world_size: this process's shard; every rank yields the same count.
    """

    def __init__(self, targets: np.ndarray, seed: int, balanced: bool = False, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.targets = np.asarray(targets)
        self.seed, self.balanced, self.shuffle = seed, balanced, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = -(-len(self.targets) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        n = len(self.targets)
        rng = np.random.default_rng(_seed(self.seed, self.epoch, 7919))
        if self.balanced:
            counts = np.bincount(self.targets)
            weights = 1.0 / counts[self.targets]
            return rng.choice(n, size=self.per_rank * self.world_size, replace=True, p=weights / weights.sum())
        idx = rng.permutation(n) if self.shuffle else np.arange(n)
        pad = self.per_rank * self.world_size - n
        return np.concatenate([idx, idx[:pad]]) if pad > 0 else idx

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def worker_init(worker_id: int) -> None:
    """One thread per DataLoader worker: augmentation is light, and oversubscribed
    threads slow down the training process on small CPUs."""
    torch.set_num_threads(1)
