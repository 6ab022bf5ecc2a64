"""PyTorch datasets and samplers over a manifest split, shared by training and by users' own loops.

Images are decoded once per run into an in-memory stack of model pixels (``Dataset.pixels``: from
the dataset's cache where it has them), so epochs do not decode full-resolution files again.
Randomness (shuffling, balanced sampling, augmentation) is a pure function of (seed, epoch, index):
results do not depend on the number of workers or on resuming, and each rank of a multi-process run
draws its own shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from covid_cxr.imaging.augment import AugmentSpec, augment, augment_batch, draw
from covid_cxr.imaging.pixels import PreprocessSpec, finish, standardize_intensity


def sample_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StackDataset(Dataset):
    """(input, target, index) samples from a (N, S, S) uint8 stack of model pixels.

    Without augmentation a sample's input is exactly :func:`covid_cxr.imaging.pixels.finish` of its pixels, the
    input every inference path gives the model; with it, :func:`covid_cxr.imaging.augment.augment` runs first.
    With ``pixels_only`` a sample is its (S, S) uint8 model pixels, untouched: :class:`BatchAugment` augments
    and finishes whole batches on the training device instead.
    """

    def __init__(self, pixels: np.ndarray, targets: np.ndarray, spec: PreprocessSpec,
                 augment_spec: AugmentSpec | None = None, seed: int = 0, pixels_only: bool = False):
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (spec.size, spec.size):
            raise ValueError(f"expected a (N, {spec.size}, {spec.size}) uint8 stack, got {pixels.dtype} {pixels.shape}")
        if len(pixels) != len(targets):
            raise ValueError("pixels and targets differ in length")
        self.pixels = pixels
        self.targets = np.asarray(targets, dtype=np.int64)
        self.spec = spec
        self.augment_spec = augment_spec
        self.seed = seed
        self.epoch = 0
        self.pixels_only = pixels_only
        if pixels_only and augment_spec is not None:
            raise ValueError("pixels_only samples are not augmented here; give the AugmentSpec to BatchAugment")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before iterating, like DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = self.pixels[i]
        if self.pixels_only:
            return torch.from_numpy(np.ascontiguousarray(x)), int(self.targets[i]), i
        if self.augment_spec is not None:
            x = augment(x, self.augment_spec, sample_generator(self.seed, self.epoch, i))
        return torch.from_numpy(finish(x, self.spec)), int(self.targets[i]), i


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation in one epoch: the same wherever and however it is applied."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def finish_tensor(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """:func:`covid_cxr.imaging.pixels.finish` of a (B, S, S) uint8 batch on its device: (B, C, S, S) float32, the same
    numbers (the same float32 operations). Intensity standardisation other than 'none' runs on the CPU (numpy,
    the one implementation), the rest on the device."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3:
        raise ValueError(f"finish_tensor expects (B, S, S) uint8 pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if spec.intensity != "none":
        pixels = torch.from_numpy(standardize_intensity(pixels.cpu().numpy(), spec)).to(pixels.device)
    x = pixels.to(torch.float32) / 255.0
    x = x.unsqueeze(1).expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class BatchAugment:
    """Training augmentation of whole batches on the training device, then stages 3-4 there.

    Each sample's parameters come from the same generator as in :class:`StackDataset` (seed, epoch, index), so a
    sample is transformed the same way whichever batch, rank or loader worker it comes through; the pixel
    operations are :func:`covid_cxr.imaging.augment.augment_batch` (tensor operations: a GPU does in one call what CPU
    workers do image by image).
    """

    def __init__(self, spec: PreprocessSpec, augment_spec: AugmentSpec, seed: int):
        self.spec, self.augment_spec, self.seed = spec, augment_spec, seed

    def __call__(self, pixels: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, S, S) uint8 model pixels of the samples ``indices`` -> (B, C, S, S) float32 network input."""
        shape = (int(pixels.shape[1]), int(pixels.shape[2]))
        draws = [draw(shape, self.augment_spec, sample_generator(self.seed, epoch, int(i))) for i in indices.tolist()]
        return finish_tensor(augment_batch(pixels, draws), self.spec)


class EpochSampler(Sampler[int]):
    """Shuffled (or balanced, with replacement) indices for one rank, reproducible per epoch.

    Args:
        targets: class index per sample.
        seed: seed of the order.
        strata: ``None`` (a permutation), or a stratum per sample (class, or source x class): each epoch
            draws strata equally often, with replacement within each.
        rank, world_size: this process's shard; every rank yields the same count, and together the
            shards cover the epoch (padded by repeating the first indices).
        shuffle: permute (False: dataset order, for evaluation).
    """

    def __init__(self, targets: np.ndarray, seed: int, strata: np.ndarray | None = None, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.targets = np.asarray(targets)
        self.strata = None if strata is None else np.asarray(strata)
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = -(-len(self.targets) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """All ranks' indices of this epoch (rank r takes every world_size-th, from r)."""
        n = len(self.targets)
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, 7919))
        if self.strata is not None:
            _, inverse, counts = np.unique(self.strata, return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse]
            return rng.choice(n, size=self.per_rank * self.world_size, replace=True, p=weights / weights.sum())
        idx = rng.permutation(n) if self.shuffle else np.arange(n)
        pad = self.per_rank * self.world_size - n
        return np.concatenate([idx, idx[:pad]]) if pad > 0 else idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def worker_init(worker_id: int) -> None:
    """One thread per DataLoader worker: augmentation is light, and oversubscribed threads slow down the
    training process on small CPUs."""
    torch.set_num_threads(1)


class ManifestDataset(Dataset):
    """A manifest split as a ``torch.utils.data.Dataset`` of ``(image tensor, class index)``, for your own loops.

    The pixels are exactly those covid-cxr trains and predicts on (the dataset's cache, the same pixel
    pipeline); with ``augment=True`` the training augmentation is applied (seeded by ``seed``, the epoch
    set with :meth:`set_epoch`, and the index).

    Args:
        dataset_dir: folder written by ``covid-cxr data build``.
        split: ``train``, ``val`` or ``test``.
        image_size: side of the square input.
        augment: apply training augmentation.
        intensity: ``none``, ``equalize`` or ``clahe`` (stage 3 of the pixel pipeline).
        seed: augmentation seed.
        source_roots: ``{source: folder}`` for sources whose images moved.
        spec: a model's :class:`~covid_cxr.imaging.pixels.PreprocessSpec` (``predictor.meta.preprocess``): exactly the
            pixels that model sees (overrides ``image_size`` and ``intensity``).
        lungs: for a model with a lung view (``spec.lung_view``), its segmenter: ``predictor.lung_masker()``.

    Attributes:
        labels: class names in index order. rows: the manifest rows (a DataFrame). spec: the PreprocessSpec.
    """

    def __init__(self, dataset_dir: str | Path, split: str, image_size: int = 224, augment: bool = False,
                 intensity: str = "none", seed: int = 0, source_roots: dict | None = None,
                 spec: PreprocessSpec | None = None, lungs=None):
        from covid_cxr.data.dataset import read_dataset

        ds = read_dataset(dataset_dir, source_roots)
        self.labels = ds.labels
        self.rows = ds.rows(split)
        self.spec = spec if spec is not None else PreprocessSpec.for_size(image_size, intensity)
        self._inner = StackDataset(ds.pixels(self.rows, self.spec, lungs=lungs), ds.targets(self.rows), self.spec,
                                   AugmentSpec() if augment else None, seed)

    def set_epoch(self, epoch: int) -> None:
        self._inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y, _ = self._inner[i]
        return x, y
