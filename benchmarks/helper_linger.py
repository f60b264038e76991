"""What the lingering helper buys (jaxserve/native/parallel_for.h: after its share of a
decode-sized product, a pool helper spins up to 100 us for the next call's work instead of going
back to the pool): the engine's offline job (16 x 256 + 64, decode-step median) and its prefill
alone (16 x 256 + 1, wall time), in fresh processes with JAXSERVE_HELPER_SPIN_US=0 (never
linger) and the default, alternating.

  python benchmarks/helper_linger.py [--rounds=3] [--model=/tmp/bench_model]
      [--json_out=benchmarks/results/helper_linger.json]

Processes, not one process: the setting is compiled in and read once per process. Per-round
ratios (default / never) and their median.
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

JOBS = {"offline": ["--output_len=64"], "prefill": ["--output_len=1"]}


def _run(model: str, job: str, spin_us: str | None) -> dict:
    run = run_with_env(["jaxserve-bench", f"--model={model}", "--chunk_size=512",
                        "--max_decode_slots=16", "--progress=false",
                        "--enable_prefix_caching=false", "--workload=offline",
                        "--num_prompts=16", "--input_len=256", *JOBS[job]],
                       "JAXSERVE_HELPER_SPIN_US", spin_us)["runs"][0]
    return {"wall_s": run["duration_s"],
            "decode_step_ms": run["roofline"]["decode_step_ms_median"],
            "mixed_step_ms": run["roofline"]["mixed_step_ms_median"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="/tmp/bench_model")
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/helper_linger.json"))
    args = ap.parse_args()
    print(cpu_line())
    runs = {job: {"never": [], "default": []} for job in JOBS}
    for r in range(args.rounds):
        for job in JOBS:
            order = (("never", "0"), ("default", None))
            for name, spin in order if r % 2 == 0 else order[::-1]:
                runs[job][name].append(_run(args.model, job, spin))
    figures = {"offline": "decode_step_ms", "prefill": "wall_s"}
    result = {"cpu": cpu_description(), "rounds": args.rounds, "runs": runs, "ratios": {},
              "command": "python benchmarks/helper_linger.py " + " ".join(sys.argv[1:])}
    for job, key in figures.items():
        never = np.array([x[key] for x in runs[job]["never"]])
        default = np.array([x[key] for x in runs[job]["default"]])
        ratios = default / never
        result["ratios"][f"{job}: {key}"] = {"median": float(np.median(ratios)),
                                             "per_round": ratios.tolist()}
        print(f"{job:>8} {key:>15}: never {np.median(never):.4g}, default "
              f"{np.median(default):.4g}, ratio median {np.median(ratios):.3f} "
              f"({', '.join(f'{x:.3f}' for x in ratios)})")
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
