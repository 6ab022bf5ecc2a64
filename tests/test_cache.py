"""Tests for covid_cxr.imaging.cache and the cache route of covid_cxr.imaging.pixels.model_pixels: cached and
uncached paths give identical model pixels, filling is incremental per short side, damaged entries
are rebuilt (never returned), unreadable or changed source files are named, and writes are atomic."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import real_inventory, write_image
from covid_cxr import errors
from covid_cxr.errors import DatasetError, ImageReadError
from covid_cxr.imaging import cache as cache_mod
from covid_cxr.imaging import pixels as pixels_mod
from covid_cxr.imaging.cache import CacheError, ImageCache
from covid_cxr.imaging.images import load_image, sha256_file
from covid_cxr.imaging.pixels import (BASE_SHORT_SIDE, PreprocessSpec, geometry, model_pixels, resize_square,
                                      shrink_short_side)

# (file name, (H, W), Pillow mode): smaller and larger than the short sides used, portrait and
# landscape, every mode load_image converts, PNG and JPEG (draft mode).
SYNTHETIC = [
    ("small.png", (48, 40), "L"),
    ("portrait.png", (300, 170), "L"),
    ("landscape.jpg", (150, 420), "L"),
    ("rgb.jpg", (333, 257), "RGB"),
    ("rgba.png", (90, 260), "RGBA"),
    ("palette.png", (200, 130), "P"),
    ("gray16.png", (270, 210), "I;16"),
    ("la.png", (64, 97), "LA"),
]


def _files(root: Path, specs=SYNTHETIC, seed: int = 0) -> tuple[list[str], list[str]]:
    paths = [str(write_image(root / name, seed=seed + i, size=size, mode=mode))
             for i, (name, size, mode) in enumerate(specs)]
    return paths, [sha256_file(Path(p)) for p in paths]


def _many(root: Path, n: int) -> tuple[list[str], list[str]]:
    specs = [(f"img{i:03d}.png", (60 + i % 7 * 11, 50 + i % 5 * 13), "L") for i in range(n)]
    return _files(root, specs)


def _spec(size: int, base: int) -> PreprocessSpec:
    return PreprocessSpec(size=size, base_short_side=base)


def _reference(paths: list[str], size: int, base: int) -> np.ndarray:
    spec = _spec(size, base)
    return np.stack([geometry(load_image(p), spec) for p in paths])


def _fill(cache: ImageCache, paths: list[str], shas: list[str], workers: int = 1) -> np.ndarray:
    """Load model pixels through the cache, storing every image it lacks (what training does)."""
    return model_pixels(paths, _spec(min(32, cache.short_side), cache.short_side), shas, cache=cache, workers=workers)


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Paths decoded from their files (stage 1) by in-process decodes, in order."""
    seen: list[str] = []
    real = pixels_mod.decode_stage1

    def counting(path, sha256, short_side):
        seen.append(str(path))
        return real(path, sha256, short_side)

    monkeypatch.setattr(pixels_mod, "decode_stage1", counting)
    return seen


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- identical pixels


