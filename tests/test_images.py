"""Tests for covid_cxr.imaging.images: decoding every image mode to 8-bit grayscale, refusing broken or
unsafe files (and files that are not PNG/JPEG/WebP/DICOM by their first bytes) with a message naming
them, listing image files; and for the geometry and intensity stages of covid_cxr.imaging.pixels:
resizing, CLAHE/equalisation, and decoding stacks of files."""

from __future__ import annotations

import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_gray, write_image
from covid_cxr.errors import CovidCxrError, ImageReadError
from covid_cxr.imaging.images import MAX_PIXELS, is_image_file, list_images, load_image, sha256_file, sniff, sniff_bytes
from covid_cxr.imaging.pixels import PreprocessSpec, clahe, equalize, model_pixels, resize_square, standardize_intensity


def _pil_gray(img: Image.Image) -> np.ndarray:
    """What Pillow itself makes of an 8-bit image converted to L (the reference for colour modes)."""
    return np.asarray(img.convert("L"), dtype=np.uint8)


# --------------------------------------------------------------------------- modes


def test_grayscale_png_is_read_exactly(tmp_path: Path) -> None:
    path = write_image(tmp_path / "gray.png", seed=3, size=(48, 40))
    arr = load_image(path)
    assert arr.dtype == np.uint8 and arr.shape == (48, 40)
    np.testing.assert_array_equal(arr, make_gray(3, (48, 40)))


def test_load_image_accepts_str_path(tmp_path: Path) -> None:
    path = write_image(tmp_path / "gray.png", seed=4)
    np.testing.assert_array_equal(load_image(str(path)), load_image(path))


def test_rgb_with_equal_channels_keeps_values(tmp_path: Path) -> None:
    gray = make_gray(5, (32, 36))
    Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB").save(tmp_path / "rgb.png")
    arr = load_image(tmp_path / "rgb.png")
    assert arr.shape == (32, 36) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, gray)


def test_rgb_colour_converted_with_luma(tmp_path: Path) -> None:
    rgb = np.zeros((20, 24, 3), dtype=np.uint8)
    rgb[:, :8] = (255, 0, 0)
    rgb[:, 8:16] = (0, 255, 0)
    rgb[:, 16:] = (0, 0, 255)
    img = Image.fromarray(rgb, "RGB")
    img.save(tmp_path / "colour.png")
    arr = load_image(tmp_path / "colour.png")
    np.testing.assert_array_equal(arr, _pil_gray(img))
    # Luma weights green most and blue least.
    assert arr[0, 8] > arr[0, 0] > arr[0, 16] > 0


def test_rgba_transparent_pixels_composite_to_black(tmp_path: Path) -> None:
    gray = make_gray(6, (30, 30))
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    rgba[..., :3] = gray[..., None]
    rgba[..., 3] = 255
    rgba[:, :10, 3] = 0          # fully transparent strip
    rgba[:, :10, :3] = 255       # ... over white colour values, which must not show through
    rgba[:, 10:20, 3] = 128      # half transparent strip
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    arr = load_image(tmp_path / "rgba.png")
    assert arr.shape == (30, 30)
    assert (arr[:, :10] == 0).all()
    np.testing.assert_array_equal(arr[:, 20:], gray[:, 20:])
    half = arr[:, 10:20].astype(int)
    expected_half = gray[:, 10:20].astype(int) * 128 / 255
    assert np.abs(half - expected_half).max() <= 1.5
    assert (half <= gray[:, 10:20]).all()


def test_la_mode_transparency_composites_to_black(tmp_path: Path) -> None:
    la = Image.merge("LA", [Image.new("L", (16, 16), 200), Image.new("L", (16, 16), 0)])
    la.paste(Image.merge("LA", [Image.new("L", (8, 16), 200), Image.new("L", (8, 16), 255)]), (8, 0))
    la.save(tmp_path / "la.png")
    arr = load_image(tmp_path / "la.png")
    assert (arr[:, :8] == 0).all() and (arr[:, 8:] == 200).all()


def test_palette_image(tmp_path: Path) -> None:
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb[:12] = (200, 30, 30)
    rgb[12:] = (10, 120, 240)
    pal = Image.fromarray(rgb, "RGB").quantize(colors=4)
    assert pal.mode == "P"
    pal.save(tmp_path / "pal.png")
    arr = load_image(tmp_path / "pal.png")
    assert arr.shape == (24, 24) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, _pil_gray(pal.convert("RGB")))
    assert arr[0, 0] != arr[-1, -1]


