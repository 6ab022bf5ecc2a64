"""Shared fixtures: small synthetic images and phantom datasets for unit tests, and the path of
the real chest X-rays for integration tests (skipped with a reason when absent)."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (as the CLI sets it): the fixtures call the library directly, and
# on a loaded 2-core machine spinning threads made a training fixture ~10x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from orthanc import fresh_orthanc, orthanc  # noqa: F401  (fixtures: a real PACS, tests/orthanc.py)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO.parent / "shared" / "data" / "cxr"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: results that depend on reduction order are fixed, and a busy 2-core machine is not
    oversubscribed (measured: a training fixture took 65 s with 2 threads under load, 4.5 s with 1)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the internet: weights are never downloaded."""
    monkeypatch.setenv("COVID_CXR_OFFLINE", "1")


def real_data_root() -> Path | None:
    root = Path(os.environ.get("COVID_CXR_TEST_DATA", DEFAULT_REAL_DATA))
    return root if (root / "inventory.csv").is_file() and (root / "sources").is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real chest X-ray collection (../shared/data/cxr or $COVID_CXR_TEST_DATA)."""
    root = real_data_root()
    if root is None:
        pytest.skip(f"real chest X-rays not found at {os.environ.get('COVID_CXR_TEST_DATA', DEFAULT_REAL_DATA)} "
                    "(set COVID_CXR_TEST_DATA to the folder holding inventory.csv and sources/)")
    return root


REAL_SOURCES = {
    "cohen": "cohen-covid-chestxray-dataset",
    "actualmed": "actualmed-covid-chestxray-dataset",
    "figure1": "figure1-covid-chestxray-dataset",
    "radiography": "covid19-radiography-database",
    "mooney": "chest-xray-pneumonia",
    "cxnet": "covid-cxnet",
    "openist": "openist-chest-xray",
}
"""covid-cxr source name -> folder under sources/ in the real collection."""


def real_inventory(real_data: Path) -> pd.DataFrame:
    """inventory.csv's rows for the collections covid-cxr has a reader for (:data:`REAL_SOURCES`), as strings.

    The real collection also holds collections no reader reads yet (covid-cxnet, openist-chest-xray); a test about
    what ``data build`` does with the sources it reads must not count their images."""
    inv = pd.read_csv(real_data / "inventory.csv", dtype=str, keep_default_na=False)
    return inv[inv["source"].isin(REAL_SOURCES.values())].reset_index(drop=True)


def make_gray(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A small random grayscale image (H, W) uint8 with some structure."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / (3 + seed % 5)) * np.cos(yy / (4 + seed % 3))
    return np.clip(base + rng.normal(0, 20, size), 0, 255).astype(np.uint8)


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "L") -> Path:
    """Write a small synthetic image; the file format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_gray(seed, size))
    if mode != "L":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A built dataset of 64 px phantoms (no near-duplicate removal: phantoms share one template,
    so distinct phantoms can look like copies to the detector): 60 per class (train 36+36ish, val, test 12 per class)."""
    from covid_cxr.data.manifest import build
    from covid_cxr.data.options import DataConfig
    from covid_cxr.imaging.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    src = root / "synthetic-phantoms"
    generate_phantoms(src, 60, size=64, seed=1)
    out = root / "dataset"
    build(DataConfig(sources=(("folder", str(src)),), out=str(out), test_per_class=12, val_fraction=0.15,
                     train_size=200, seed=0, workers=1, progress=False, dedup=False))
    return out


@pytest.fixture(scope="session")
def tiny_run(phantom_dataset, tmp_path_factory) -> Path:
    """A model trained for one short epoch at 32 px from scratch (for evaluate/predict plumbing tests)."""
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    out = tmp_path_factory.mktemp("runs") / "tiny"
    run(TrainConfig(data=str(phantom_dataset), out=str(out), epochs=1, image_size=32, batch_size=16,
                    weights="none", progress=False))
    return out


@pytest.fixture(scope="session")
def learned_phantom_run(tmp_path_factory) -> Path:
    """A model trained from scratch on phantoms until it has learned them (8 epochs at 64 px, ~30 s).

    Shared by the learning test and by tests that need a model which looks at the lesions
    (explanations, shortcut audit). Layout: <root>/synthetic-phantoms, <root>/dataset, <root>/run.
    """
    from covid_cxr.data.manifest import build
    from covid_cxr.data.options import DataConfig
    from covid_cxr.imaging.phantoms import generate_phantoms
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    root = tmp_path_factory.mktemp("learned")
    src = root / "synthetic-phantoms"
    generate_phantoms(src, 160, size=128, seed=11)
    data = root / "dataset"
    build(DataConfig(sources=(("folder", str(src)),), out=str(data), test_per_class=40, val_fraction=0.15,
                     train_size=400, seed=0, workers=1, progress=False, dedup=False))
    out = root / "run"
    run(TrainConfig(data=str(data), out=str(out), epochs=8, image_size=64, batch_size=32, weights="none",
                    lr=2e-3, warmup_epochs=0.5, patience=0, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_exported(tiny_run, tmp_path_factory) -> Path:
    """A copy of tiny_run's files with RUN/model.onnx + model.json exported (one ONNX export for the session)."""
    import shutil

    from covid_cxr.deploy.export import export_onnx

    run = tmp_path_factory.mktemp("exported") / "run"
    run.mkdir()
    for name in ("best.pt", "config.yaml", "metrics.jsonl", "calibration.json"):
        shutil.copy2(tiny_run / name, run / name)
    export_onnx(run / "best.pt", run / "model.onnx")
    return run


