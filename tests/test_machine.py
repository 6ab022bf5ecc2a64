"""CPU features read from /proc/cpuinfo (they decide what int8 speed to expect and head every benchmark)."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.machine import CPU_FLAGS, cpu_features, describe_cpu, has_int8_dot_product, int8_cpu_note


def _cpuinfo(tmp_path: Path, flags: str | None) -> Path:
    lines = ["processor\t: 0", "model name\t: Test CPU"] + ([f"flags\t\t: fpu sse2 {flags}"] if flags is not None else [])
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_avx2_without_vnni_is_read_as_such(tmp_path):
    f = cpu_features(_cpuinfo(tmp_path, "avx avx2 fma"))
    assert f == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "amx_int8": False}
    assert has_int8_dot_product(f) is False
    assert "no avx512f" in describe_cpu(f)


def test_vnni_or_amx_counts_as_an_int8_dot_product(tmp_path):
    assert has_int8_dot_product(cpu_features(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni"))) is True
    assert has_int8_dot_product(cpu_features(_cpuinfo(tmp_path, "avx2 avx_vnni"))) is True
    assert has_int8_dot_product(cpu_features(_cpuinfo(tmp_path, "avx2 amx_int8 amx_tile"))) is True


def test_unreadable_or_non_x86_is_unknown_not_absent(tmp_path):
    for source in (tmp_path / "missing", _cpuinfo(tmp_path, None)):
        f = cpu_features(source)
        assert set(f) == set(CPU_FLAGS) and all(v is None for v in f.values())
        assert has_int8_dot_product(f) is None
        assert "unknown" in describe_cpu(f)


def test_an_int8_model_moved_across_the_vnni_line_says_what_changes(tmp_path):
    avx2 = cpu_features(_cpuinfo(tmp_path, "avx2"))
    vnni = cpu_features(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni"))
    unknown = dict.fromkeys(CPU_FLAGS)
    assert int8_cpu_note({"name": "A", **avx2}, avx2) is None
    assert int8_cpu_note({"name": "A", **vnni}, vnni) is None
    assert int8_cpu_note(None, avx2) is None and int8_cpu_note({"name": "A", **unknown}, avx2) is None
    assert int8_cpu_note({"name": "A", **vnni}, unknown) is None
    down = int8_cpu_note({"name": "Big CPU", **vnni}, avx2)
    assert "Big CPU" in down and "same predictions" in down and "1.1-1.4x" in down
    up = int8_cpu_note({"name": "Small CPU", **avx2}, vnni)
    assert "Small CPU" in up and "faster" in up