def test_palette_transparency_composites_to_black(tmp_path: Path) -> None:
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 255, 255, 180, 180, 180] + [0, 0, 0] * 254)
    pal.paste(0, (0, 0, 8, 16))  # left half uses index 0, declared transparent
    pal.save(tmp_path / "pal_t.png", transparency=0)
    assert "transparency" in Image.open(tmp_path / "pal_t.png").info
    arr = load_image(tmp_path / "pal_t.png")
    assert (arr[:, :8] == 0).all()
    assert (arr[:, 8:] == 180).all()


def test_16bit_png_is_stretched_to_8bit(tmp_path: Path) -> None:
    values = np.linspace(0, 4095, 48 * 40).round().astype(np.uint16).reshape(48, 40)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    img.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    arr = load_image(tmp_path / "deep.png")
    assert arr.dtype == np.uint8 and arr.shape == (48, 40)
    assert arr.min() == 0 and arr.max() == 255
    expected = np.round(values.astype(np.float64) * 255.0 / 4095.0)
    assert np.abs(arr.astype(int) - expected).max() <= 1
    # Monotonic: a brighter stored value never decodes darker.
    flat = arr.ravel().astype(int)
    assert (np.diff(flat) >= 0).all()


def test_16bit_constant_image_is_black_not_nan(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)).save(tmp_path / "flat16.png")
    arr = load_image(tmp_path / "flat16.png")
    assert arr.dtype == np.uint8 and (arr == 0).all()