# ----------------------------------------------------------------------------- deterministic kills (tests/hooks)

HOOKS = Path(__file__).resolve().parent / "hooks"
STOP_BEFORE_RENAME = "COVID_CXR_TEST_STOP_BEFORE_RENAME"
"""Read by tests/hooks/sitecustomize.py: the file name whose rename into place stops the process (SIGSTOP)."""


def stop_before_rename(env: dict, name: str) -> dict:
    """``env`` for a subprocess that stops itself just before renaming a finished temporary file called ``name``
    into place, so a test's kill -9 lands inside that write every time."""
    env = dict(env)
    env["PYTHONPATH"] = str(HOOKS) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[STOP_BEFORE_RENAME] = name
    return env


def is_stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


@pytest.fixture(scope="session")
def phantom_segmenter(tmp_path_factory) -> Path:
    """lungs.pt: the segmenter trained on 48 phantoms (Dice >= 0.9 held out, see tests/test_lungs.py), saved by the writer."""
    import torch

    from covid_cxr.imaging.lung_masks import lung_input, resize_mask
    from covid_cxr.imaging.phantoms import make_phantom_with_masks
    from covid_cxr.model.checkpoint import new_meta, save_checkpoint
    from covid_cxr.model.lungs import LUNG_ARCH, LUNG_LABELS, lung_spec
    from covid_cxr.training.lungs import fit, split_groups
    from covid_cxr.training.options import LungsTrainConfig

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pairs = [make_phantom_with_masks(("normal", "covid")[i % 2], 128, rng) for i in range(48)]
    images, masks = [p["image"] for p in pairs], [p["lung_mask"] for p in pairs]
    x = np.stack([lung_input(g, 64) for g in images])
    y = np.stack([resize_mask(m, (64, 64)) for m in masks])
    val = split_groups([str(i) for i in range(48)], 0.25, 0)
    cfg = LungsTrainConfig(data="unused", out="unused", image_size=64, epochs=12, batch_size=8, width=8, device="cpu")
    model, _ = fit(x, y, val, cfg, torch.device("cpu"), [m for m, v in zip(masks, val) if v])
    out = tmp_path_factory.mktemp("segmenter") / "lungs.pt"
    save_checkpoint(out, model, new_meta(LUNG_ARCH, LUNG_LABELS, "lung", lung_spec(64), {"width": 8}, None)
                    .replace(val_metrics={"dice": 0.93}))
    return out
