"""Tests for covid_cxr.imaging.dicom: DICOM radiographs decode to the display an 8-bit viewer would show
(modality LUT, VOI window or LUT, MONOCHROME1 inverted), compressed transfer syntaxes decode to
the same pixels as uncompressed ones, and files that are not chest radiographs, or are unsafe or
undecodable, are refused with a message naming them. Every DICOM file is written by the test."""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import (BasicTextSRStorage, ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLossless, JPEGLosslessSV1, RLELossless, generate_uid)

import covid_cxr.imaging.dicom as dicom
from conftest import make_gray
from covid_cxr.errors import ImageReadError
from covid_cxr.imaging.dicom import load_dicom
from covid_cxr.imaging.images import is_image_file, list_images, load_image, sniff


def make_ds(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
            modality: str | None = "DX", **elements) -> Dataset:
    """An uncompressed DX dataset holding ``pixels`` (frames first for several frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.PatientID = "TEST"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    if modality is not None:
        ds.Modality = modality
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp12(shape: tuple[int, int] = (40, 48), lo: int = 0, hi: int = 4095) -> np.ndarray:
    """Structured 12-bit test data from ``lo`` to ``hi`` (both reached)."""
    g = make_gray(3, shape).astype(np.float64)
    g = (g - g.min()) / (g.max() - g.min())
    return np.round(lo + g * (hi - lo)).astype(np.uint16)


def tile(values: list[int], dtype=np.uint16) -> np.ndarray:
    """An 8 x 8*len(values) image whose column blocks hold ``values`` (load_image needs >= 8 px)."""
    return np.repeat(np.array(values, dtype=dtype)[None, :], 8, axis=0).repeat(8, axis=1)


def untile(arr: np.ndarray) -> list[int]:
    return [int(v) for v in arr[0, ::8]]


# --------------------------------------------------------------------------- grayscale display


STORED = [0, 1535, 1536, 1792, 2049, 2304, 2559, 2560, 4095]
# DICOM PS3.3 C.11.2.1.2.1 (LINEAR) with center c = 2048.5, width w = 1025: x <= c - 0.5 - (w-1)/2 = 1536
# is black, x > c - 0.5 + (w-1)/2 = 2560 is white, otherwise ((x - 2048) / 1024 + 0.5) * 255, so
# 1792 -> 63.75, 2049 -> 127.75, 2304 -> 191.25, 2559 -> 254.75.
WINDOWED = [0, 0, 0, 64, 128, 191, 255, 255, 255]


@pytest.mark.parametrize("center,width", [(2048.5, 1025), ([2048.5, 300], [1025, 80])], ids=["one", "first-of-two"])
def test_12bit_window_gives_hand_computed_values(tmp_path: Path, center, width) -> None:
    path = save(make_ds(tile(STORED), bits_stored=12, WindowCenter=center, WindowWidth=width), tmp_path / "w.dcm")
    arr = load_dicom(path)
    assert arr.dtype == np.uint8 and arr.shape == (8, 8 * len(STORED))
    assert untile(arr) == WINDOWED


def test_without_window_12bit_is_stretched_from_min_to_max(tmp_path: Path) -> None:
    values = [1000, 1500, 2000, 2999, 3000]
    arr = load_dicom(save(make_ds(tile(values), bits_stored=12), tmp_path / "n.dcm"))
    # (x - 1000) * 255 / 2000: 63.75, 127.5 (rounds to even), 254.87
    assert untile(arr) == [0, 64, 128, 255, 255]


def test_without_window_16bit_full_range(tmp_path: Path) -> None:
    values = [0, 16384, 65535]
    arr = load_dicom(save(make_ds(tile(values), bits_stored=16), tmp_path / "n16.dcm"))
    assert untile(arr) == [0, 64, 255]  # 16384 * 255 / 65535 = 63.75


def test_8bit_without_window_is_kept_as_stored(tmp_path: Path) -> None:
    gray = make_gray(5, (32, 40))
    gray[0, 0], gray[0, 1] = 40, 200  # not the full 0..255 range: must not be stretched
    gray = np.clip(gray, 40, 200)
    arr = load_dicom(save(make_ds(gray), tmp_path / "8.dcm"))
    np.testing.assert_array_equal(arr, gray)


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 2000, "WindowWidth": 1500}], ids=["stretch", "window"])
def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path, window: dict) -> None:
    data = ramp12()
    m2 = load_dicom(save(make_ds(data, bits_stored=12, **window), tmp_path / "m2.dcm"))
    m1 = load_dicom(save(make_ds(data, photometric="MONOCHROME1", bits_stored=12, **window), tmp_path / "m1.dcm"))
    assert m2.std() > 30
    np.testing.assert_array_equal(m1, 255 - m2)


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    stored = np.array([1500, 2000, 2040, 2600], dtype=np.uint16)
    # Output units v = 2x - 1024; window c = 3072.5, w = 2049 -> ((v - 3072) / 2048 + 0.5) * 255:
    # v = 1976 -> -8.9 (black), 2976 -> 115.55, 3056 -> 125.51, 4176 -> 265 (white).
    window = {"WindowCenter": 3072.5, "WindowWidth": 2049}
    rescaled = save(make_ds(tile(stored), bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, **window),
                    tmp_path / "rescaled.dcm")
    assert untile(load_dicom(rescaled)) == [0, 116, 126, 255]
    # The same output units stored directly (signed 16-bit, no rescale) display the same.
    direct = save(make_ds(tile(2 * stored.astype(np.int16) - 1024, np.int16), **window), tmp_path / "direct.dcm")
    np.testing.assert_array_equal(load_dicom(direct), load_dicom(rescaled))


def test_negative_rescale_slope_inverts_stretched_image(tmp_path: Path) -> None:
    data = ramp12(lo=100, hi=3900)
    plain = load_dicom(save(make_ds(data, bits_stored=12), tmp_path / "p.dcm"))
    flipped = load_dicom(save(make_ds(data, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095),
                              tmp_path / "f.dcm"))
    np.testing.assert_array_equal(flipped, 255 - plain)


def test_signed_16bit(tmp_path: Path) -> None:
    values = [-2000, -1000, 0, 1001, 2000]
    arr = load_dicom(save(make_ds(tile(values, np.int16)), tmp_path / "s.dcm"))
    # (x + 2000) * 255 / 4000: 63.75, 127.5 (rounds to even), 191.31; as unsigned, negatives would be brightest.
    assert untile(arr) == [0, 64, 128, 191, 255]
    # c = 0.5, w = 1001 -> ((x - 0) / 1000 + 0.5) * 255: -250 -> 63.75, 250 -> 191.25
    windowed = save(make_ds(tile([-600, -250, 250, 600], np.int16), WindowCenter=0.5, WindowWidth=1001),
                    tmp_path / "sw.dcm")
    assert untile(load_dicom(windowed)) == [0, 64, 191, 255]


def test_signed_12bit_in_16bit_container(tmp_path: Path) -> None:
    values = np.array([-2048, -1024, 0, 2047], dtype=np.int16)
    ds = make_ds(tile(values, np.int16), bits_stored=12)
    # Only the low 12 bits are stored; the top 4 are not sign bits and must be sign-extended by the reader.
    ds.PixelData = (tile(values, np.int16).view(np.uint16) & 0x0FFF).tobytes()
    arr = load_dicom(save(ds, tmp_path / "s12.dcm"))
    assert untile(arr) == [0, 64, 128, 255]  # (x + 2048) * 255 / 4095: 63.75, 127.53


def test_voi_lut_sequence_is_preferred_to_window(tmp_path: Path) -> None:
    lut_item = Dataset()
    lut_item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    # A threshold at 2048; 16 bits declared but only 12 used (common in real files).
    lut_item.add_new("LUTData", "OW", np.repeat(np.array([0, 4095], "<u2"), 2048).tobytes())
    ds = make_ds(tile([0, 2047, 2048, 4095]), bits_stored=12, WindowCenter=100, WindowWidth=10,
                 VOILUTSequence=[lut_item])
    assert untile(load_dicom(save(ds, tmp_path / "lut.dcm"))) == [0, 0, 255, 255]


def test_rgb_dicom_becomes_luma(tmp_path: Path) -> None:
    rgb = np.zeros((24, 30, 3), dtype=np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:20] = (0, 255, 0)
    rgb[:, 20:] = (0, 0, 255)
    rgb[5:9] = make_gray(2, (4, 30))[..., None]
    arr = load_dicom(save(make_ds(rgb, photometric="RGB"), tmp_path / "rgb.dcm"))
    assert arr.shape == (24, 30)
    # The same luma as a colour PNG through load_image.
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(arr, load_image(tmp_path / "rgb.png"))
    assert arr[0, 10] > arr[0, 0] > arr[0, 20] > 0


def test_multiframe_gives_first_frame_and_says_so(tmp_path: Path, caplog) -> None:
    frames = np.stack([ramp12(), 4095 - ramp12(), np.full((40, 48), 7, np.uint16)])
    multi = save(make_ds(frames, bits_stored=12), tmp_path / "multi.dcm")
    single = save(make_ds(frames[0], bits_stored=12), tmp_path / "single.dcm")
    with caplog.at_level(logging.WARNING, logger="covid_cxr.imaging.dicom"):
        arr = load_dicom(multi)
    np.testing.assert_array_equal(arr, load_dicom(single))
    assert "3 frames" in caplog.text and "first" in caplog.text and "multi.dcm" in caplog.text


# --------------------------------------------------------------------------- compressed transfer syntaxes


def _jpeg_lossless(img: np.ndarray, precision: int) -> bytes:
    """Encode an unsigned (H, W) image as lossless JPEG (ITU T.81 process 14, predictor 1).

    pydicom has no JPEG Lossless encoder, so this minimal one writes the test data: one component,
    one Huffman table giving every difference category 0..16 a 5-bit code.
    """
    h, w = img.shape
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]          # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]          # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]        # predictor 1: left neighbour
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)
    bits = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    s = "".join(bits)
    s += "1" * (-len(s) % 8)
    scan = int(s, 2).to_bytes(len(s) // 8, "big").replace(b"\xff", b"\xff\x00")
    counts = [0] * 16
    counts[4] = 17
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + bytes([1, 0x11, 0])
    dht = b"\xff\xc4" + struct.pack(">HB", 36, 0) + bytes(counts) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + scan + b"\xff\xd9"


def _encapsulated(ds: Dataset, frame: bytes, tsyntax) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = tsyntax
    return ds


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("tsyntax", [JPEGLosslessSV1, JPEGLossless], ids=["SV1", "process14"])
def test_jpeg_lossless_equals_uncompressed(tmp_path: Path, bits: int, tsyntax) -> None:
    data = ramp12(hi=2**bits - 1)
    data[3:9, 5:30] = 0  # large jumps between neighbours, negative and positive
    plain = save(make_ds(data, bits_stored=bits), tmp_path / "plain.dcm")
    ds = _encapsulated(make_ds(data, bits_stored=bits), _jpeg_lossless(data, bits), tsyntax)
    packed = save(ds, tmp_path / "jpeg-ll.dcm")
    assert dicom.pydicom.dcmread(packed).file_meta.TransferSyntaxUID == tsyntax
    np.testing.assert_array_equal(load_dicom(packed), load_dicom(plain))


def test_jpeg_baseline_decodes_like_pillow(tmp_path: Path) -> None:
    gray = make_gray(8, (64, 48))
    buf = BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=90)
    ds = _encapsulated(make_ds(gray), buf.getvalue(), JPEGBaseline8Bit)
    arr = load_dicom(save(ds, tmp_path / "baseline.dcm"))
    reference = np.asarray(Image.open(BytesIO(buf.getvalue())).convert("L"), dtype=np.int16)
    assert arr.shape == (64, 48)
    # Lossy: decoders may differ by an IDCT rounding step, never by more (integer IDCTs: exact, SIMD or not; 2
    # allows one rounding step in the IDCT and one in the colour/level conversion).
    assert np.abs(arr.astype(np.int16) - reference).max() <= 2
    # the quality-90 encoding's own loss on this noisy image: mean 3.1 levels (deterministic, any CPU); 8 would
    # take a quality-50-like table or a wrong decoder
    assert np.abs(arr.astype(np.int16) - gray.astype(np.int16)).mean() < 8


@pytest.mark.parametrize("pixels", [ramp12(), tile([-2000, -3, 0, 5, 1999], np.int16)], ids=["u12", "s16"])
def test_rle_equals_uncompressed(tmp_path: Path, pixels: np.ndarray) -> None:
    bits = 12 if pixels.dtype == np.uint16 else 16
    plain = save(make_ds(pixels, bits_stored=bits), tmp_path / "plain.dcm")
    ds = make_ds(pixels, bits_stored=bits)
    ds.compress(RLELossless)
    packed = save(ds, tmp_path / "rle.dcm")
    assert packed.read_bytes().find(RLELossless.encode()) > 0
    np.testing.assert_array_equal(load_dicom(packed), load_dicom(plain))


@pytest.mark.parametrize("pixels", [ramp12(), ramp12(hi=4000).astype(np.int16) - 2000], ids=["u12", "s16"])
def test_jpeg2000_lossless_equals_uncompressed(tmp_path: Path, pixels: np.ndarray) -> None:
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (the JPEG 2000 encoder) is not installed")
    bits = 12 if pixels.dtype == np.uint16 else 16
    plain = save(make_ds(pixels, bits_stored=bits), tmp_path / "plain.dcm")
    ds = make_ds(pixels, bits_stored=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    packed = save(ds, tmp_path / "j2k.dcm")
    assert packed.read_bytes().find(JPEG2000Lossless.encode()) > 0
    np.testing.assert_array_equal(load_dicom(packed), load_dicom(plain))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_files_compressed_by_other_tools_equal_uncompressed(tmp_path: Path, name: str) -> None:
    """pydicom's bundled files (RLE, JPEG 2000 and JPEG-LS written by other software, signed 16-bit,
    windowed); they are MR, so relabelled DX here to pass the modality check."""
    paths = {}
    for n in (name, "MR_small.dcm"):
        src = get_testdata_file(n)
        if src is None:
            pytest.skip(f"pydicom's test file {n} is not installed")
        ds = dicom.pydicom.dcmread(src)
        ds.Modality = "DX"
        paths[n] = save(ds, tmp_path / n)
    arr = load_dicom(paths[name])
    assert arr.shape == (64, 64) and arr.std() > 20
    np.testing.assert_array_equal(arr, load_dicom(paths["MR_small.dcm"]))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")  # pydicom, on the cut file
@pytest.mark.parametrize("where", ["frame", "file"])
def test_truncated_compressed_frame_is_refused(tmp_path: Path, where: str) -> None:
    data = ramp12()
    stream = _jpeg_lossless(data, 12)
    if where == "frame":  # a well-formed file holding a cut-off codestream
        path = save(_encapsulated(make_ds(data, bits_stored=12), stream[: len(stream) // 2], JPEGLosslessSV1),
                    tmp_path / "cut-frame.dcm")
    else:  # a file cut off in the middle of its pixel data
        full = save(_encapsulated(make_ds(data, bits_stored=12), stream, JPEGLosslessSV1), tmp_path / "full.dcm")
        path = tmp_path / "cut-file.dcm"
        path.write_bytes(full.read_bytes()[: -len(stream) // 2])
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)


def test_jpeg_extended_12bit_decodes(tmp_path: Path) -> None:
    """pydicom's bundled 12-bit JPEG Extended file (Pillow cannot decode it; pylibjpeg-libjpeg can)."""
    src = get_testdata_file("JPGExtended.dcm")
    if src is None:
        pytest.skip("pydicom's test file JPGExtended.dcm is not installed")
    ds = dicom.pydicom.dcmread(src)
    ds.Modality = "DX"  # it is a nuclear medicine image
    arr = load_dicom(save(ds, tmp_path / "extended.dcm"))
    assert arr.shape == (1024, 256) and arr.max() == 255 and arr.std() > 10


