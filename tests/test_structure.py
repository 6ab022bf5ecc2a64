"""Structure contracts: no import cycles, one home for exceptions and configs, a torch-free inference path."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "covid_cxr"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """covid_cxr modules imported anywhere in a file (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("covid_cxr")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("covid_cxr"):
                continue
            found.add(mod)
            for a in node.names:  # `from covid_cxr import evaluate` imports a module
                if (SRC.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{mod}.{a.name}")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # The package __init__ only re-exports metadata; importing a submodule runs it first, so edges to it
        # are not dependencies between stages.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name and m != "covid_cxr"}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    """Counting imports inside functions too: a lazy import does not make a cycle acceptable."""
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycles(graph) == []


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


def test_every_config_lives_in_config_and_documents_every_field():
    from covid_cxr import config

    for cls in config.COMMANDS.values():
        assert cls.__module__ == "covid_cxr.config"
        docs = config.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert missing == [], f"{cls.__name__} fields without a docstring: {missing}"
    for path in SRC.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert not node.name.endswith("Config"), f"{path.name} defines {node.name}; configs live in config.py"


@pytest.mark.parametrize("module", ["covid_cxr.inference", "covid_cxr.pixels", "covid_cxr.meta", "covid_cxr.images",
                                    "covid_cxr.paths", "covid_cxr.files", "covid_cxr.api", "covid_cxr.results",
                                    "covid_cxr.hub", "covid_cxr.predict", "covid_cxr.cli", "covid_cxr.tracking",
                                    "covid_cxr.quantize"])
def test_the_onnx_inference_path_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_removed_dead_code_stays_removed():
    import covid_cxr.audit as audit
    import covid_cxr.cache as cache
    import covid_cxr.dedup as dedup
    import covid_cxr.dicom as dicom
    import covid_cxr.images as images
    import covid_cxr.pixels as pixels
    from covid_cxr.config import Task

    for owner, name in ((images, "read_image_size"), (dicom, "read_dicom_size"), (dedup, "fingerprint_file"),
                        (cache.ImageCache, "build"), (audit, "format_summary"), (pixels.PreprocessSpec, "resize")):
        assert not hasattr(owner, name), f"{owner.__name__}.{name}"
    assert "positive" in {f.name for f in dataclasses.fields(Task)}  # a field set per task, not a derived rule
