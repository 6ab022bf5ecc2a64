"""serve: the HTTP API on the tiny trained run - predictions equal `covid-cxr predict`'s, ONNX equals PyTorch,
uploads are limited, sniffed and decoded with the right status codes, concurrent requests agree, and nothing a
client sends outlives its request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_export import SCOPE_RTOL, log_odds_atol, prob_atol, scope_atol

from conftest import make_gray
from covid_cxr import DISCLAIMER, __version__
from covid_cxr.deploy.serve import ServeConfig, create_app
from covid_cxr.deploy.serve.uploads import receive_upload
from covid_cxr.errors import CheckpointError, ConfigError, UploadError
from covid_cxr.imaging.images import load_image
from covid_cxr.model.inference import load_predictor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_bytes(seed: int = 3, size: tuple[int, int] = (72, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_gray(seed, size)).save(buf, "PNG")
    return buf.getvalue()


def cli_row(tiny_run: Path, path: Path) -> dict:
    """What `covid-cxr predict` writes for one file (the same Predictor, PyTorch backend)."""
    [row] = load_predictor(tiny_run, "torch", device="cpu").predict_files([path])
    return row


def phantom_png(tiny_run: Path) -> Path:
    """A phantom of tiny_run's own dataset: in scope by construction (it is like the training images)."""
    import yaml

    data = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data_absolute"])
    return sorted((data.parent / "synthetic-phantoms" / "covid").glob("*.png"))[0]


def post(client: TestClient, data: bytes, name: str = "x.png", heatmap: bool = False, ctype: str = "image/png"):
    return client.post(f"/v1/predict?heatmap={str(heatmap).lower()}", files={"file": (name, data, ctype)})


def write_dicom(path: Path, bits: int = 16) -> Path:
    """A MONOCHROME2 CR chest DICOM (Part 10, 'DICM' at byte 128) with 12 bits stored in 16, or 8 bits."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    img = make_gray(5, (80, 64)).astype(np.uint16)
    pixels = (img * 16).astype(np.uint16) if bits == 16 else img.astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "TEST"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12 if bits == 16 else 8)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(str(tiny_run), device="cpu")) as c:
        yield c


@pytest.fixture(scope="module")
def onnx_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of tiny_run's checkpoint in a folder of its own, so the app's export lands there."""
    run = tmp_path_factory.mktemp("serve-onnx") / "run"
    run.mkdir()
    shutil.copy2(tiny_run / "best.pt", run / "best.pt")
    (run / "source.txt").write_text(str(tiny_run))
    return run


def onnx_run_source(onnx_run: Path) -> Path:
    return Path((onnx_run / "source.txt").read_text())


@pytest.fixture(scope="module")
def onnx_client(onnx_run):
    with TestClient(create_app(str(onnx_run), backend="onnx", device="cpu")) as c:
        yield c


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model_loaded"] is True
    assert h["backend"] == "torch" and h["version"] == __version__
    assert h["labels"] == ["normal", "covid"] and h["checkpoint"] == "best.pt"
    assert h["max_upload_mb"] == 20 and h["disclaimer"] == DISCLAIMER and h["concurrency"] == 2
    # provenance: what the model is and what it was trained on (the page shows it)
    m = h["model"]
    assert m["checkpoint"] == "best.pt" and len(m["checkpoint_sha256"]) == 64 and m["backend"] == "torch"
    assert m["positive_class"] == "covid" and m["threshold_text"].startswith("P(covid) >= ")
    assert m["image_size"] == 32 and m["out_of_scope_gate"] is True and m["created"]
    assert m["trained_on"]["sources"] == ["synthetic-phantoms"]
    assert m["trained_on"]["synthetic_sources"] == ["synthetic-phantoms"] and m["trained_on"]["n_train"] > 0
    assert m["trained_with"]["covid_cxr"] == __version__


