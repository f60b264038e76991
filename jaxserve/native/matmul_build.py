"""Builds and registers the native skinny-matmul kernel (matmul.cc), a library of its own.

Built by build.py's one routine (its compiler, CPU key and cache folder): compiled once
per machine with `-march=native`, cached under the kernel cache keyed by the source, compiler,
flags, jaxlib and CPU. The kernel is AVX-512 code: `supported()` says, from /proc/cpuinfo,
whether this CPU can run it, before anything is compiled.
"""

from __future__ import annotations

import functools
import platform

from jaxserve.native import build
from jaxserve.native.build import NativeBuildError

MATMUL = build.Library(
    name="matmul", sources=("matmul.cc",), headers=("parallel_for.h",),
    flags=("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC"),
    targets=(("jaxserve_skinny_matmul", "JaxserveSkinnyMatmul"),
             ("jaxserve_skinny_matmul_out_in", "JaxserveSkinnyMatmulOutIn"),
             ("jaxserve_panels_matmul", "JaxservePanelsMatmul")))
# The instruction sets matmul.cc uses (x86 /proc/cpuinfo flag names).
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl")


@functools.cache
def supported() -> bool:
    """Whether this machine's CPU has the instruction sets the kernel needs (x86 AVX-512)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    for line in build._cpu_id().splitlines():
        if line.startswith("flags"):
            return set(REQUIRED_FLAGS) <= set(line.split(":", 1)[1].split())
    return False


def load() -> None:
    """Builds (once), loads and registers the kernel. Raises NativeBuildError if that is not
    possible (check `supported()` first)."""
    if not supported():
        raise NativeBuildError(f"the native matmul needs a CPU with {REQUIRED_FLAGS}")
    build.load_library(MATMUL)