def test_jpeg_grayscale_and_rgb(tmp_path: Path) -> None:
    gray = make_gray(7, (64, 48))
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(tmp_path / "c.jpeg", quality=95)
    for name in ("g.jpg", "c.jpeg"):
        arr = load_image(tmp_path / name)
        assert arr.shape == (64, 48) and arr.dtype == np.uint8
        # Lossy, but close to what was written.
        assert np.abs(arr.astype(int) - gray.astype(int)).mean() < 8


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    h, w = 40, 64
    gray = np.zeros((h, w), dtype=np.uint8)
    gray[:, : w // 2] = 230  # bright left half in the stored pixels
    img = Image.fromarray(gray)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (w, h)
    arr = load_image(tmp_path / "rot.jpg")
    assert arr.shape == (w, h)
    # Orientation 6: the stored left edge becomes the top edge.
    assert arr[: w // 2 - 4].mean() > 200 and arr[w // 2 + 4:].mean() < 30

    img.save(tmp_path / "plain.jpg", quality=95)
    assert load_image(tmp_path / "plain.jpg").shape == (h, w)


# --------------------------------------------------------------------------- failures


def test_truncated_png_raises_with_path(tmp_path: Path) -> None:
    src = write_image(tmp_path / "full.png", seed=8, size=(256, 256))
    data = src.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        load_image(bad)
    assert str(bad) in str(err.value)
    assert err.value.path == str(bad)


def test_text_file_named_png_raises_with_path(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as err:
        load_image(bad)
    assert str(bad) in str(err.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "x.png"
    with pytest.raises(ImageReadError) as err:
        load_image(missing)
    assert str(missing) in str(err.value)
    assert "not found" in err.value.reason


def test_tiny_image_is_rejected(tmp_path: Path) -> None:
    Image.new("L", (4, 30), 100).save(tmp_path / "sliver.png")
    with pytest.raises(ImageReadError) as err:
        load_image(tmp_path / "sliver.png")
    assert "sliver.png" in str(err.value)


def _png_claiming(tmp_path: Path, name: str, width: int, height: int) -> Path:
    """A valid 16x16 PNG whose IHDR is patched to claim width x height (CRC fixed)."""
    src = tmp_path / f"{name}-src.png"
    Image.new("L", (16, 16), 90).save(src)
    data = bytearray(src.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    out = tmp_path / f"{name}.png"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("side", [50_000, 12_000])
def test_decompression_bomb_is_rejected_quickly(tmp_path: Path, side: int) -> None:
    # 50000^2 is far beyond Pillow's own hard limit; 12000^2 is beyond MAX_PIXELS but only in
    # Pillow's warning range, so our own check must catch it.
    assert side * side > MAX_PIXELS
    bomb = _png_claiming(tmp_path, f"bomb{side}", side, side)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        load_image(bomb)
    elapsed = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "decompression bomb" in str(err.value).lower()
    assert str(bomb) in str(err.value)
    assert elapsed < 2.0  # refused from the header in milliseconds: ~100x room for a loaded machine
    # Decoding would need side*side bytes (144 MB or 2.5 GB); the peak must not grow near that.
    assert (rss_after - rss_before) * 1024 < side * side // 4


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("name,expected", [
    ("a.png", True), ("a.PNG", True), ("b.JPG", True), ("b.jpg", True), ("c.jpeg", True), ("c.JPEG", True),
    ("._foo.png", False), ("._IM-0001.jpeg", False), (".DS_Store", False), ("meta.xlsx", False),
    ("notes.txt", False), ("x.gif", False), ("png", False),
])
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(Path("/data/x") / name) is expected


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    p = write_image(tmp_path / "h.png", seed=9)
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha256_file(p, chunk=7) == sha256_file(p)


@pytest.mark.parametrize("shape", [(48, 40), (300, 200), (20, 90)])
@pytest.mark.parametrize("size", [16, 64])
def test_resize_square_shape_and_dtype(shape: tuple[int, int], size: int) -> None:
    img = make_gray(2, shape)
    out = resize_square(img, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    # Brightness is preserved approximately: area-weighted resampling keeps the mean up to uint8 rounding and
    # edge effects (<= 0.12 grey levels for these shapes, deterministic); 10 catches a wrong scale or clipping.
    assert abs(float(out.mean()) - float(img.mean())) < 10


def test_resize_square_constant_and_identity() -> None:
    const = np.full((50, 70), 77, dtype=np.uint8)
    assert (resize_square(const, 32) == 77).all()
    img = make_gray(1, (32, 32))
    np.testing.assert_array_equal(resize_square(img, 32), img)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), dtype=np.float32), np.zeros((10, 10, 3), dtype=np.uint8),
                                 np.zeros((10, 10), dtype=np.uint16)])
def test_resize_square_rejects_other_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        resize_square(bad, 8)


# --------------------------------------------------------------------------- stacks


def _files(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        suffix = ".png" if i % 3 else ".jpg"
        paths.append(write_image(tmp_path / f"img{i:03d}{suffix}", seed=i, size=(40 + i % 5, 36 + i % 7)))
    return paths


@pytest.mark.parametrize("workers", [1, 2])
def test_model_pixels_matches_single_loads(tmp_path: Path, workers: int) -> None:
    paths = _files(tmp_path, 40)
    stack = model_pixels(paths, PreprocessSpec.for_size(24), workers=workers)
    assert stack.shape == (40, 24, 24) and stack.dtype == np.uint8
    for i in (0, 1, 17, 39):
        np.testing.assert_array_equal(stack[i], resize_square(load_image(paths[i]), 24))


def test_model_pixels_empty(tmp_path: Path) -> None:
    out = model_pixels([], PreprocessSpec.for_size(16), workers=1)
    assert out.shape == (0, 16, 16) and out.dtype == np.uint8


@pytest.mark.parametrize("workers,n", [(1, 10), (2, 40)])
def test_model_pixels_names_bad_file(tmp_path: Path, workers: int, n: int) -> None:
    paths = _files(tmp_path, n)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    paths.insert(n // 2, bad)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        model_pixels(paths, PreprocessSpec.for_size(16), workers=workers)
    # <= 41 small files, worker start-up included: a few seconds even on a loaded 2-core machine; the bar catches
    # a pool that waits for every file (or hangs) after the failure, not load
    assert time.perf_counter() - t0 < 30
    assert err.value.path == str(bad)
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------- file type by magic bytes


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "PPM"])
def test_other_formats_named_png_are_refused(tmp_path: Path, fmt: str) -> None:
    """Only PNG, JPEG, WebP and DICOM are decoded; the type comes from the content, never from the name."""
    path = tmp_path / f"scan-{fmt.lower()}.png"
    Image.fromarray(make_gray(3, (48, 40))).save(path, format=fmt)
    assert sniff(path) is None
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path) and str(path) in str(err.value)
    assert "PNG, JPEG, WebP or DICOM" in err.value.reason


OTHER_FORMATS = {"EPS": "EpsImagePlugin.EpsImageFile", "TIFF": "TiffImagePlugin.TiffImageFile",
                 "BMP": "BmpImagePlugin.BmpImageFile", "GIF": "GifImagePlugin.GifImageFile",
                 "ICO": "IcoImagePlugin.IcoImageFile",
                 "PPM": "PpmImagePlugin.PpmImageFile", "TGA": "TgaImagePlugin.TgaImageFile"}


@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_other_formats_named_png_never_reach_a_pillow_plugin(tmp_path: Path, fmt: str, monkeypatch) -> None:
    """An EPS named .png must never reach Pillow's EPS plugin (which runs Ghostscript on load), nor any other
    format its plugin: Pillow is not even asked to open the file, no plugin parses it, no process is started."""
    import importlib
    import subprocess

    from PIL import features

    path = tmp_path / f"scan-{fmt.lower()}.png"
    Image.fromarray(make_gray(3, (48, 40))).save(path, format=fmt)
    module, cls = OTHER_FORMATS[fmt].split(".")
    plugin = getattr(importlib.import_module(f"PIL.{module}"), cls)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{fmt} reached {args[0] if args else 'Pillow'}")

    monkeypatch.setattr(plugin, "_open", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)  # Ghostscript (EPS) and any other helper program
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path) and "PNG, JPEG, WebP or DICOM" in err.value.reason