def test_missing_decoder_plugin_is_named(tmp_path: Path, monkeypatch) -> None:
    data = ramp12()
    path = save(_encapsulated(make_ds(data, bits_stored=12), _jpeg_lossless(data, 12), JPEGLosslessSV1),
                tmp_path / "ll.dcm")
    decoder = get_decoder(JPEGLosslessSV1)
    # As if pylibjpeg-libjpeg were not installed.
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert "JPEG Lossless" in err.value.reason and "pylibjpeg-libjpeg" in err.value.reason


# --------------------------------------------------------------------------- load_image dispatch


def test_load_image_on_dcm_equals_load_dicom(tmp_path: Path) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, WindowCenter=2000, WindowWidth=3000), tmp_path / "x.DCM")
    arr = load_image(path)
    assert arr.dtype == np.uint8 and arr.shape == (40, 48)
    np.testing.assert_array_equal(arr, load_dicom(path))
    assert sniff(path) == "dicom"


def test_extensionless_dicom_is_found_by_its_marker(tmp_path: Path) -> None:
    ds = make_ds(ramp12(), bits_stored=12)
    path = save(ds, tmp_path / "IM000001")
    assert path.read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(load_image(path), load_dicom(save(ds, tmp_path / "same.dcm")))
    assert sniff(path) == "dicom" and is_image_file(path)
    assert load_image(path).shape == (40, 48)


