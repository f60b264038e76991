"""Native kernels as they were at a git revision, for benchmarks that time a kernel against an
earlier one in the same process: the revision's sources built into the kernel cache (build.py)
and registered with XLA under a target name of their own."""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

import jax

from jaxserve.native import build

ROOT = Path(__file__).resolve().parents[2]


def register(path: Path, symbol: str, target: str) -> None:
    """Loads the shared library at `path` and registers its FFI handler `symbol` as `target`."""
    handle = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)),
                                platform="cpu")


def register_at_revision(lib: build.Library, revision: str, symbol: str, target: str) -> None:
    """`lib`'s sources and headers at git `revision` (a header the revision lacks is not
    needed by it), built and registered: `symbol` as `target`."""
    with tempfile.TemporaryDirectory() as src:
        for name in lib.sources + lib.headers:
            got = subprocess.run(["git", "show", f"{revision}:jaxserve/native/{name}"],
                                 cwd=ROOT, capture_output=True, text=True)
            if got.returncode == 0:
                Path(src, name).write_text(got.stdout)
            elif name in lib.sources:
                raise RuntimeError(f"git show {revision}:jaxserve/native/{name}: "
                                   f"{got.stderr.strip()}")
        path = build.library_path(Path(src), lib=lib)
    register(path, symbol, target)