def test_webp_is_read_by_its_content_whatever_its_name(tmp_path: Path) -> None:
    """COVID-CXNet holds WebP files, one named .png: lossless WebP decodes to exactly the pixels written; a WebP
    ending is listed as an image; a RIFF file that is not WebP (a WAV) is refused."""
    from PIL import features

    if not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    gray = make_gray(5, (48, 40))
    for name in ("scan.webp", "scan-named.png"):
        path = tmp_path / name
        Image.fromarray(gray).save(path, format="WEBP", lossless=True)
        assert sniff(path) == "webp" and is_image_file(path)
        np.testing.assert_array_equal(load_image(path), gray)
    wav = tmp_path / "sound.webp"
    wav.write_bytes(b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(28))
    with pytest.raises(ImageReadError, match="PNG, JPEG, WebP or DICOM"):
        load_image(wav)


def test_no_code_opens_images_without_naming_the_formats() -> None:
    """Every ``Image.open`` in the package names the formats Pillow may try (``formats=``): without it, Pillow tries
    every plugin it has (EPS runs Ghostscript) on whatever bytes it is given."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "covid_cxr"
    calls, unrestricted = 0, []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "open" \
                    and ast.unparse(node.func.value) in ("Image", "PIL.Image"):
                calls += 1
                if not any(k.arg == "formats" for k in node.keywords):
                    unrestricted.append(f"{path.name}:{node.lineno}")
    assert calls >= 2  # images.load_image and augment's JPEG round trip
    assert unrestricted == []
    assert "from PIL.Image import open" not in "".join(p.read_text(encoding="utf-8") for p in src.rglob("*.py"))


def test_png_whose_decoded_pixels_would_exceed_the_byte_limit_is_refused(tmp_path: Path) -> None:
    """10000x10000 is within MAX_PIXELS, but as RGBA Pillow would hold 400 MB: refused from the header."""
    src = _png_claiming(tmp_path, "rgba", 10_000, 10_000)
    data = bytearray(src.read_bytes())
    data[25] = 6  # IHDR colour type: RGBA
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    src.write_bytes(bytes(data))
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        load_image(src)
    assert time.perf_counter() - t0 < 2.0  # header-only refusal (ms); decoding 400 MB would take seconds
    assert "10000x10000 RGBA pixels" in err.value.reason and "decompression bomb" in err.value.reason
    big_gray = _png_claiming(tmp_path, "gray", 10_000, 10_000)  # 100 MB as L: within both limits, fails on data
    with pytest.raises(ImageReadError) as err:
        load_image(big_gray)
    assert "decompression bomb" not in err.value.reason


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert "empty" in err.value.reason


def test_file_type_comes_from_content_not_name(tmp_path: Path) -> None:
    gray = make_gray(4, (40, 36))
    Image.fromarray(gray).save(tmp_path / "really-a-png.jpg", format="PNG")
    Image.fromarray(gray).save(tmp_path / "really-a-jpeg.png", format="JPEG", quality=95)
    assert sniff(tmp_path / "really-a-png.jpg") == "png"
    assert sniff(tmp_path / "really-a-jpeg.png") == "jpeg"
    np.testing.assert_array_equal(load_image(tmp_path / "really-a-png.jpg"), gray)
    assert np.abs(load_image(tmp_path / "really-a-jpeg.png").astype(int) - gray.astype(int)).mean() < 8


def test_sniff_bytes() -> None:
    assert sniff_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200) == "png"
    assert sniff_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 200) == "jpeg"
    assert sniff_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10) == "dicom"
    assert sniff_bytes(b"II*\0" + b"\0" * 200) is None  # TIFF
    assert sniff_bytes(b"GIF89a") is None
    assert sniff_bytes(b"") is None


def test_sniff_of_missing_file_is_none(tmp_path: Path) -> None:
    assert sniff(tmp_path / "nowhere.png") is None


# --------------------------------------------------------------------------- listing


def test_list_images_expands_folders_in_a_stable_order(tmp_path: Path) -> None:
    a = write_image(tmp_path / "in" / "b.png", seed=1)
    b = write_image(tmp_path / "in" / "sub" / "a.JPG", seed=2)
    c = write_image(tmp_path / "in" / "a.jpeg", seed=3)
    (tmp_path / "in" / "._a.png").write_bytes(b"resource fork")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "README").write_text("no ending, not DICOM")
    single = write_image(tmp_path / "single.png", seed=4)
    assert list_images([str(tmp_path / "in"), str(single)]) == [c, a, b, single]
    # A file passed by name is taken as it is (load_image decides whether it is an image).
    assert list_images([str(tmp_path / "in" / "notes.txt")]) == [tmp_path / "in" / "notes.txt"]


def test_list_images_refuses_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(CovidCxrError, match="does not exist"):
        list_images([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(CovidCxrError, match="no PNG, JPEG, WebP or DICOM"):
        list_images([str(tmp_path / "empty")])


# --------------------------------------------------------------------------- intensity (pixels stage 3)


@pytest.mark.parametrize("shape", [(64, 64), (48, 40), (7, 9), (300, 170)])
@pytest.mark.parametrize("fn", [equalize, clahe], ids=["equalize", "clahe"])
def test_intensity_keeps_shape_and_dtype_and_is_deterministic(fn, shape: tuple[int, int]) -> None:
    img = (make_gray(5, shape) // 3 + 40).astype(np.uint8)  # low contrast: 40..125
    out = fn(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(fn(img.copy()), out)
    np.testing.assert_array_equal(img, (make_gray(5, shape) // 3 + 40).astype(np.uint8))  # input untouched
    # Both stretch a low-contrast image and keep the order of grey levels (on average).
    assert int(out.max()) - int(out.min()) > int(img.max()) - int(img.min())
    assert np.corrcoef(out.ravel().astype(float), img.ravel().astype(float))[0, 1] > 0.8


@pytest.mark.parametrize("fn", [equalize, clahe], ids=["equalize", "clahe"])
def test_intensity_of_flat_image_is_flat(fn) -> None:
    flat = np.full((32, 40), 90, np.uint8)
    out = fn(flat)
    assert out.shape == flat.shape and out.dtype == np.uint8 and len(np.unique(out)) == 1


def test_equalize_spreads_the_histogram() -> None:
    img = np.repeat(np.arange(100, 132, dtype=np.uint8), 32).reshape(32, 32)
    out = equalize(img)
    assert out.min() == 0 and out.max() == 255
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # monotonic mapping


@pytest.mark.parametrize("mode", ["none", "equalize", "clahe"])
def test_standardize_intensity_of_a_stack_is_per_image(mode: str) -> None:
    spec = PreprocessSpec(size=32, intensity=mode)
    stack = np.stack([resize_square(make_gray(i, (48, 40)), 32) for i in range(3)])
    out = standardize_intensity(stack, spec)
    assert out.shape == stack.shape and out.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(out[i], standardize_intensity(stack[i], spec))


def test_preprocess_spec_never_shrinks_below_the_input_size() -> None:
    assert PreprocessSpec.for_size(224).base_short_side == 256
    assert PreprocessSpec.for_size(512).base_short_side == 512
    with pytest.raises(ValueError, match="base_short_side"):
        PreprocessSpec(size=96, base_short_side=64)
    with pytest.raises(ValueError, match="intensity"):
        PreprocessSpec(size=32, intensity="gamma")
