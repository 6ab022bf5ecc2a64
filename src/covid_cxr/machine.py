"""What this machine's CPU can do, for the numbers that depend on it: int8 speed and benchmark headers.

ONNX Runtime's int8 kernels take a different path with and without VNNI (AVX512_VNNI, AVX_VNNI) or AMX; a speed
measured on one CPU does not carry to another, so every benchmark prints these features with its numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
"""x86 features that change how fast (and, before 7-bit weights, how exactly) int8 inference runs."""


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, bool | None]:
    """Each of :data:`CPU_FLAGS` -> present (True/False), or None for every flag when they cannot be read (not
    Linux, or not x86)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.partition(":")[2].split())
            return {f: f in have for f in CPU_FLAGS}
    return dict.fromkeys(CPU_FLAGS)


def has_int8_dot_product(features: dict[str, bool | None]) -> bool | None:
    """True when int8 products are summed straight into int32 (VNNI or AMX), the path where int8 pays off most;
    None when unknown."""
    known = [features.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8")]
    if all(v is None for v in known):
        return None
    return any(bool(v) for v in known)


def describe_cpu(features: dict[str, bool | None] | None = None) -> str:
    """One line: the processor name and which of :data:`CPU_FLAGS` it has."""
    features = cpu_features() if features is None else features
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    if all(v is None for v in features.values()):
        return f"{name} (SIMD features unknown)"
    have = [f for f, v in features.items() if v]
    lacks = [f for f, v in features.items() if v is False]
    text = f"{name}: {', '.join(have) or 'none of ' + ', '.join(CPU_FLAGS)}"
    return text + (f"; no {', '.join(lacks)}" if lacks and have else "")


def int8_cpu_note(exported_on: dict | None, here: dict[str, bool | None]) -> str | None:
    """What to tell the user when an int8 model runs on a CPU whose int8 kernels differ from the exporting CPU's
    (VNNI/AMX on one side only), else None. Predictions stay the same (7-bit weights: no int16 saturation on either
    path); the speed does not."""
    if not isinstance(exported_on, dict):
        return None
    then, now = has_int8_dot_product(exported_on), has_int8_dot_product(here)
    if then is None or now is None or then == now:
        return None
    name = exported_on.get("name") or "the exporting CPU"
    if then:
        return (f"this int8 model was checked on a CPU with VNNI/AMX ({name}); this CPU has neither, so ONNX Runtime "
                "takes its AVX2 int8 path: the same predictions (7-bit weights), but expect only about 1.1-1.4x the "
                "speed of the fp32 model here (benchmarks/bench_infer.py measures it)")
    return (f"this int8 model was checked on a CPU without VNNI/AMX ({name}); this CPU has them, so ONNX Runtime "
            "takes its VNNI int8 path: the same predictions (7-bit weights), and faster than the check measured")
