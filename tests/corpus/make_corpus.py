"""Write the corpus files (run from the repository root: python tests/corpus/make_corpus.py).

Each file is an input that made covid-cxr fail before it was fixed; tests/test_fuzz_inputs.py checks every file
here (images: refused quickly with bounded memory; YAML: a one-line error). Add a file whenever fuzzing or a user
finds a new failure, and say in README.md what it did.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless  # noqa: E402
from test_dicom import _encapsulated, deflated_bomb, make_ds, ramp12, save  # noqa: E402

from conftest import make_gray  # noqa: E402


def images(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # 256x256 header, pixel data inflating to 64 MB (pydicom inflated the whole data set: 3 GB for a 2.9 MB file)
    deflated_bomb(out / "deflated-bomb-256px.dcm", make_ds(make_gray(1, (256, 256))), pixel_bytes=64 * 2**20)
    # a valid deflated file cut at 2/3: zlib.error escaped as a traceback
    ds = make_ds(ramp12((128, 128)), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = save(ds, out / "deflated-cut.dcm").read_bytes()
    (out / "deflated-cut.dcm").write_bytes(data[: len(data) * 2 // 3])
    # 64x48 header, a JPEG frame whose SOF says 9000x9000: 390 MB and 2.3 s to decode
    gray = np.full((48, 64), 100, np.uint8)
    buf = BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=90)
    frame = bytearray(buf.getvalue())
    at = frame.find(b"\xff\xc0")
    struct.pack_into(">HH", frame, at + 5, 9000, 9000)
    save(_encapsulated(make_ds(gray), bytes(frame), JPEGBaseline8Bit), out / "jpeg-sof-9000px.dcm")
    # 64x48 header, 128 KB of RLE replicate runs: pydicom's RLE decoder expands them 64x before trimming
    runs = struct.pack("<16I", 1, 64, *([0] * 14)) + bytes([0x81, 7]) * 65536
    save(_encapsulated(make_ds(gray), runs, RLELossless), out / "rle-runs-64x.dcm")
    # a PNG header claiming 10000x10000 RGBA: within MAX_PIXELS, but 400 MB decoded
    png = BytesIO()
    Image.new("L", (16, 16), 90).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[16:24] = struct.pack(">II", 10_000, 10_000)
    data[25] = 6
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    (out / "png-rgba-10000px.png").write_bytes(bytes(data))


def configs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "deep-nesting.yaml").write_text("epochs: " + "[" * 3000 + "]" * 3000 + "\n")  # RecursionError traceback
    (out / "bad-date.yaml").write_text("epochs: 2020-13-45\n")  # ValueError from PyYAML's date constructor
    # one option whose value holds a list of 9^8 strings built from 8 anchors: its repr in the error never ended
    items = ['&l1 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(2, 9)]
    (out / "alias-bomb.yaml").write_text("epochs: [\n  " + ",\n  ".join(items) + "\n]\n")
    (out / "seed-negative.yaml").write_text("seed: -1\n")  # NumPy refused it mid-run: "this is a bug"
    (out / "warmup-huge.yaml").write_text("warmup_epochs: 1.0e+308\n")  # OverflowError in the schedule
    (out / "workers-huge.yaml").write_text("workers: 1000000\n")  # would fork a million loader processes


def model_json_edits(out: Path) -> None:
    """Edits of an exported model.json (dotted path -> value) that loaded, crashed or exhausted memory before the
    checks of issue 18; the test applies each to a real export (its model.onnx unchanged, so the sha still matches)."""
    out.mkdir(parents=True, exist_ok=True)
    edits = {
        "threshold-nan": {"meta.threshold_log_odds": float("nan")},  # N4: every image called normal
        "threshold-minus-infinity": {"meta.threshold_log_odds": float("-inf")},  # N4: every image called covid
        "temperature-infinity": {"meta.temperature": float("inf")},  # N4: every probability 0.5
        "gate-threshold-nan": {"meta.gate.threshold": float("nan")},  # N4: every image in scope
        "gate-features-100000": {"meta.gate.feature_dim": 100_000, "meta.gate.n_means": 100_000},  # N6: 40 GB
        "labels-20000": {"meta.labels": [f"c{i:05d}" for i in range(20_000)]},  # N5 (10^6 in the issue: 4.96 GB)
        "labels-a-string": {"meta.labels": "covid"},  # N10: iterated letter by letter
        "format-a-word": {"format": "two"},  # N10: TypeError comparing versions
        "preprocess-mean-a-word": {"meta.preprocess.mean": "abc"},  # N10: failed at predict, not at load
        "preprocess-size-huge": {"meta.preprocess.size": 10**9},  # N10
        "meta-a-list": {"meta": [1, 2, 3]},  # N10: AttributeError
    }
    for name, edit in edits.items():
        (out / f"{name}.json").write_text(json.dumps(edit) + "\n")  # json writes NaN / Infinity as the attack did


if __name__ == "__main__":
    images(HERE / "images")
    configs(HERE / "yaml")
    model_json_edits(HERE / "model-json")
