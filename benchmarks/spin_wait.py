"""What the native kernels' spin-wait buys (jaxserve/native/parallel_for.h: the caller of a
product waits for the other core's share spinning, up to 200 us, before sleeping): the
weights-only steps of benchmarks/panels_layout.py --steps_only in fresh processes with
JAXSERVE_SPIN_US=0 (sleep at once, as before) and the default, alternating.

  python benchmarks/spin_wait.py [--rounds=3] [--json_out=benchmarks/results/spin_wait.json]

Processes, not one process: the wait is compiled in and read once per process. Medians over
rounds of each step's milliseconds (both layouts' columns) and the median paired ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.process import run_with_env  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402


def _steps(spin_us: str | None) -> dict:
    return run_with_env([sys.executable, str(ROOT / "benchmarks/panels_layout.py"),
                         "--steps_only", "--rounds=4"], "JAXSERVE_SPIN_US", spin_us)["results"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/spin_wait.json"))
    args = ap.parse_args()
    print(cpu_line())
    runs = {"sleep": [], "spin": []}
    for _ in range(args.rounds):
        runs["sleep"].append(_steps("0"))
        runs["spin"].append(_steps(None))
    results = {}
    for step in runs["spin"][0]:
        for layout in ("out_in", "panels"):
            ms = {k: [r[step][f"ms_{layout}"] for r in v] for k, v in runs.items()}
            ratio = float(np.median(np.array(ms["spin"]) / np.array(ms["sleep"])))
            name = f"{step}, {layout}"
            results[name] = {"sleep_ms": float(np.median(ms["sleep"])),
                             "spin_ms": float(np.median(ms["spin"])), "paired_ratio": ratio,
                             "ms": ms}
            print(f"{name:<55}{results[name]['sleep_ms']:8.1f}{results[name]['spin_ms']:8.1f}"
                  f"{ratio:8.3f}")
    write_json(args.json_out, {"cpu": cpu_description(), "rounds": args.rounds,
                               "results": results, "command": "python benchmarks/spin_wait.py"})


if __name__ == "__main__":
    main()
