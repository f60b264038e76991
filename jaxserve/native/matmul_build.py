"""Builds and registers the native skinny-matmul kernel (matmul.cc), a library of its own.

The same scheme as build.py (whose compiler, CPU key and cache folder it reuses): compiled once
per machine with `-march=native`, cached under the kernel cache keyed by the source, compiler,
flags, jaxlib and CPU. The kernel is AVX-512 code: `supported()` says, from /proc/cpuinfo,
whether this CPU can run it, before anything is compiled.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from jaxserve.native import build
from jaxserve.native.build import NativeBuildError

_SOURCE = "matmul.cc"
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared")
TARGETS = {"jaxserve_skinny_matmul": "JaxserveSkinnyMatmul"}
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


def library_path() -> Path:
    """Builds the library if this machine has not yet, and returns its path."""
    cxx = build._compiler()
    src = Path(__file__).parent / _SOURCE
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeBuildError(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256(src.read_bytes())
    for part in (version, " ".join(_FLAGS), jaxlib.__version__, platform.machine(),
                 build._cpu_id()):
        key.update(part.encode())
    out = build._cache_dir() / f"jaxserve_matmul_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise NativeBuildError(f"cannot write the kernel cache {out.parent} ({e}); set "
                               f"JAXSERVE_CACHE_DIR to a writable folder") from e
    logging.warning("jaxserve: building the native CPU matmul kernel into %s (once per "
                    "machine, ~3 s)", out.parent)
    try:
        p = subprocess.run([cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(src), "-o", tmp],
                           capture_output=True, text=True)
        error = p.stderr if p.returncode else ""
    except OSError as e:
        error = f"{cxx}: {e}"
    if error:
        os.unlink(tmp)
        raise NativeBuildError(f"compiling the native matmul kernel failed:\n{error[-4000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load() -> None:
    """Builds (once), loads and registers the kernel with XLA for the CPU platform. Raises
    NativeBuildError if that is not possible (check `supported()` first)."""
    if not supported():
        raise NativeBuildError(f"the native matmul needs a CPU with {REQUIRED_FLAGS}")
    path = library_path()
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(library_path())