def test_page_is_one_self_contained_file(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "Research use only — not a diagnostic device" in html
    for element in ('id="file"', 'id="result-label"', 'id="result-prob"', 'id="heatmap"', 'id="banner"'):
        assert element in html
    # Offline machines: no script, style, font or image from anywhere but this server.
    assert not any(f'{attr}="http' in html or f"{attr}='http" in html for attr in ("src", "href"))
    assert "@import" not in html and "url(http" not in html
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["required"] == ["file"]


def test_predict_png_equals_the_cli_prediction(client, tiny_run, tmp_path):
    data = png_bytes()
    r = post(client, data)
    assert r.status_code == 200, r.text
    out = r.json()
    probs = out["probabilities"]
    assert list(probs) == ["normal", "covid"] and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)  # float64
    assert out["label"] in out["model"]["labels"] and out["disclaimer"] == DISCLAIMER
    assert out["positive_class"] == "covid"
    assert out["image"] == {"width": 64, "height": 72}
    assert out["model"]["backend"] == "torch" and out["model"]["version"] == __version__
    assert out["model"]["checkpoint"] == "best.pt" and len(out["model"]["checkpoint_sha256"]) == 64
    assert "heatmap_png_base64" not in out and "heatmap" not in out
    assert out["threshold_text"] == out["model"]["threshold_text"] and "1.00" not in out["threshold_text"]
    # The one prediction path: the same numbers as `covid-cxr predict` on the same file. Same Predictor code, the
    # same 1-image batch, process and thread count: the same kernels give the same float32 outputs (MKL and oneDNN
    # are run-to-run reproducible at a fixed thread count); 1e-6 is slack for float64 post-processing only.
    (tmp_path / "x.png").write_bytes(data)
    row = cli_row(tiny_run, tmp_path / "x.png")
    assert probs["covid"] == pytest.approx(row["prob_covid"], abs=1e-6)
    assert out["label"] == row["predicted_label"] and out["threshold"] == row["threshold"]
    assert out["log_odds"] == pytest.approx(row["log_odds"], abs=1e-6)
    assert out["scope_score"] == pytest.approx(row["scope_score"], rel=1e-6)
    assert out["in_scope"] == row["in_scope"]


def test_out_of_scope_images_are_flagged(client, tiny_run):
    """The gate's verdict travels into the response: a phantom like the training images is in scope; a
    random-texture image (nothing like a chest X-ray) is flagged, with a warning, and still answered."""
    gate = client.get("/healthz").json()["model"]["out_of_scope_gate"]
    assert gate is True
    phantom = phantom_png(tiny_run)
    inside = post(client, phantom.read_bytes()).json()
    assert inside["in_scope"] is True and "scope_warning" not in inside
    assert inside["scope_score"] == pytest.approx(cli_row(tiny_run, phantom)["scope_score"], rel=1e-6)  # as above
    outside = post(client, png_bytes(4)).json()
    assert outside["in_scope"] is False and outside["scope_score"] > inside["scope_score"]
    assert "unlike" in outside["scope_warning"] and "not meaningful" in outside["scope_warning"]
    assert outside["label"] in ("normal", "covid")  # flagged, not refused


def test_heatmap_is_a_base64_png(client):
    r = post(client, png_bytes(), heatmap=True)
    assert r.status_code == 200, r.text
    out = r.json()
    raw = base64.b64decode(out["heatmap_png_base64"], validate=True)
    assert raw.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        assert img.width > 100 and img.height > 100
    assert out["heatmap"]["method"] == "Grad-CAM" and out["heatmap"]["target"] == "covid"
    assert "ONNX" not in out["heatmap"]["computed_with"]
    # Asking for the heatmap does not change the prediction (exact: the same predictor call; the heatmap has its own
    # model copy and forward pass).
    assert out["probabilities"] == post(client, png_bytes()).json()["probabilities"]