# Stage 2 never starts below the input size (PreprocessSpec refuses base_short_side < size).
@pytest.mark.parametrize("size,base", [(32, 64), (64, 64), (32, 100), (64, 100), (96, 100), (96, 128)])
def test_cached_pixels_equal_uncached(tmp_path: Path, size: int, base: int) -> None:
    paths, shas = _files(tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", short_side=base)
    _fill(cache, paths, shas)
    expected = _reference(paths, size, base)
    for i, (p, sha) in enumerate(zip(paths, shas)):
        np.testing.assert_array_equal(resize_square(cache.get(sha), size), expected[i], err_msg=p)
    spec = _spec(size, base)
    np.testing.assert_array_equal(model_pixels(paths, spec, shas, cache=cache), expected)
    np.testing.assert_array_equal(model_pixels(paths, spec, shas, cache=None), expected)
    np.testing.assert_array_equal(model_pixels(paths, spec), expected)


def test_model_pixels_with_and_without_a_cache_are_identical(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _files(tmp_path / "src")
    spec = PreprocessSpec.for_size(64, "clahe")  # stage 3 is not the cache's business: same geometry
    cache = ImageCache(tmp_path / "cache", spec)
    without = model_pixels(paths, spec)
    first = model_pixels(paths, spec, shas, cache=cache)  # fills the cache
    assert len(decodes) == 2 * len(paths)
    second = model_pixels(paths, spec, shas, cache=cache)  # only from the cache
    assert len(decodes) == 2 * len(paths)
    assert without.dtype == np.uint8 and without.shape == (len(paths), 64, 64)
    np.testing.assert_array_equal(first, without)
    np.testing.assert_array_equal(second, without)


def test_entries_are_stage_one_images(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", short_side=128)
    _fill(cache, paths, shas)
    for p, sha in zip(paths, shas):
        stored = cache.get(sha)
        np.testing.assert_array_equal(stored, shrink_short_side(load_image(p), 128))
        # Plain .npy readers see the same image (the checksum trailer is ignored by np.load).
        np.testing.assert_array_equal(np.load(cache.entry_path(sha), allow_pickle=False), stored)


def test_default_short_side_matches_preprocessing(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src", [("big.png", (600, 520), "L"), ("wide.jpg", (300, 700), "RGB")])
    spec = PreprocessSpec.for_size(224)
    assert spec.base_short_side == BASE_SHORT_SIDE == 256
    cache = ImageCache(tmp_path / "cache", spec)
    assert cache.short_side == 256 and cache.dir == tmp_path / "cache" / "s256"
    assert ImageCache(tmp_path / "cache", BASE_SHORT_SIDE).dir == cache.dir
    _fill(cache, paths, shas)
    assert min(cache.get(shas[0]).shape) == 256
    np.testing.assert_array_equal(model_pixels(paths, spec, shas, cache=cache), _reference(paths, 224, 256))


def test_parallel_fill_equals_serial(tmp_path: Path) -> None:
    paths, shas = _many(tmp_path / "src", 40)
    serial, parallel = ImageCache(tmp_path / "a", 64), ImageCache(tmp_path / "b", 64)
    # exact on any CPU: each image is decoded and resized by the same code wherever it runs (one image per call,
    # uint8 out), so the number of workers cannot change a pixel
    np.testing.assert_array_equal(_fill(serial, paths, shas, workers=1), _fill(parallel, paths, shas, workers=2))
    assert len(_tree(serial.dir)) == len(_tree(parallel.dir)) == 41
    for sha in shas:
        np.testing.assert_array_equal(serial.get(sha), parallel.get(sha))


def test_misses_are_decoded_in_parallel_and_stored(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _many(tmp_path / "src", 40)
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths[:5], shas[:5])
    got = model_pixels(paths, _spec(48, 64), shas, cache=cache, workers=2)
    np.testing.assert_array_equal(got, _reference(paths, 48, 64))
    assert all(cache.get(sha) is not None for sha in shas)
    decodes.clear()
    _fill(cache, paths, shas)
    assert decodes == []


def test_fill_false_leaves_cache_unchanged(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", 64)
    got = model_pixels(paths, _spec(32, 64), shas, cache=cache, fill=False)
    np.testing.assert_array_equal(got, _reference(paths, 32, 64))
    assert not (tmp_path / "cache").exists()


def test_duplicate_sha_decoded_once(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _files(tmp_path / "src", SYNTHETIC[:2])
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths + paths[:1], shas + shas[:1])
    assert decodes == paths
    decodes.clear()
    got = model_pixels(paths + paths[:1], _spec(32, 64), shas + shas[:1], cache=ImageCache(tmp_path / "other", 64))
    assert decodes == paths
    np.testing.assert_array_equal(got[2], got[0])
    decodes.clear()
    got = model_pixels(paths + paths[:1], _spec(32, 64), shas + shas[:1])  # no cache: the sha256s still dedupe
    assert decodes == paths
    np.testing.assert_array_equal(got[2], got[0])


# --------------------------------------------------------------------------- incremental filling


def test_second_fill_reuses_everything(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _files(tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths, shas)
    assert decodes == paths
    mtimes = {p: os.stat(cache.entry_path(s)).st_mtime_ns for p, s in zip(paths, shas)}
    decodes.clear()
    _fill(ImageCache(tmp_path / "cache", 64), paths, shas)
    assert decodes == []
    assert mtimes == {p: os.stat(cache.entry_path(s)).st_mtime_ns for p, s in zip(paths, shas)}


def test_new_images_only_are_decoded(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _files(tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths[:3], shas[:3])
    decodes.clear()
    _fill(cache, paths, shas)
    assert decodes == paths[3:]


def test_new_short_side_builds_a_new_set(tmp_path: Path, decodes: list[str]) -> None:
    paths, shas = _files(tmp_path / "src")
    small = ImageCache(tmp_path / "cache", 64)
    _fill(small, paths, shas)
    before = _tree(small.dir)
    decodes.clear()
    large = ImageCache(tmp_path / "cache", 128)
    _fill(large, paths, shas)
    assert decodes == paths
    assert _tree(small.dir) == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["s128", "s64"]
    decodes.clear()
    _fill(small, paths, shas)
    assert decodes == []


def test_cache_of_another_short_side_is_refused(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src")
    small = ImageCache(tmp_path / "cache", 64)
    _fill(small, paths, shas)
    before = _tree(small.dir)
    # Rescaling the 64 px entries to base 128 would give other pixels: refused, not mixed.
    with pytest.raises(ValueError, match="short side 64.*128"):
        model_pixels(paths, _spec(96, 128), shas, cache=small)
    # The set for the spec's short side under the same root is used (and filled) instead.
    large = ImageCache(tmp_path / "cache", _spec(96, 128))
    np.testing.assert_array_equal(model_pixels(paths, _spec(96, 128), shas, cache=large), _reference(paths, 96, 128))
    assert all(large.get(sha) is not None for sha in shas)
    assert _tree(small.dir) == before


# --------------------------------------------------------------------------- damaged entries


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "pixel bit flip": lambda p: _flip_byte(p, p.stat().st_size - 20),
    "header byte flip": lambda p: _flip_byte(p, 30),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4000)),
    "plain npy without checksum": lambda p: np.save(p, np.zeros((64, 64), np.uint8)),
    "float npy": lambda p: np.save(p, np.zeros((64, 64), np.float32)),
    "extra bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_rebuilt_never_returned(tmp_path: Path, caplog, decodes: list[str], damage: str) -> None:
    paths, shas = _files(tmp_path / "src", SYNTHETIC[1:4])
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths, shas)
    entry = cache.entry_path(shas[0])
    DAMAGE[damage](entry)
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger="covid_cxr.imaging.cache"):
        got = _fill(cache, paths, shas)
    assert decodes == paths[:1]
    assert [r.getMessage().startswith("damaged image cache entry") for r in caplog.records] == [True]
    np.testing.assert_array_equal(got, _reference(paths, 32, 64))
    np.testing.assert_array_equal(cache.get(shas[0]), shrink_short_side(load_image(paths[0]), 64))
    DAMAGE[damage](entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covid_cxr.imaging.cache"):
        assert cache.get(shas[0]) is None
    assert str(entry) in caplog.text and "damaged" in caplog.text
    assert not entry.exists()


def test_damaged_entry_falls_back_to_the_file_when_loading(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src", SYNTHETIC[1:4])
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths, shas)
    _flip_byte(cache.entry_path(shas[1]), cache.entry_path(shas[1]).stat().st_size - 50)
    np.testing.assert_array_equal(model_pixels(paths, _spec(48, 64), shas, cache=cache), _reference(paths, 48, 64))
    assert cache.get(shas[1]) is not None  # stored again


def test_cache_from_another_resize_is_refused(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src", SYNTHETIC[:2])
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths, shas)
    meta_path = cache.dir / "cache.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "resize_fingerprint": "0" * 64, "pillow": "9.0.0"}))
    with pytest.raises(CacheError, match=r"Pillow 9\.0\.0.*delete .*s64"):
        ImageCache(tmp_path / "cache", 64)
    meta_path.write_text(json.dumps({**meta, "format": 0}))
    with pytest.raises(CacheError, match="format 0"):
        ImageCache(tmp_path / "cache", 64)
    meta_path.write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"):
        ImageCache(tmp_path / "cache", 64)
    assert CacheError is errors.CacheError


# --------------------------------------------------------------------------- source files


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_source_raises_naming_it(tmp_path: Path, workers: int) -> None:
    paths, shas = _many(tmp_path / "src", 40)
    bad = tmp_path / "src" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths.insert(17, str(bad))
    shas.insert(17, sha256_file(bad))
    cache = ImageCache(tmp_path / "cache", 64)
    with pytest.raises(ImageReadError, match="broken.png") as info:
        _fill(cache, paths, shas, workers=workers)
    assert info.value.path == str(bad)
    with pytest.raises(ImageReadError, match="broken.png"):
        model_pixels(paths, _spec(32, 64), shas, cache=ImageCache(tmp_path / "other", 64), workers=workers)
    with pytest.raises(ImageReadError, match="broken.png"):
        model_pixels(paths, _spec(32, 64), shas, cache=None, workers=workers)


def test_missing_source_raises_naming_it(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", 64)
    with pytest.raises(ImageReadError, match="gone.png"):
        _fill(cache, [str(tmp_path / "gone.png")], ["a" * 64])


def test_changed_source_file_is_not_cached_under_the_old_sha(tmp_path: Path) -> None:
    paths, shas = _files(tmp_path / "src", SYNTHETIC[:2])
    write_image(Path(paths[1]), seed=99, size=(70, 70))
    cache = ImageCache(tmp_path / "cache", 64)
    with pytest.raises(DatasetError, match=r"portrait\.png.*rebuild"):
        _fill(cache, paths, shas)
    assert cache.get(shas[1]) is None


# --------------------------------------------------------------------------- writes and arguments


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    paths, shas = _many(tmp_path / "src", 40)
    cache = ImageCache(tmp_path / "cache", 64)
    _fill(cache, paths, shas, workers=2)
    files = _tree(tmp_path / "cache")
    assert len(files) == len(set(shas)) + 1  # the entries and cache.json
    assert not [f for f in files if Path(f).name.startswith(".") or "tmp" in Path(f).name]


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    cache = ImageCache(tmp_path / "cache", 64)
    cache.put("b" * 64, np.zeros((10, 12), np.uint8))

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        cache.put("c" * 64, np.ones((10, 12), np.uint8))
    monkeypatch.undo()
    assert _tree(cache.dir) == ["bb/" + "b" * 64 + ".npy", "cache.json"]
    assert cache.get("c" * 64) is None


def test_put_rejects_images_that_are_not_stage_one(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", 64)
    with pytest.raises(ValueError, match="not shrunk"):
        cache.put("a" * 64, np.zeros((100, 80), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        cache.put("a" * 64, np.zeros((40, 40), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        cache.put("a" * 64, np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="sha256"):
        cache.put("../../etc/passwd", np.zeros((40, 40), np.uint8))
    with pytest.raises(ValueError, match="sha256"):
        cache.get("abc")
    with pytest.raises(ValueError, match="one sha256 per path"):
        model_pixels(["a", "b"], _spec(32, 64), ["a" * 64], cache=cache)
    with pytest.raises(ValueError, match="one sha256 per path"):
        model_pixels(["a"], _spec(32, 64), None, cache=cache)
    with pytest.raises(ValueError, match="short_side"):
        ImageCache(tmp_path / "cache", 0)
    assert not (tmp_path / "cache").exists()


def test_get_of_absent_entry_is_none(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", 64)
    assert cache.get("f" * 64) is None
    assert cache.get("F" * 64) is None
    assert not (tmp_path / "cache").exists()  # reading never creates folders


# --------------------------------------------------------------------------- real images


@pytest.mark.integration
def test_real_images_cached_equal_uncached(real_data: Path, tmp_path: Path) -> None:
    inv = real_inventory(real_data)
    # ~20 images across every source, file type and size in the collection.
    sample = inv.groupby("source", group_keys=False).apply(lambda g: g.sample(min(4, len(g)), random_state=0))
    paths = [str(real_data / p) for p in sample["relative_path"]]
    shas = sample["sha256"].tolist()
    spec = PreprocessSpec.for_size(224)
    cache = ImageCache(tmp_path / "cache", spec)
    got = model_pixels(paths, spec, shas, cache=cache, workers=2)
    assert len(list(cache.dir.rglob("*.npy"))) == len(set(shas)) >= 18
    expected = _reference(paths, 224, 256)
    for i, (p, sha) in enumerate(zip(paths, shas)):
        np.testing.assert_array_equal(resize_square(cache.get(sha), 224), expected[i], err_msg=p)
        np.testing.assert_array_equal(got[i], expected[i], err_msg=p)
    np.testing.assert_array_equal(model_pixels(paths, spec, shas, cache=cache), expected)
    small = model_pixels(paths[:6], _spec(64, 256), shas[:6], cache=cache)
    np.testing.assert_array_equal(small, _reference(paths[:6], 64, 256))


# --------------------------------------------------------------------------- build records (covid_cxr.data.ingest)


def test_records_round_trip_and_damage_is_removed(tmp_path: Path, caplog) -> None:
    from covid_cxr.data.dedup import fingerprint
    from covid_cxr.data.ingest import Record, RecordStore, fingerprint_version

    store = RecordStore(tmp_path)
    sha = "ab" * 32
    assert store.get(sha) is None
    fp = fingerprint(load_image(_files(tmp_path / "src")[0][1]))
    store.put(sha, Record(40, 48, fp))
    assert store.get(sha) == Record(40, 48, fp)
    store.put("cd" * 32, Record(7, 9, None))
    assert store.get("cd" * 32) == Record(7, 9, None)
    assert store.path(sha).parent.parent.name == fingerprint_version() == fingerprint_version()
    data = bytearray(store.path(sha).read_bytes())
    data[30] ^= 0xFF
    store.path(sha).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="covid_cxr.data.ingest"):
        assert store.get(sha) is None
    assert "damaged record" in caplog.text and not store.path(sha).exists()


def test_inspect_file_decodes_once_then_reuses_the_record(tmp_path: Path, monkeypatch) -> None:
    from covid_cxr.data import ingest

    paths, shas = _files(tmp_path / "src")
    calls = []
    real_load = ingest.load_image
    monkeypatch.setattr(ingest, "load_image", lambda p: calls.append(p) or real_load(p))
    job = ingest.Job(str(tmp_path / "cache"), fingerprints=True)
    first = [ingest.inspect_file(p, job) for p in paths]
    assert len(calls) == len(paths) and all(r["decoded"] for r in first)
    again = [ingest.inspect_file(p, job) for p in paths]
    assert len(calls) == len(paths) and not any(r["decoded"] for r in again)
    for a, b, sha in zip(first, again, shas):
        assert a["sha256"] == b["sha256"] == sha and (a["width"], a["height"]) == (b["width"], b["height"])
        assert a["fingerprint"] == b["fingerprint"] is not None
    # A record without a fingerprint does not serve a build that needs one; a missing cache entry neither.
    ImageCache(tmp_path / "cache", BASE_SHORT_SIDE).entry_path(shas[0]).unlink()
    assert ingest.inspect_file(paths[0], job)["decoded"]
    other = ingest.Job(str(tmp_path / "other"), fingerprints=False, reuse=(str(tmp_path / "cache"),))
    linked = ingest.inspect_file(paths[1], other)  # linked from an earlier build's cache, not decoded
    assert not linked["decoded"] and (tmp_path / "other" / "s256").is_dir()
