"""What machine a figure came from: the CPU's name and its vector extensions (these machines
change between sessions, and figures compare only within one)."""

from __future__ import annotations

import platform
import subprocess

# The extensions that decide a CPU kernel's speed, in the order they are worth naming.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_description() -> dict:
    """{"model", "cores", "vector_extensions": [...], "l2", "l3"} from lscpu (best effort)."""
    info = {"model": platform.processor() or platform.machine(), "cores": None,
            "vector_extensions": [], "l2": None, "l3": None}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["model"] = fields.get("Model name", info["model"])
    info["cores"] = int(fields["CPU(s)"]) if fields.get("CPU(s)", "").isdigit() else None
    flags = set((fields.get("Flags") or fields.get("Features") or "").split())
    info["vector_extensions"] = [f for f in _VECTOR_FLAGS if f in flags]
    info["l2"], info["l3"] = fields.get("L2 cache"), fields.get("L3 cache")
    return info


def cpu_line() -> str:
    d = cpu_description()
    simd = " ".join(d["vector_extensions"]) or "no SIMD flags"
    return f"{d['model']}, {d['cores']} cores, {simd}"