def test_extensionless_dicom_is_listed_by_its_marker(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    save(make_ds(ramp12(), bits_stored=12), folder / "IM000001")
    save(make_ds(ramp12(), bits_stored=12), folder / "sub" / "IM000002")
    (folder / "README").write_text("not an image, no ending\n" * 10)
    (folder / "junk").write_bytes(b"\0" * 128 + b"DICX" + b"\0" * 64)  # no DICM marker
    assert list_images([str(folder)]) == [folder / "IM000001", folder / "sub" / "IM000002"]
    assert not is_image_file(folder / "README") and not is_image_file(folder / "junk")


def test_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    ds = make_ds(ramp12(), bits_stored=12)
    expected = load_dicom(save(ds, tmp_path / "with.dcm"))
    del ds.file_meta
    ds.save_as(tmp_path / "raw.dcm", implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw.dcm").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(tmp_path / "raw.dcm"), expected)


@pytest.mark.parametrize("name,expected", [
    ("scan.dcm", True), ("SCAN.DCM", True), ("a.dicom", True), ("._scan.dcm", False), ("DICOMDIR", False),
    ("a.png", True),
])
def test_is_image_file_includes_dicom(name: str, expected: bool) -> None:
    assert is_image_file(Path("/data/x") / name) is expected


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "MG"])
def test_non_radiograph_modality_is_refused(tmp_path: Path, modality: str) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, modality=modality), tmp_path / f"{modality}.dcm")
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert repr(modality) in err.value.reason and "chest radiographs" in err.value.reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # real files hold such values
@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", None, "dx "])
def test_radiograph_modalities_are_read(tmp_path: Path, modality: str | None) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, modality=modality), tmp_path / "r.dcm")
    assert load_dicom(path).shape == (40, 48)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("part", ["KNEE", "HAND", "Hands", "T-SPINE", "PELVIS", "SKULL"])
