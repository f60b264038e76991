"""What computing only a step's used rows buys (`StepBatch.live_rows`: the native kernel's
products skip the padding of the chunk and decode regions): two engines in one process, one as
the engine runs (the default) and one whose batches name every row live (each product computes
the whole static shape, as before), the same requests alternating between them.

  python benchmarks/live_rows.py [--model=/tmp/bench_model] [--repeats=8]
      [--json_out=benchmarks/results/live_rows.json]

Workloads (`jaxserve.bench.paired.standard_jobs`; greedy, prefix cache off): one prompt alone
of 512, 1,024, 1,536 and 2,000 tokens (one output token: TTFT), and the offline job, 16 prompts
of 256 tokens with 64 output tokens (wall time). A 2,000-token prompt runs in 528 + 528 + 528 +
416 rows; its last step's products cost 416 rows instead of 528. Medians over repeats (the
first dropped) and the median of the paired ratios (live / all rows).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench.machine import cpu_description  # noqa: E402
from jaxserve.bench.paired import arg_parser, engine_llm, run_paired, standard_jobs  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402


def main() -> None:
    args = arg_parser(ROOT / "benchmarks/results/live_rows.json").parse_args()
    cfg = EngineConfig(chunk_size=512, max_decode_slots=16, enable_prefix_caching=False)
    live, every = engine_llm(args.model, cfg), engine_llm(args.model, cfg)
    run = every.engine.runner.run

    def run_all_rows(exe, batch):
        t = len(batch.token_ids)
        return run(exe, dataclasses.replace(batch, live_rows=np.array([0, t, t, t], np.int32)))
    every.engine.runner.run = run_all_rows
    results = run_paired({"live": live, "all": every}, standard_jobs(), args.repeats)
    write_json(args.json_out, {"cpu": cpu_description(), "repeats": args.repeats,
                               "results": results, "command": "python benchmarks/live_rows.py"})


if __name__ == "__main__":
    main()