def test_heatmap_of_an_absurd_aspect_ratio_is_refused(client):
    """A 10 x 5000 image gets a prediction, but no heatmap: a 422 that says why (the aspect ratio, and how to get
    the prediction alone), not that the image cannot be decoded (it can)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 5000), 128, np.uint8)).save(buf, "PNG")
    assert post(client, buf.getvalue()).status_code == 200
    r = post(client, buf.getvalue(), heatmap=True)
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail.startswith("no heatmap for this image: 5000x10 pixels is an aspect ratio")
    assert "without heatmap=true" in detail and "decode" not in detail and "covid-cxr-upload" not in detail


def test_onnx_backend_agrees_with_torch(client, onnx_client, onnx_run):
    assert (onnx_run / "model.onnx").is_file() and (onnx_run / "model.json").is_file()
    assert onnx_client.get("/healthz").json()["backend"] == "onnx"
    phantom = phantom_png(onnx_run_source(onnx_run))
    meta = load_predictor(onnx_run, "torch", device="cpu").meta
    t = meta.temperature
    for data in (png_bytes(3), png_bytes(4), phantom.read_bytes()):
        a, b = post(client, data).json(), post(onnx_client, data, heatmap=True).json()
        # torch vs ONNX Runtime: test_export's derived bounds (were 1e-4 for P and log-odds, what they give only for
        # T >= 0.5 and T >= 2, and 1e-4 relative for the score)
        for label in a["probabilities"]:
            assert abs(a["probabilities"][label] - b["probabilities"][label]) <= prob_atol(t)
        assert b["log_odds"] == pytest.approx(a["log_odds"], abs=log_odds_atol(t))
        # the gate's score comes out of the ONNX graph too
        assert b["scope_score"] == pytest.approx(a["scope_score"], rel=SCOPE_RTOL, abs=SCOPE_RTOL)
        if abs(a["scope_score"] - meta.gate.threshold) > scope_atol(meta.gate.threshold):  # not on the gate's edge
            assert b["in_scope"] == a["in_scope"]
        assert b["threshold_text"] == a["threshold_text"]
        assert b["model"]["backend"] == "onnx" and b["model"]["onnx_file"] == "model.onnx"
        assert b["model"]["checkpoint_sha256"] == a["model"]["checkpoint_sha256"]
        assert "ONNX" in b["heatmap"]["computed_with"]  # says the heatmap came from the PyTorch checkpoint
        assert base64.b64decode(b["heatmap_png_base64"]).startswith(PNG_MAGIC)


def test_onnx_from_another_checkpoint_is_refused(onnx_client, onnx_run, tmp_path):
    for name in ("model.onnx", "model.json"):
        shutil.copy2(onnx_run / name, tmp_path / name)
    doc = json.loads((tmp_path / "model.json").read_text())
    doc["onnx"]["source_checkpoint"]["sha256"] = "0" * 64
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="another checkpoint"):
        create_app(str(onnx_run), backend="onnx", onnx_path=str(tmp_path / "model.onnx"), device="cpu")


def test_upload_over_the_limit_is_413(tiny_run):
    small, big = png_bytes(size=(48, 40)), np.random.default_rng(0).integers(0, 256, (200, 200), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    big_png = buf.getvalue()
    assert len(small) < 0.01 * 2**20 < len(big_png)
    with TestClient(create_app(str(tiny_run), max_upload_mb=0.01, device="cpu")) as c:
        r = post(c, big_png)
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        # Without a Content-Length (chunked), the limit is enforced while reading.
        boundary = "b0undary"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + big_png + f"\r\n--{boundary}--\r\n".encode()
        r = c.post("/v1/predict", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        assert post(c, small).status_code == 200


def test_limit_stops_reading_the_stream(tmp_path):
    """The body is not read to its end once the file passes the limit, and what was written is in `folder`."""
    consumed = []

    async def body():
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG_MAGIC
        for i in range(1000):
            consumed.append(i)
            yield b"\0" * 65536
        yield b"\r\n--xx--\r\n"

    with pytest.raises(UploadError) as info:
        asyncio.run(receive_upload({"content-type": "multipart/form-data; boundary=xx"}, body(), tmp_path, 2**20))
    assert info.value.status == 413 and "1 MB" in info.value.message
    assert len(consumed) < 20
    assert [p.name for p in tmp_path.iterdir()] == ["upload.bin"]


def test_non_images_are_415(client):
    r = post(client, b"hello, this is not an X-ray\n" * 10, name="notes.png", ctype="text/plain")
    assert r.status_code == 415 and "PNG, JPEG, WebP or DICOM" in r.json()["detail"]
    assert post(client, b"%PDF-1.7\n" + b"x" * 300, name="scan.pdf").status_code == 415
    r = client.post("/v1/predict", json={"file": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_undecodable_images_are_422(client):
    data = png_bytes()
    r = post(client, data[: len(data) // 2])
    assert r.status_code == 422
    truncated = r.json()["detail"]
    assert "cannot decode" in truncated and "truncated" in truncated
    r = post(client, b"\xff\xd8\xff\xe0" + b"\0" * 100, name="x.jpg")
    assert r.status_code == 422
    for detail in (truncated, r.json()["detail"]):
        assert "covid-cxr-upload" not in detail and tempfile.gettempdir() not in detail  # no server paths
    r = client.post("/v1/predict", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]


@pytest.mark.parametrize("bits", [16, 8])
def test_dicom_upload(client, tiny_run, tmp_path, bits):
    path = write_dicom(tmp_path / "chest", bits)  # no ending: recognised by 'DICM' at byte 128
    r = post(client, path.read_bytes(), name="IM0001", ctype="application/dicom")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["image"] == {"width": 64, "height": 80}
    row = cli_row(tiny_run, path)
    # the same path as `covid-cxr predict` (see test_predict_png_equals_the_cli_prediction): exact but for float64
    assert out["probabilities"]["covid"] == pytest.approx(row["prob_covid"], abs=1e-6)
    assert out["in_scope"] == row["in_scope"]
    assert load_image(path).shape == (80, 64)


def test_concurrent_requests_agree_and_stay_within_the_pool(tiny_run):
    app = create_app(str(tiny_run), concurrency=2, device="cpu")
    engine, lock, state = app.state.engine, threading.Lock(), {"now": 0, "max": 0}
    analyse = engine.analyse

    def counted(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.02)  # hold the slot long enough for the others to pile up
            return analyse(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    engine.analyse = counted
    images = {seed: png_bytes(seed) for seed in (3, 4)}
    with TestClient(app) as c:
        def two_requests(i: int) -> list[tuple[int, int, dict]]:
            seed = 3 + i % 2
            responses = [post(c, images[seed]) for _ in range(2)]
            return [(seed, r.status_code, r.json()) for r in responses]

        with ThreadPoolExecutor(8) as pool:
            results = [x for batch in pool.map(two_requests, range(8)) for x in batch]
    assert len(results) == 16 and all(status == 200 for _, status, _ in results)
    for seed in images:
        probs = [out["probabilities"] for s, _, out in results if s == seed]
        # exact: the same 1-image forward on either pool thread, each with the process's intra-op thread count
        assert len(probs) == 8 and all(p == probs[0] for p in probs)
    assert 1 <= state["max"] <= 2


def test_nothing_outlives_the_request(client, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    engine, seen = client.app.state.engine, []
    analyse = engine.analyse

    def recording(path, *args, **kwargs):
        seen.append((path, path.is_file()))
        return analyse(path, *args, **kwargs)

    monkeypatch.setattr(engine, "analyse", recording)
    data = png_bytes()
    assert post(client, data, name="../../etc/passwd.png").status_code == 200
    assert post(client, data, heatmap=True).status_code == 200
    assert post(client, data[:300]).status_code == 422
    assert post(client, b"plain text" * 50).status_code == 415
    assert post(client, write_dicom(tmp_path / "d.dcm").read_bytes(), name="d.dcm").status_code == 200
    assert len(seen) == 4
    for path, existed in seen:
        assert existed and path.parent.parent == spool and path.name.startswith("upload.")
    assert list(spool.iterdir()) == []


def test_config_checks_and_run(tiny_run, monkeypatch):
    from covid_cxr.config import make_config

    for bad in ({"port": 70000}, {"concurrency": 0}, {"max_upload_mb": 0}, {"device": "tpu"}, {"host": ""}):
        with pytest.raises(ConfigError):
            ServeConfig(run=str(tiny_run), **bad)
    # choices and types are checked where options come in: the CLI/YAML route (make_config) and create_app
    for bad in ({"backend": "tf"}, {"checkpoint": "x"}, {"port": "80"}, {"concurrency": 1.5}):
        with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
            make_config(ServeConfig, {"run": str(tiny_run), **bad})
    for bad in ({"concurrency": 0}, {"backend": "tf"}, {"checkpoint": "x"}, {"device": "tpu"}):
        with pytest.raises(ConfigError):
            create_app(str(tiny_run), **bad)

    import uvicorn

    from covid_cxr.deploy import serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    serve.run(ServeConfig(run=str(tiny_run), port=8123, concurrency=1, max_upload_mb=1.5, device="cpu"))
    [(app, kw)] = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    assert app.state.max_bytes == int(1.5 * 2**20) and app.state.pool._max_workers == 1