def test_non_chest_body_part_is_refused(tmp_path: Path, part: str) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, BodyPartExamined=part), tmp_path / "b.dcm")
    with pytest.raises(ImageReadError) as err:
        load_dicom(path)
    assert repr(part) in err.value.reason and "chest radiographs" in err.value.reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("part", ["CHEST", "THORAX", "chest", "PORT CHEST", "Thorax pa", "", "RIBS", "PORTABLE"])
def test_chest_or_unknown_body_part_is_read(tmp_path: Path, part: str) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, BodyPartExamined=part), tmp_path / "b.dcm")
    assert load_dicom(path).shape == (40, 48)


def test_dicom_without_pixel_data_is_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "TEST"
    path = save(ds, tmp_path / "report.dcm")
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert "no pixel data" in err.value.reason and "Basic Text SR" in err.value.reason


def test_too_many_pixels_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = save(make_ds(ramp12(), bits_stored=12), tmp_path / "big.dcm")

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data decoded despite the size limit")

    monkeypatch.setattr(dicom, "MAX_PIXELS", 40 * 48 - 1)  # the shared limit (covid_cxr.limits) as dicom sees it
    monkeypatch.setattr(dicom, "pixel_array", no_decoding)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert "decompression bomb" in err.value.reason and "48x40" in err.value.reason


