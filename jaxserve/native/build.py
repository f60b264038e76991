"""Compiles the native CPU kernels once per machine and registers them with XLA.

The C++ sources sit next to this file and use only XLA's header-only FFI API (shipped with
jaxlib), so building needs a C++17 compiler and nothing else. The shared library is cached
under `$JAXSERVE_CACHE_DIR` (default `~/.cache/jaxserve`), keyed by the source, the compiler,
the flags, jaxlib and the CPU, so a first start-up pays a few seconds once and later ones none.
`-march=native` is safe because the key includes the CPU's model and flags.
"""

from __future__ import annotations

import ctypes
import dataclasses
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



@dataclasses.dataclass(frozen=True)
class Library:
    """One shared library of native kernels: its sources (compiled in parallel, one process
    each, then linked), the headers its cache key covers, and the FFI targets it registers."""

    name: str  # the cached file's stem and what the log calls it
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    flags: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]  # (XLA target name, exported handler symbol)


_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-fPIC")
ATTENTION = Library(
    name="attention",
    # The float32 and bfloat16 instantiations in their own units: they dominate the build.
    sources=("paged_attention.cc", "paged_attention_f32.cc", "paged_attention_bf16.cc"),
    headers=("paged_attention_kernels.h", "parallel_for.h"), flags=_FLAGS,
    targets=(("jaxserve_paged_attention", "JaxservePagedAttention"),))
# The step's greedy tokens (greedy.cc), used with the native attention.
GREEDY = Library(name="greedy", sources=("greedy.cc",), headers=(), flags=_FLAGS,
                 targets=(("jaxserve_greedy", "JaxserveGreedy"),))


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded here (no compiler, unsupported CPU, ...)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


def _cpu_id() -> str:
    """What -march=native depends on: the first CPU's model and instruction-set lines (x86's
    "flags", ARM's "Features" and part number)."""
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    try:
        seen = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key in keys:
                    seen.setdefault(key, line)
        return "".join(seen.values()) or platform.processor()
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    """$JAXSERVE_CACHE_DIR if set (an error if unwritable), else ~/.cache/jaxserve, else (a
    read-only or missing home) a folder under the system's temporary directory."""
    if "JAXSERVE_CACHE_DIR" in os.environ:
        return Path(os.environ["JAXSERVE_CACHE_DIR"])
    home = Path.home() / ".cache" / "jaxserve"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except (OSError, RuntimeError):
        pass
    return Path(tempfile.gettempdir()) / f"jaxserve-{getattr(os, 'getuid', lambda: 0)()}"


def library_path(source_dir: Path | None = None, lib: Library = ATTENTION) -> Path:
    """Builds `lib` if this machine has not yet, and returns its path. `source_dir`: build
    these sources instead of the ones beside this file (benchmarks compare versions)."""
    cxx = _compiler()
    here = Path(source_dir) if source_dir else Path(__file__).parent
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeBuildError(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256()
    for part in ([(here / s).read_bytes() for s in lib.sources + lib.headers]
                 + [s.encode() for s in (version, " ".join(lib.flags), jaxlib.__version__,
                                         platform.machine(), _cpu_id())]):
        key.update(part)
    out = _cache_dir() / f"jaxserve_{lib.name}_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build to a temporary name and rename: two processes starting at once both succeed.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise NativeBuildError(f"cannot write the kernel cache {out.parent} ({e}); set "
                               f"JAXSERVE_CACHE_DIR to a writable folder") from e
    objects = [f"{tmp}.{i}.o" for i in range(len(lib.sources))]
    compiles = [[cxx, *lib.flags, f"-I{jax.ffi.include_dir()}", "-c", str(here / src), "-o", obj]
                for src, obj in zip(lib.sources, objects)]
    # A warning so that a first start-up says why it pauses (it is not repeated).
    logging.warning("jaxserve: building the native CPU %s kernel into %s (once per machine, "
                    "a few seconds)", lib.name, out.parent)
    try:
        procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for cmd in compiles]
        errors = [p.communicate()[1] for p in procs]
        failed = [e for p, e in zip(procs, errors) if p.returncode != 0]
        if not failed:
            link = subprocess.run([cxx, "-shared", *objects, "-o", tmp], capture_output=True,
                                  text=True)
            failed = [link.stderr] if link.returncode != 0 else []
    except OSError as e:
        failed = [f"{cxx}: {e}"]
    finally:
        for obj in objects:
            if os.path.exists(obj):
                os.unlink(obj)
    if failed:
        os.unlink(tmp)
        raise NativeBuildError(f"compiling the native CPU {lib.name} kernel failed:\n"
                               f"{failed[0][-4000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load_library(lib: Library) -> None:
    """Builds `lib` (once), loads it and registers its kernels with XLA for the CPU platform.
    Raises NativeBuildError if that is not possible."""
    path = library_path(lib=lib)
    try:
        handle = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    for target, symbol in lib.targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
                                    platform="cpu")


def load() -> None:
    """The native CPU step kernels other than the matmul (attention, greedy tokens), built and
    registered (see `load_library`)."""
    load_library(ATTENTION)
    load_library(GREEDY)


def main() -> None:
    """`python -m jaxserve.native.build`: builds every native kernel this CPU can run into the
    cache ahead of time (a first engine start-up then pays nothing) and prints where."""
    from jaxserve.native import matmul_build
    libs = [ATTENTION, GREEDY] + ([matmul_build.MATMUL] if matmul_build.supported() else [])
    for lib in libs:
        print(f"{lib.name}: {library_path(lib=lib)}")
    if not matmul_build.supported():
        print(f"matmul: not built (this CPU lacks {matmul_build.REQUIRED_FLAGS})")


if __name__ == "__main__":
    main()
