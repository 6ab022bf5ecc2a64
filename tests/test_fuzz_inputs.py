"""Property-based fuzzing (hypothesis) of everything a user hands covid-cxr: image bytes and YAML options.

Property: our own clear error (an ImageReadError naming the file, a ConfigError, a one-line CLI error with exit
status 2) or a valid result; never another exception, never more than a bounded time and memory.

* mutated PNG, JPEG and DICOM bytes (uncompressed, deflated, RLE, JPEG baseline and lossless, JPEG-LS, JPEG 2000)
  into ``load_image``, with the decoding limits lowered so that "bounded" is tight and cheap to check;
* DICOM headers whose size, bit depth, frame and colour elements take arbitrary values;
* YAML options files: arbitrary values of every option of every command into ``make_config``, and mutated
  shipped configs through the command line.

The runs are derandomized (the same examples on every machine) and small; ``COVID_CXR_FUZZ_EXAMPLES=2000`` fuzzes
longer. Every input that found a bug is kept: as ``@example`` here, and as files in tests/corpus/ (checked with the
real limits by :func:`test_corpus`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import struct
import time
import tracemalloc
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import covid_cxr.imaging.dicom as dicom
import covid_cxr.imaging.images as images
from conftest import make_gray
from covid_cxr import config as C
from covid_cxr.cli import CONFIGS
from covid_cxr.data.options import DataConfig
from covid_cxr.errors import ConfigError, ImageReadError
from covid_cxr.imaging.images import load_image
from covid_cxr.training.options import TrainConfig

CORPUS = Path(__file__).resolve().parent / "corpus"
EXAMPLES = int(os.environ.get("COVID_CXR_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
"""Time is bounded by the property itself (a loaded 2-core machine makes hypothesis' deadlines flaky)."""

SMALL = {"MAX_PIXELS": 1_000_000, "MAX_DECODED_BYTES": 2_000_000, "MAX_HEADER_BYTES": 1 << 20,
         "PIXEL_DATA_SLACK": 1 << 16}
"""Decoding limits while fuzzing: a mutated header may claim anything up to them, so memory stays small."""
PEAK_BYTES = 64 << 20
"""Most Python/NumPy memory (tracemalloc) one decode may use under SMALL (16x its decoded-bytes limit and slack)."""
RSS_GROWTH_BYTES = 512 << 20
"""Most the process's peak resident memory may grow over a whole fuzz test (C decoders are not seen by
tracemalloc; a multi-GB blow-up is)."""
SECONDS = 15.0
"""Most one fuzzed input may take. Under SMALL a decode touches <= 1 M pixels and 2 MB (tens of milliseconds on one
core) and a config is a few KB of YAML; 15 s is > 100x that for a loaded 2-core machine, while what the bound exists
to catch - a parser or decoder that goes quadratic or expands a bomb - runs for minutes."""


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    for module in (images, dicom):
        for name, value in SMALL.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def decode_property(path: Path, rss_start: int) -> np.ndarray | None:
    """load_image(path) either returns a valid image or raises ImageReadError naming the file; bounded time and
    memory either way. Returns the image (None when refused)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom and Pillow warn about what they repair
            try:
                arr = load_image(path)
            except ImageReadError as exc:
                assert exc.path == str(path) and str(path) in str(exc)
                arr = None
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS, elapsed
    assert peak < PEAK_BYTES, peak
    assert _maxrss() - rss_start < RSS_GROWTH_BYTES
    if arr is not None:
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 2
        assert min(arr.shape) >= 8 and arr.size <= SMALL["MAX_PIXELS"]
    return arr


# ----------------------------------------------------------------------------- seed files


def _dicom_seeds() -> dict[str, bytes]:
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                             JPEGLosslessSV1, RLELossless)
    from test_dicom import _jpeg_lossless, make_ds, ramp12

    def dump(ds) -> bytes:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    data = ramp12((24, 20))
    seeds = {"explicit": dump(make_ds(data, bits_stored=12, WindowCenter=2000, WindowWidth=3000))}
    ds = make_ds(data, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    seeds["implicit"] = dump(ds)
    ds = make_ds(data, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    seeds["deflated"] = dump(ds)
    ds = make_ds(data, bits_stored=12)
    ds.compress(RLELossless)
    seeds["rle"] = dump(ds)
    ds = make_ds(data, bits_stored=12)
    ds.PixelData = encapsulate([_jpeg_lossless(data, 12)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    seeds["jpeg-lossless"] = dump(ds)
    gray = make_gray(8, (24, 20))
    buf = BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=90)
    ds = make_ds(gray)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    seeds["jpeg-baseline"] = dump(ds)
    with contextlib.suppress(Exception):  # needs pylibjpeg-openjpeg's encoder
        ds = make_ds(data, bits_stored=12)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        seeds["jpeg2000"] = dump(ds)
    src = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if src is not None:
        import pydicom

        ds = pydicom.dcmread(src)
        ds.Modality = "DX"
        seeds["jpeg-ls"] = dump(ds)
    seeds["multiframe"] = dump(make_ds(np.stack([data, data[::-1]]), bits_stored=12))
    rgb = np.stack([gray, gray[::-1], 255 - gray], -1)
    seeds["rgb"] = dump(make_ds(rgb, photometric="RGB"))
    return seeds


@functools.lru_cache(maxsize=1)
def seeds() -> dict[str, tuple[str, bytes]]:
    """name -> (file suffix, bytes) of small valid files of every kind we read."""
    out: dict[str, tuple[str, bytes]] = {}
    gray = make_gray(1, (24, 20))
    for mode in ("L", "RGB", "RGBA", "P", "I;16", "LA"):
        img = Image.fromarray(gray)
        img = img.convert(mode) if mode != "I;16" else Image.fromarray(gray.astype(np.uint16) * 257)
        buf = BytesIO()
        img.save(buf, "PNG")
        out[f"png-{mode}"] = (".png", buf.getvalue())
    for mode, kw in (("L", {}), ("RGB", {}), ("RGB", {"progressive": True}), ("L", {"exif": _exif_rotated()})):
        buf = BytesIO()
        Image.fromarray(gray).convert(mode).save(buf, "JPEG", quality=85, **kw)
        out[f"jpeg-{mode}-{len(out)}"] = (".jpg", buf.getvalue())
    for name, data in _dicom_seeds().items():
        out[f"dicom-{name}"] = (".dcm", data)
    return out


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    return exif.tobytes()


def test_every_seed_decodes(tmp_path: Path) -> None:
    """The fuzzer starts from valid files (else it would only test refusals)."""
    rss = _maxrss()
    for name, (suffix, data) in seeds().items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        assert decode_property(path, rss) is not None, name
    assert {"dicom-deflated", "dicom-rle", "dicom-jpeg-baseline", "dicom-jpeg-lossless"} <= set(seeds())


# ----------------------------------------------------------------------------- mutated bytes


_SPECIAL_INTS = [0, 1, 2, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_file(draw, kinds: tuple[str, ...]) -> tuple[str, str, bytes]:
    """(seed name, suffix, bytes): a seed with 1-6 mutations, mostly in its header (where sizes live)."""
    name = draw(st.sampled_from(sorted(n for n in seeds() if n.startswith(kinds))))
    suffix, original = seeds()[name]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        head = min(len(data) - 1, 1024)
        pos = draw(st.one_of(st.integers(0, head), st.integers(0, len(data) - 1)))
        op = draw(st.sampled_from(["flip", "byte", "int16", "int32", "insert", "delete", "truncate", "repeat"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op in ("int16", "int32"):
            fmt = draw(st.sampled_from(["<", ">"])) + ("H" if op == "int16" else "I")
            value = draw(st.sampled_from(_SPECIAL_INTS)) & (0xFFFF if op == "int16" else 0xFFFFFFFF)
            data[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        else:  # repeat a slice: lengths and offsets no longer match
            k = draw(st.integers(1, 256))
            data[pos:pos] = data[pos:pos + k] * draw(st.integers(2, 8))
    return name, suffix, bytes(data)


def _check_mutated(tmp_path: Path, case: tuple[str, str, bytes]) -> None:
    name, suffix, data = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    decode_property(path, RSS_START[0])


RSS_START = [0]


@pytest.fixture(autouse=True)
def _rss_start():
    RSS_START[0] = _maxrss()


@FUZZ
@given(case=mutated_file(("png", "jpeg")))
def test_mutated_png_and_jpeg_bytes(tmp_path_factory, case) -> None:
    _check_mutated(tmp_path_factory.mktemp("png"), case)


@FUZZ
@given(case=mutated_file(("dicom",)))
@example(case=("dicom-deflated", ".dcm", (CORPUS / "images" / "deflated-cut.dcm").read_bytes()))
def test_mutated_dicom_bytes(tmp_path_factory, case) -> None:
    _check_mutated(tmp_path_factory.mktemp("dcm"), case)


_HEADER_VALUES = st.one_of(st.none(), st.sampled_from(_SPECIAL_INTS), st.integers(0, 70_000))


@FUZZ
@given(seed=st.sampled_from(["dicom-explicit", "dicom-deflated", "dicom-rle", "dicom-jpeg-baseline",
                             "dicom-jpeg-lossless", "dicom-multiframe", "dicom-rgb"]),
       rows=_HEADER_VALUES, columns=_HEADER_VALUES, bits=st.one_of(st.none(), st.sampled_from([0, 1, 8, 12, 16, 32,
                                                                                                64, 255])),
       samples=st.one_of(st.none(), st.sampled_from([0, 1, 2, 3, 4, 65535])),
       frames=st.one_of(st.none(), st.sampled_from(["0", "1", "2", "-1", "1000000", "4294967296", "x"])),
       photometric=st.one_of(st.none(), st.sampled_from(["MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "X"])),
       signed=st.one_of(st.none(), st.sampled_from([0, 1, 2])))
@example(seed="dicom-explicit", rows=0xFFFF, columns=0xFFFF, bits=16, samples=3, frames=None, photometric=None,
         signed=None)
@example(seed="dicom-explicit", rows=None, columns=None, bits=None, samples=None, frames="4294967296",
         photometric=None, signed=None)
def test_dicom_headers_with_arbitrary_sizes(tmp_path_factory, seed, rows, columns, bits, samples, frames, photometric,
                                            signed) -> None:
    """The elements a decoder sizes its buffers from, set to anything (the pixel data stays as it was)."""
    import pydicom

    ds = pydicom.dcmread(BytesIO(seeds()[seed][1]))
    for keyword, value in (("Rows", rows), ("Columns", columns), ("BitsAllocated", bits),
                           ("SamplesPerPixel", samples), ("NumberOfFrames", frames),
                           ("PhotometricInterpretation", photometric), ("PixelRepresentation", signed)):
        if value is None:
            continue
        if keyword == "NumberOfFrames":
            ds.add_new(0x00280008, "IS", value) if value != "x" else ds.add_new(0x00280008, "LO", value)
        else:
            setattr(ds, keyword, value)
    path = tmp_path_factory.mktemp("hdr") / "h.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds.save_as(path, enforce_file_format=True)
        except (ValueError, TypeError, OverflowError, struct.error, OSError):
            return  # pydicom cannot write this combination (it wraps struct errors in OSError): nothing to read
    decode_property(path, RSS_START[0])


# ----------------------------------------------------------------------------- YAML options


_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(_SPECIAL_INTS),
                     st.floats(allow_nan=True, allow_infinity=True), _TEXT,
                     st.sampled_from(["auto", "cpu", "cuda:0", "none", "imagenet", "1e400", "-1", "0", "NaN"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=12)


@st.composite
def options(draw, cls: type) -> dict:
    names = [f.name for f in C.dataclasses.fields(cls)]
    keys = draw(st.lists(st.one_of(st.sampled_from(names), _TEXT.filter(bool)), max_size=6, unique=True))
    return {k: draw(_VALUES) for k in keys}


def _config_property(cls: type, opts: dict, tmp_path: Path) -> None:
    path = tmp_path / "options.yaml"
    try:
        path.write_text(yaml.safe_dump(opts, allow_unicode=True))
    except yaml.YAMLError:
        return
    overrides = {n: "x" for n in C.required_fields(cls) if n not in opts}
    overrides = {k: (("x",) if k in ("inputs",) else (("folder", "x"),) if k == "sources" else v)
                 for k, v in overrides.items()}
    t0 = time.perf_counter()
    try:
        cfg = C.make_config(cls, overrides, str(path))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 2000, message[:3000]
        assert "Traceback" not in message and "Config" not in message.replace("ConfigError", "")
    else:
        assert isinstance(cfg, cls)
        cfg.to_dict()  # what is written next to every output
    assert time.perf_counter() - t0 < SECONDS


@FUZZ
@given(data=st.data())
@example(data=None)
def test_arbitrary_yaml_options_for_every_command(tmp_path_factory, data) -> None:
    tmp = tmp_path_factory.mktemp("yaml")
    if data is None:  # the bug cases, kept
        for cls, opts in ((TrainConfig, {"seed": -1}), (TrainConfig, {"warmup_epochs": 1e308}),
                          (DataConfig, {"workers": 10**9, "seed": 2**40}),
                          (TrainConfig, {"device": "x" * 5000})):
            _config_property(cls, opts, tmp)
        return
    cls = data.draw(st.sampled_from(list(CONFIGS.values())))
    _config_property(cls, data.draw(options(cls)), tmp)


_YAML_NOISE = st.sampled_from(["&a ", "*a", "!!python/object:os.system ", "!!binary ", "{", "}", "[", "]", ": ",
                               "- ", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\t", "\0", "\ufeff", "'", '"',
                               "? ", "@", "`", "#", "\n  ", "2020-13-45", ".nan", "0x", "1e400", "~", "<<: *a\n"])


@st.composite
def mutated_yaml(draw) -> str:
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    text = draw(st.sampled_from(shipped)).read_text()
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.one_of(_YAML_NOISE, _TEXT)) + text[pos:]
    return text


def _stub_train(cfg):
    return {"run": cfg.out, "epochs_run": 1, "best_val_auc": 0.5, "best_epoch": 1, "best_checkpoint": "best.pt"}


@FUZZ
@given(text=mutated_yaml())
@example(text="epochs: " + "[" * 3000 + "]" * 3000 + "\n")
@example(text="epochs: 2020-13-45\n")
@example(text=(CORPUS / "yaml" / "alias-bomb.yaml").read_text())
def test_mutated_yaml_through_the_command_line(tmp_path_factory, capsys, text) -> None:
    from unittest import mock

    from covid_cxr.cli import main

    tmp = tmp_path_factory.mktemp("cli")
    path = tmp / "train.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    capsys.readouterr()
    t0 = time.perf_counter()
    with mock.patch("covid_cxr.training.train.run", _stub_train):
        status = main(["train", "--config", str(path), "--data", str(tmp / "X"), "--out", str(tmp / "Y")])
    out = capsys.readouterr()
    assert time.perf_counter() - t0 < SECONDS
    assert status in (0, 2), out.err
    if status == 2:
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("covid-cxr: error: ") and len(lines[0]) < 2000, out.err[:3000]
        assert "Traceback" not in out.err


# ----------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("path", sorted((CORPUS / "images").glob("*")), ids=lambda p: p.name)
def test_corpus_images_are_refused_cheaply_with_the_real_limits(path: Path, monkeypatch) -> None:
    """Every image that once found a bug, with the limits as shipped: refused within seconds and without the
    memory its header or stream would have cost."""
    monkeypatch.undo()  # the real limits
    rss = _maxrss()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ImageReadError) as err:
                load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path)
    # refused from headers or limits (milliseconds): 5 s is > 100x; the memory bounds do not depend on load
    assert time.perf_counter() - t0 < 5.0 and peak < 48 << 20 and _maxrss() - rss < 256 << 20


@pytest.mark.parametrize("path", sorted((CORPUS / "yaml").glob("*.yaml")), ids=lambda p: p.name)
def test_corpus_configs_are_one_line_errors(path: Path, capsys, tmp_path) -> None:
    from covid_cxr.cli import main

    t0 = time.perf_counter()
    assert main(["train", "--config", str(path), "--data", str(tmp_path / "X"), "--out", str(tmp_path / "Y")]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < SECONDS
    assert err.count("\n") == 1 and err.startswith("covid-cxr: error: ") and len(err) < 2000, err[:3000]


def _set_dotted(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


@pytest.mark.parametrize("path", sorted((CORPUS / "model-json").glob("*.json")), ids=lambda p: p.stem)
def test_corpus_model_json_edits_are_refused_at_load(path: Path, tiny_exported, tmp_path) -> None:
    """Every model.json edit that once loaded, crashed or exhausted memory (issue 18: N4, N5, N6, N10), applied to a
    real export whose model.onnx still matches: one CheckpointError line naming model.json, before any session or
    tensor exists, within seconds and small memory."""
    import json
    import shutil

    from covid_cxr.errors import CheckpointError
    from covid_cxr.model.onnx_model import OnnxModel

    run = tmp_path / "run"
    shutil.copytree(tiny_exported, run)
    doc = json.loads((run / "model.json").read_text())
    for dotted, value in json.loads(path.read_text()).items():
        _set_dotted(doc, dotted, value)
    (run / "model.json").write_text(json.dumps(doc))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as err:
            OnnxModel(run / "model.onnx", device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "model.json" in message and "\n" not in message and len(message) < 2000, message[:3000]
    # refused from the metadata alone: the file is < 1 MB, so 48 MB of Python allocations is far above parsing it
    assert time.perf_counter() - t0 < SECONDS and peak < 48 << 20