def test_header_claiming_huge_image_refused_quickly(tmp_path: Path) -> None:
    ds = make_ds(ramp12(), bits_stored=12)
    ds.Rows = ds.Columns = 12_000  # 144 M pixels claimed; only 40x48 stored
    path = save(ds, tmp_path / "bomb.dcm")
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    # refused from the header (milliseconds; pydicom is already imported above); decoding 144 M pixels would take
    # seconds and 288 MB: 2 s leaves ~100x for a loaded machine
    assert time.perf_counter() - t0 < 2.0
    assert "decompression bomb" in err.value.reason and str(path) in str(err.value)


def test_not_dicom_named_dcm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)


def test_missing_dcm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "x.dcm"
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert "not found" in err.value.reason


def test_truncated_dicom_is_refused(tmp_path: Path) -> None:
    full = save(make_ds(ramp12((200, 200)), bits_stored=12), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_header_value_is_refused(tmp_path: Path) -> None:
    ds = make_ds(ramp12(), bits_stored=12)
    ds.NumberOfFrames = 11
    path = save(ds, tmp_path / "badvr.dcm")
    element = b"\x28\x00\x08\x00IS\x02\x0011"  # (0028,0008) Number of Frames, explicit VR little endian
    data = path.read_bytes()
    assert data.count(element) == 1
    # A value seen in the wild; pydicom only fails when the value is used.
    path.write_bytes(data.replace(element, element[:-2] + b"1A"))
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path) and "1A" in err.value.reason


