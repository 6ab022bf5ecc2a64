"""Tests for the synthetic phantom chest X-ray generator."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.imaging.phantoms import LABELS, generate_phantoms, make_phantom, make_phantom_with_masks


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, repeated ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_labels() -> None:
    assert LABELS == ("normal", "covid")


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("size", [32, 64, 256])
def test_shapes_and_dtypes(label: str, size: int) -> None:
    image, lesion = make_phantom(label, size, np.random.default_rng(3))
    assert image.shape == (size, size) and image.dtype == np.uint8
    assert lesion.shape == (size, size) and lesion.dtype == np.bool_
    masks = make_phantom_with_masks(label, size, np.random.default_rng(3))
    assert set(masks) == {"image", "lesion_mask", "lung_mask"}
    assert masks["lung_mask"].shape == (size, size) and masks["lung_mask"].dtype == np.bool_
    # make_phantom is the same draw as make_phantom_with_masks
    np.testing.assert_array_equal(masks["image"], image)
    np.testing.assert_array_equal(masks["lesion_mask"], lesion)


@pytest.mark.parametrize("label", LABELS)
def test_deterministic_for_seed_and_varies_between_seeds(label: str) -> None:
    a, ma = make_phantom(label, 128, np.random.default_rng(42))
    b, mb = make_phantom(label, 128, np.random.default_rng(42))
    c, _ = make_phantom(label, 128, np.random.default_rng(43))
    assert a.tobytes() == b.tobytes()
    assert ma.tobytes() == mb.tobytes()
    assert a.tobytes() != c.tobytes()
    # successive draws from one generator differ too
    rng = np.random.default_rng(0)
    first, _ = make_phantom(label, 128, rng)
    second, _ = make_phantom(label, 128, rng)
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1.0


def test_image_looks_like_a_chest_xray() -> None:
    """Dark lungs inside a brighter torso, dark background at the side edges, sane dynamic range."""
    rng = np.random.default_rng(5)
    for label in LABELS:
        for _ in range(5):
            out = make_phantom_with_masks(label, 128, rng)
            img = out["image"].astype(float)
            lungs = out["lung_mask"]
            assert 0.12 < lungs.mean() < 0.45
            h = img.shape[1] // 2
            assert lungs[:, :h].any() and lungs[:, h:].any()
            mediastinum = img[40:90, 60:68].mean()
            assert img[lungs].mean() < mediastinum - 30
            side_edges = np.concatenate([img[40:100, :3].ravel(), img[40:100, -3:].ravel()])
            assert side_edges.mean() < img[lungs].mean()
            assert img.std() > 25
            assert (img >= 250).mean() < 0.05


@pytest.mark.parametrize("size", [32, 64, 256])
def test_lesion_masks(size: int) -> None:
    rng = np.random.default_rng(11)
    for _ in range(8):
        normal = make_phantom_with_masks("normal", size, rng)
        assert not normal["lesion_mask"].any()
        covid = make_phantom_with_masks("covid", size, rng)
        lesion, lungs = covid["lesion_mask"], covid["lung_mask"]
        h = size // 2
        assert lesion[:, :h].any(), "no opacity in the image's left half"
        assert lesion[:, h:].any(), "no opacity in the image's right half"
        assert (lesion & lungs).sum() > 0.9 * lesion.sum()


def test_covid_and_normal_differ_only_by_lesions_for_the_same_rng_state() -> None:
    for seed in range(5):
        normal = make_phantom_with_masks("normal", 256, np.random.default_rng(seed))
        covid = make_phantom_with_masks("covid", 256, np.random.default_rng(seed))
        np.testing.assert_array_equal(normal["lung_mask"], covid["lung_mask"])
        diff = covid["image"].astype(int) - normal["image"].astype(int)
        near_lungs = _dilate(normal["lung_mask"], 10)  # the soft lung border is a few pixels wide
        assert not np.any(diff[~near_lungs]), "class difference outside the lungs"
        lesion = covid["lesion_mask"]
        # opacities are clearly visible but do not saturate
        assert diff[lesion].mean() > 15
        assert diff[lesion].mean() > diff[normal["lung_mask"] & ~lesion].mean() + 5
        assert (covid["image"][lesion] >= 250).mean() < 0.01


def test_covid_brighter_inside_lungs_on_average() -> None:
    rng = np.random.default_rng(2024)
    means: dict[str, list[float]] = {label: [] for label in LABELS}
    for _ in range(20):
        for label in LABELS:
            out = make_phantom_with_masks(label, 128, rng)
            means[label].append(float(out["image"][out["lung_mask"]].mean()))
    assert np.mean(means["covid"]) > np.mean(means["normal"]) + 5


def test_opacities_survive_downsampling_to_64px() -> None:
    diffs = []
    for seed in range(6):
        normal = make_phantom_with_masks("normal", 256, np.random.default_rng(seed))
        covid = make_phantom_with_masks("covid", 256, np.random.default_rng(seed))
        small_n = np.asarray(Image.fromarray(normal["image"]).resize((64, 64), Image.BILINEAR), dtype=float)
        small_c = np.asarray(Image.fromarray(covid["image"]).resize((64, 64), Image.BILINEAR), dtype=float)
        diffs.append((small_c - small_n).max())
    assert min(diffs) > 20


def test_rejects_bad_arguments_for_make_phantom() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_phantom("pneumonia", 64, rng)
    with pytest.raises(ValueError):
        make_phantom("covid", 31, rng)
    with pytest.raises(ValueError):
        make_phantom_with_masks("normal", 16, rng)


def test_generate_phantoms_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "phantoms"
    paths = generate_phantoms(out, n_per_class=3, size=64, seed=7)
    expected = [
        out / label / f"synthetic-phantom-{label}-{i:04d}.png" for label in LABELS for i in range(3)
    ]
    assert paths == expected
    for label in LABELS:
        assert sorted(p.name for p in (out / label).iterdir()) == [
            f"synthetic-phantom-{label}-{i:04d}.png" for i in range(3)
        ]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.mode == "L"
            assert im.size == (64, 64)
    readme = (out / "README.txt").read_text(encoding="utf-8").lower()
    assert "synthetic" in readme and "phantom" in readme
    assert "not real patients" in readme
    assert "research" in readme and "demo" in readme
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "covid", "normal"]


def test_generate_phantoms_is_deterministic(tmp_path: Path) -> None:
    a = generate_phantoms(tmp_path / "a", n_per_class=2, size=48, seed=1)
    b = generate_phantoms(tmp_path / "b", n_per_class=2, size=48, seed=1)
    c = generate_phantoms(tmp_path / "c", n_per_class=2, size=48, seed=2)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    assert all(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(a, c))
    # all written images differ from each other
    assert len({p.read_bytes() for p in a}) == len(a)
    # a larger run only adds images: the first ones are unchanged
    more = generate_phantoms(tmp_path / "more", n_per_class=3, size=48, seed=1)
    by_name = {p.name: p for p in more}
    for pa in a:
        assert by_name[pa.name].read_bytes() == pa.read_bytes()


def test_generated_pngs_round_trip(tmp_path: Path) -> None:
    paths = generate_phantoms(tmp_path, n_per_class=1, size=40, seed=3)
    image, _ = make_phantom("normal", 40, np.random.default_rng([3, 0, 0]))
    with Image.open(paths[0]) as im:
        np.testing.assert_array_equal(np.asarray(im), image)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_per_class": 0},
        {"n_per_class": -2},
        {"n_per_class": 2, "size": 31},
        {"n_per_class": 2, "size": 0},
        {"n_per_class": 2, "seed": -1},
    ],
)
def test_generate_phantoms_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_phantoms(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_generation_is_fast() -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(40):
        make_phantom(LABELS[i % 2], 256, rng)
    elapsed = time.perf_counter() - start
    # ~0.8 s on a loaded 2-core machine; the bar only catches an accidental slow path (e.g. a per-pixel loop,
    # 100x slower), not load
    assert elapsed < 30.0, f"{elapsed:.2f} s for 40 images"


def test_phantoms_can_carry_their_true_lung_masks_where_a_folder_source_finds_them(tmp_path) -> None:
    import pandas as pd

    from covid_cxr.data import manifest
    from covid_cxr.data.options import DataConfig
    from covid_cxr.imaging.lung_masks import check_lungs, mask_from_file_values
    from covid_cxr.imaging.phantoms import generate_phantoms, make_phantom_with_masks

    plain = generate_phantoms(tmp_path / "plain", 4, size=64, seed=3)
    with_masks = generate_phantoms(tmp_path / "masked", 4, size=64, seed=3, masks=True)
    for a, b in zip(plain, with_masks):  # the same images either way
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    first = with_masks[0]
    mask = mask_from_file_values(np.asarray(Image.open(first.parent / "masks" / first.name)))
    truth = make_phantom_with_masks("normal", 64, np.random.default_rng([3, 0, 0]))["lung_mask"]
    assert np.array_equal(mask, truth) and check_lungs(mask).plausible
    manifest.build(DataConfig(sources=(("folder", str(tmp_path / "masked")),), out=str(tmp_path / "ds"),
                              test_per_class=1, val_fraction=0.25, train_size=8, workers=1, progress=False,
                              dedup=False))
    rows = pd.read_csv(tmp_path / "ds" / "manifest.csv")
    assert len(rows) == 8 and (rows["mask_path"] == rows["path"].str.replace("/", "/masks/", n=1)).all()
