"""A benchmark command in a fresh process with one environment variable set (or unset), its
JSON read back: for settings a process reads once (the native kernels' spin times), which an
A/B in one process cannot switch (benchmarks/spin_wait.py, helper_linger.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile


def run_with_env(cmd: list[str], var: str, value: str | None) -> dict:
    """Runs `cmd` + `--json_out=FILE` with `var` set to `value` (unset where None) and returns
    the JSON it wrote; its output is discarded, a failure raises."""
    env = dict(os.environ)
    env.pop(var, None)
    if value is not None:
        env[var] = value
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run.json")
        subprocess.run([*cmd, f"--json_out={out}"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)