def test_computed_radiography_sop_class_is_read(tmp_path: Path) -> None:
    ds = make_ds(ramp12(), bits_stored=12, modality="CR")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = save(ds, tmp_path / "cr.dcm")
    np.testing.assert_array_equal(load_dicom(path), load_dicom(save(make_ds(ramp12(), bits_stored=12),
                                                                     tmp_path / "dx.dcm")))


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LAT", "lateral ", "LAT LEFT"])
def test_lateral_view_is_refused(tmp_path: Path, view: str) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, BodyPartExamined="CHEST", ViewPosition=view), tmp_path / "lat.dcm")
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert "lateral view; covid-cxr reads frontal chest radiographs" in err.value.reason
    assert repr(view.strip()) in err.value.reason and "(0018,5101)" in err.value.reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("view", ["PA", "AP", "", "LLD", "RLD", "AP SUPINE"])
def test_frontal_or_unknown_view_is_read(tmp_path: Path, view: str) -> None:
    path = save(make_ds(ramp12(), bits_stored=12, ViewPosition=view), tmp_path / "v.dcm")
    assert load_dicom(path).shape == (40, 48)


# --------------------------------------------------------------------------- decoded-size limits, every syntax


def deflated_bomb(path: Path, ds: Dataset, pixel_bytes: int, private_bytes: int = 0) -> Path:
    """``ds`` (its PixelData left out) as Deflated Explicit VR Little Endian, followed by a PixelData element of
    ``pixel_bytes`` zeros (and before it a private OB element of ``private_bytes`` zeros), built from one
    compressed megabyte repeated: a few KB on disk per GB inflated, written in milliseconds."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    del ds.PixelData
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    mb = 1 << 20
    # Z_FULL_FLUSH ends each part on a byte boundary with no reference to earlier data, so a compressed
    # megabyte of zeros can be repeated.
    one_mb = z.compress(bytes(mb)) + z.flush(zlib.Z_FULL_FLUSH)

    def zeros(n: int) -> bytes:
        return one_mb * (n // mb) + z.compress(bytes(n % mb)) + z.flush(zlib.Z_FULL_FLUSH)

    out = z.compress(head.getvalue()) + z.flush(zlib.Z_FULL_FLUSH)
    if private_bytes:
        out += z.compress(b"\x09\x00\x10\x00LO\x04\x00ACME" + b"\x09\x00\x00\x10OB\x00\x00"
                          + struct.pack("<I", private_bytes)) + z.flush(zlib.Z_FULL_FLUSH) + zeros(private_bytes)
    out += z.compress(b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", pixel_bytes)) + z.flush(zlib.Z_FULL_FLUSH)
    out += zeros(pixel_bytes) + z.flush()
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + out)
    return path


def _refused_cheaply(path: Path, *needles: str, max_mb: float = 48.0) -> ImageReadError:
    """Loading ``path`` raises ImageReadError naming it, within a second and without allocating more than
    ``max_mb`` (tracemalloc sees NumPy's and Python's allocations, pydicom's buffers included)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageReadError) as err:
            load_image(path)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path)
    for needle in needles:
        assert needle in err.value.reason, (needle, err.value.reason)
    assert elapsed < 2.0, elapsed  # header-only refusals take milliseconds: ~100x room for a loaded machine
    assert peak < max_mb * 2**20, peak  # the bound that does not depend on load
    return err.value


