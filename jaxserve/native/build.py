"""Compiles the native CPU kernels once per machine and registers them with XLA.

The C++ sources sit next to this file and use only XLA's header-only FFI API (shipped with
jaxlib), so building needs a C++17 compiler and nothing else. The shared library is cached
under `$JAXSERVE_CACHE_DIR` (default `~/.cache/jaxserve`), keyed by the source, the compiler,
the flags, jaxlib and the CPU, so a first start-up pays a few seconds once and later ones none.
`-march=native` is safe because the key includes the CPU's model and flags.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

_SOURCES = ("paged_attention.cc",)
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-fPIC",
          "-shared")
TARGETS = {"jaxserve_paged_attention": "JaxservePagedAttention"}


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded here (no compiler, unsupported CPU, ...)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("JAXSERVE_CACHE_DIR", Path.home() / ".cache" / "jaxserve"))


def library_path() -> Path:
    """Builds the library if this machine has not yet, and returns its path."""
    cxx = _compiler()
    here = Path(__file__).parent
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeBuildError(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256()
    for part in ([(here / s).read_bytes() for s in _SOURCES]
                 + [s.encode() for s in (version, " ".join(_FLAGS), jaxlib.__version__,
                                         platform.machine(), _cpu_id())]):
        key.update(part)
    out = _cache_dir() / f"jaxserve_native_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: two processes starting at once both succeed.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", *[str(here / s) for s in _SOURCES],
           "-o", tmp]
    logging.info("jaxserve: compiling native CPU kernels: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"compiling the native CPU kernels failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load() -> None:
    """Builds (once), loads and registers every native kernel with XLA for the CPU platform.
    Raises NativeBuildError if that is not possible; the caller falls back to XLA."""
    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
