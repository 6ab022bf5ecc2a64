"""Lean installs: the base install runs ONNX inference without PyTorch, extras are where pyproject says, a command
that needs a missing extra says which, and (slow) the wheel builds with everything inside.

"Without PyTorch" is tested by running the commands in a fresh interpreter where importing torch, torchvision,
pandas, matplotlib, scikit-learn, scipy, onnx and onnxscript fails, as it would in `pip install covid-cxr[serve]`.
(CI also installs the built wheel with [serve] alone into an empty venv and predicts: .ci/lean-install.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_api import _phantom_images

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "pandas", "matplotlib", "sklearn", "scipy", "onnx", "onnxscript", "pydicom")

PRELUDE = f"""
import json, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as in a lean install
def report(rc):
    print(json.dumps({{"rc": rc, "imported": sorted(m for m in sys.modules if sys.modules[m] is not None
                                                   and m.split('.')[0] in {BLOCKED!r})}}), file=sys.stderr)
from covid_cxr.cli import main
"""


def _lean(code: str, *args: str, timeout: int = 180) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "{}"
    return proc, json.loads(last) if last.startswith("{") else {}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_base_install_is_onnx_inference_and_the_rest_are_extras():
    project = _pyproject()["project"]
    assert _names(project["dependencies"]) == {"numpy", "pillow", "onnxruntime", "pyyaml", "tqdm"}
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert {"torch", "torchvision", "scikit-learn", "matplotlib", "pandas", "imagehash", "scipy", "onnx", "onnxscript",
            "safetensors"} <= extras["train"]
    assert {"pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"} <= extras["dicom"]
    assert {"fastapi", "uvicorn", "python-multipart"} <= extras["serve"]
    assert {"highdicom", "pynetdicom"} <= extras["pacs"]
    assert project["optional-dependencies"]["all"] == ["covid-cxr[train,dicom,pacs,serve,track]"]
    assert "pytest" in extras["test"]
    assert "'.[all,test]'" in (REPO / "Makefile").read_text()


def test_predict_with_the_onnx_backend_runs_without_pytorch(tiny_exported, phantom_dataset):
    image = _phantom_images(phantom_dataset, 1)[0]
    proc, doc = _lean("rc = main(sys.argv[1:]); report(rc)", "predict", "--backend", "onnx", "--run",
                      str(tiny_exported), str(image), "--device", "cpu", "--format", "json")
    assert doc.get("rc") == 0, proc.stderr[-2000:]
    assert doc["imported"] == []
    rows = json.loads(proc.stdout)["predictions"]
    assert rows[0]["path"] == str(image) and rows[0]["in_scope"] in (True, False)


def test_serve_with_the_onnx_backend_runs_without_pytorch(tiny_exported, phantom_dataset):
    """`covid-cxr serve --backend onnx` as the CLI runs it, with uvicorn's listener replaced by an in-process client."""
    image = _phantom_images(phantom_dataset, 1)[0]
    code = f"""
import uvicorn
from starlette.testclient import TestClient
def listen(app, **kwargs):
    with TestClient(app) as c:
        health = c.get("/healthz")
        with open({str(image)!r}, "rb") as f:
            answer = c.post("/v1/predict", files={{"file": ("x.png", f, "image/png")}})
        print(json.dumps({{"health": health.status_code, "predict": answer.status_code,
                          "label": answer.json().get("label"), "backend": health.json().get("backend")}}))
uvicorn.run = listen
rc = main(sys.argv[1:]); report(rc)
"""
    proc, doc = _lean(code, "serve", "--backend", "onnx", "--run", str(tiny_exported), "--device", "cpu")
    assert doc.get("rc") == 0, proc.stderr[-2000:]
    assert doc["imported"] == []
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["health"] == 200 and answer["predict"] == 200
    assert answer["backend"] == "onnx" and answer["label"] in ("normal", "covid")


def test_the_python_api_with_the_onnx_backend_runs_without_pytorch(tiny_exported, phantom_dataset):
    image = _phantom_images(phantom_dataset, 1)[0]
    code = (f"import covid_cxr\nr = covid_cxr.load_run({str(tiny_exported)!r}, backend='onnx').predict({str(image)!r})"
            "\nprint(r[0].label)\nreport(0)")
    proc, doc = _lean(code)
    assert doc.get("rc") == 0 and doc["imported"] == [], proc.stderr[-2000:]
    assert proc.stdout.strip() in ("normal", "covid")


def test_a_missing_extra_is_named_not_a_traceback(tiny_exported, phantom_dataset, tmp_path):
    image = _phantom_images(phantom_dataset, 1)[0]
    proc, doc = _lean("rc = main(sys.argv[1:]); report(rc)", "predict", "--run", str(tiny_exported), str(image))
    assert doc.get("rc") == 2
    assert "covid-cxr: error: `covid-cxr predict` needs the torch package" in proc.stderr
    assert "pip install 'covid-cxr[train]'" in proc.stderr and "--backend onnx" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc, doc = _lean("rc = main(sys.argv[1:]); report(rc)", "export", "--run", str(tiny_exported))
    assert doc.get("rc") == 2 and "pip install 'covid-cxr[train]'" in proc.stderr


@pytest.mark.slow
def test_the_wheel_builds_and_holds_the_package(tmp_path):
    """`python -m build --wheel` (offline: --no-isolation) on a copy of the tracked files: every module, the web
    page and the extras' metadata are in the wheel."""
    pytest.importorskip("build", reason="pip install build")
    src = tmp_path / "src-copy"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("covid_cxr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = {f"covid_cxr/{p.relative_to(REPO / 'src' / 'covid_cxr').as_posix()}"
               for p in (REPO / "src" / "covid_cxr").rglob("*.py")}
    assert modules <= names
    assert "covid_cxr/deploy/serve/static/index.html" in names
    assert "covid-cxr = covid_cxr.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    torch_line = next(line for line in requires if line.startswith("Requires-Dist: torch"))
    assert 'extra == "train"' in torch_line
    assert any(line.startswith("Requires-Dist: onnxruntime") and "extra" not in line for line in requires)
