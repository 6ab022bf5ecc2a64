"""Structure contracts: the stage layers (import-linter), one home for exceptions and for each command's options, a
torch-free inference path."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "covid_cxr"


def test_lint_imports_holds_the_stage_contracts():
    """The stage layers, the torch-free modules and the absence of cycles inside each stage are import-linter
    contracts in pyproject.toml (``make test`` runs ``lint-imports`` first); this keeps them true under pytest too."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, timeout=300, cwd=SRC.parents[1])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_layers_contract_names_every_stage_package():
    """A new stage folder must take its place in the layers (the contract is exhaustive, so lint-imports refuses an
    unlisted top-level module; this says which one in the words of docs/development.md's layout table)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    on_disk = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert on_disk == named
    readme = (SRC.parents[1] / "docs" / "development.md").read_text(encoding="utf-8")
    for package in (p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()):
        assert f"`{package}/`" in readme, f"the layout table in docs/development.md does not list {package}/"


def test_every_exception_type_lives_in_errors():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith("Error") or b == "Exception" for b in bases):
                    offenders.append(f"{path.name}:{node.name}")
    assert offenders == []


def test_every_command_options_class_lives_in_its_stage_and_documents_every_field():
    from covid_cxr import config
    from covid_cxr.cli import CONFIGS

    for cls in CONFIGS.values():
        assert cls.__module__.endswith(".options") or cls.__module__ == "covid_cxr.demo", cls.__module__
        docs = config.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert missing == [], f"{cls.__name__} fields without a docstring: {missing}"
    for path in SRC.rglob("*.py"):
        if path.name == "options.py" or path.name == "demo.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert not node.name.endswith("Config"), \
                    f"{path.name} defines {node.name}; a command's options live in its stage's options.py"


@pytest.mark.parametrize("module", ["covid_cxr.model.inference", "covid_cxr.imaging.pixels", "covid_cxr.model.meta", "covid_cxr.imaging.images",
                                    "covid_cxr.paths", "covid_cxr.files", "covid_cxr.deploy.api", "covid_cxr.model.results",
                                    "covid_cxr.deploy.hub", "covid_cxr.deploy.predict", "covid_cxr.cli", "covid_cxr.training.tracking",
                                    "covid_cxr.deploy.quantize", "covid_cxr.model.formats", "covid_cxr.model.onnx_model"])
def test_the_onnx_inference_path_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_removed_dead_code_stays_removed():
    import covid_cxr.data.dedup as dedup
    import covid_cxr.evaluation.audit as audit
    import covid_cxr.imaging.cache as cache
    import covid_cxr.imaging.dicom as dicom
    import covid_cxr.imaging.images as images
    import covid_cxr.imaging.pixels as pixels
    from covid_cxr.config import Task

    for owner, name in ((images, "read_image_size"), (dicom, "read_dicom_size"), (dedup, "fingerprint_file"),
                        (cache.ImageCache, "build"), (audit, "format_summary"), (pixels.PreprocessSpec, "resize")):
        assert not hasattr(owner, name), f"{owner.__name__}.{name}"
    assert "positive" in {f.name for f in dataclasses.fields(Task)}  # a field set per task, not a derived rule