def test_deflated_dicom_decodes_like_uncompressed(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_ds(ramp12(), bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    plain = load_dicom(save(ds, tmp_path / "plain.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = save(ds, tmp_path / "deflated.dcm")
    assert DeflatedExplicitVRLittleEndian.encode() in path.read_bytes()[:512]
    np.testing.assert_array_equal(load_image(path), plain)


def test_deflated_bomb_with_an_honest_header_is_refused_while_inflating(tmp_path: Path) -> None:
    """The issue's file: a 256x256 8-bit header, and pixel data that inflates to a GB (pydicom inflates the whole
    data set at once: 1 GB held, and 3 GB for the issue's 2.9 MB file)."""
    path = deflated_bomb(tmp_path / "bomb.dcm", make_ds(make_gray(1, (256, 256))), pixel_bytes=2**30)
    assert path.stat().st_size < 2 * 2**20
    _refused_cheaply(path, "inflates to more than", "256x256", "decompression bomb")


def test_deflated_bomb_in_the_header_is_refused_while_inflating(tmp_path: Path) -> None:
    """A private element of 200 MB before the pixel data: the header is never inflated past 16 MiB."""
    path = deflated_bomb(tmp_path / "bomb.dcm", make_ds(make_gray(1, (64, 64))), pixel_bytes=64 * 64,
                         private_bytes=200 * 2**20)
    _refused_cheaply(path, "inflates to more than 16,777,216 bytes", "before its pixel data")


def test_cut_or_corrupt_deflate_stream_is_refused(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_ds(ramp12((128, 128)), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = save(ds, tmp_path / "d.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(data[:400] + bytes(b ^ 0x5A for b in data[400:600]) + data[600:])
    for path in (cut, corrupt):
        with pytest.raises(ImageReadError) as err:
            load_image(path)
        assert err.value.path == str(path)


def _jpeg_ls_ds() -> Dataset:
    src = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if src is None:
        pytest.skip("pydicom's test file MR_small_jpeg_ls_lossless.dcm is not installed (no JPEG-LS encoder here)")
    ds = dicom.pydicom.dcmread(src)
    ds.Modality = "DX"
    return ds


def encoded(syntax: str) -> Dataset:
    """A small radiograph stored with ``syntax`` (the encoders of the tests above)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = ramp12()
    if syntax == "jpeg-ls":
        return _jpeg_ls_ds()
    if syntax == "jpeg-baseline":
        gray = make_gray(8, (40, 48))
        buf = BytesIO()
        Image.fromarray(gray).save(buf, "JPEG", quality=90)
        return _encapsulated(make_ds(gray), buf.getvalue(), JPEGBaseline8Bit)
    ds = make_ds(data, bits_stored=12)
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "jpeg-lossless":
        ds = _encapsulated(ds, _jpeg_lossless(data, 12), JPEGLosslessSV1)
    elif syntax == "jpeg2000":
        pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (the JPEG 2000 encoder) is not installed")
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


SYNTAXES = ["explicit", "implicit", "deflated", "rle", "jpeg-baseline", "jpeg-lossless", "jpeg-ls", "jpeg2000"]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_every_syntax_decodes_within_the_limits(tmp_path: Path, syntax: str) -> None:
    ds = encoded(syntax)
    path = save(ds, tmp_path / f"{syntax}.dcm")
    arr = load_image(path)
    assert arr.shape == (ds.Rows, ds.Columns) and arr.std() > 10


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_every_syntax_refuses_more_decoded_bytes_than_allowed_before_decoding(tmp_path: Path, syntax: str,
                                                                              monkeypatch) -> None:
    """Rows x Columns x Samples x Bits Allocated / 8 x frames is checked against the limit before any decoder
    runs (and, for the deflated syntax, before the pixel data is inflated)."""
    ds = encoded(syntax)
    path = save(ds, tmp_path / f"{syntax}.dcm")
    needed = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    monkeypatch.setattr(dicom, "MAX_DECODED_BYTES", needed)
    assert load_image(path).shape == (ds.Rows, ds.Columns)  # exactly at the limit: read

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data decoded despite the limit")

    monkeypatch.setattr(dicom, "MAX_DECODED_BYTES", needed - 1)
    monkeypatch.setattr(dicom, "pixel_array", no_decoding)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert err.value.path == str(path)
    assert f"{needed:,} bytes of decoded pixel data" in err.value.reason and "decompression bomb" in err.value.reason


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_every_syntax_refuses_a_header_claiming_too_many_frames(tmp_path: Path, syntax: str, monkeypatch) -> None:
    ds = encoded(syntax)
    ds.NumberOfFrames = 200_000  # 64x64x16 bits x 200,000 frames = 1.6 GB, one frame stored
    path = save(ds, tmp_path / f"{syntax}.dcm")
    monkeypatch.setattr(dicom, "pixel_array", lambda *a, **k: pytest.fail("decoded"))
    err = _refused_cheaply(path, "200000 frames", "decompression bomb")
    assert "more than the 200,000,000 allowed" in err.reason


def _patch_codestream_size(syntax: str, frame: bytes, width: int, height: int) -> bytes:
    data = bytearray(frame)
    if syntax == "jpeg2000":
        at = data.find(b"\xff\x4f\xff\x51") + 8
        struct.pack_into(">II", data, at, width, height)  # Xsiz, Ysiz (offsets are 0)
        return bytes(data)
    sof = {"jpeg-baseline": b"\xff\xc0", "jpeg-lossless": b"\xff\xc3", "jpeg-ls": b"\xff\xf7"}[syntax]
    at = data.find(sof)
    assert at > 0
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize("syntax", ["jpeg-baseline", "jpeg-lossless", "jpeg-ls", "jpeg2000"])
@pytest.mark.parametrize("size", [(9000, 9000), (48, 41), (20_000, 20_000)], ids=["81Mpx", "one-row-more", "400Mpx"])
def test_codestream_declaring_another_size_than_the_header_is_refused_before_decoding(
        tmp_path: Path, syntax: str, size: tuple[int, int], monkeypatch) -> None:
    """Decoders allocate what the codestream declares (a 64x48 header with a 9000x9000 JPEG frame took 2.3 s and
    390 MB to decode before this check), so the codestream's own header must agree with the DICOM header."""
    ds = encoded(syntax)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    assert dicom.codestream_size(frame) == (ds.Columns, ds.Rows, 1)
    ds.PixelData = encapsulate([_patch_codestream_size(syntax, frame, *size)])
    path = save(ds, tmp_path / f"{syntax}.dcm")
    monkeypatch.setattr(dicom, "pixel_array", lambda *a, **k: pytest.fail("decoded"))
    _refused_cheaply(path, f"declares a {size[0]}x{size[1]} image", f"header says {ds.Columns}x{ds.Rows}")


def test_uncompressed_pixel_data_longer_than_the_header_says_is_refused_unread(tmp_path: Path) -> None:
    ds = make_ds(make_gray(1, (64, 64)))
    ds.PixelData = bytes(64 * 2**20)  # 64 MB behind a 64x64 8-bit header
    path = save(ds, tmp_path / "long.dcm")
    _refused_cheaply(path, "uncompressed pixel data of 67,108,864 bytes", "64x64 x 1 sample x 8 bits")


def test_rle_frame_larger_than_any_encoding_of_its_image_is_refused(tmp_path: Path) -> None:
    """16 MB of replicate runs behind a 64x48 header: pydicom's own RLE decoder expands them to 1 GB before
    trimming (2.3 s, 1 GB measured); refused from the frame's length."""
    runs = struct.pack("<16I", 1, 64, *([0] * 14)) + bytes([0x81, 7]) * 8_000_000
    ds = _encapsulated(make_ds(make_gray(1, (48, 64))), runs, RLELossless)
    _refused_cheaply(save(ds, tmp_path / "rle.dcm"), "the RLE frame holds 16,000,064 bytes", max_mb=80)


def test_decoded_array_larger_than_the_header_says_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = save(make_ds(ramp12(), bits_stored=12), tmp_path / "x.dcm")
    monkeypatch.setattr(dicom, "pixel_array", lambda *a, **k: np.zeros((41, 48), np.uint16))  # a decoder gone wrong
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert "decoded to (41, 48) but the header says 48x40" in err.value.reason


def test_codestream_size_reads_each_header_kind() -> None:
    gray = make_gray(8, (40, 48))
    buf = BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=90)
    assert dicom.codestream_size(buf.getvalue()) == (48, 40, 1)
    assert dicom.codestream_size(_jpeg_lossless(ramp12(), 12)) == (48, 40, 1)
    rgb = BytesIO()
    Image.fromarray(np.stack([gray] * 3, -1)).save(rgb, "JPEG")
    assert dicom.codestream_size(rgb.getvalue()) == (48, 40, 3)
    for junk in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\x00" * 64, b"\xff\x4f\xff\x51\x00"):
        assert dicom.codestream_size(junk) is None
