"""What giving idle decode rows to the chunks buys (EngineConfig.chunk_rows_beside): two engines
in one process, one with it (the default) and one whose chunk region stays chunk_size rows
whatever decodes share a step, the same requests alternating between them.

  python benchmarks/idle_decode_rows.py [--model=/tmp/bench_model] [--repeats=8]
      [--json_out=benchmarks/results/idle_decode_rows.json]

Workloads (greedy, one output token, prefix cache off): one prompt alone of 1,024, 1,040,
1,536 and 2,000 tokens (TTFT), and 16 prompts of 260 tokens at once (wall time). A step never
computes more rows either way (512 + 16 by default), so the gain is in steps saved: a prompt
whose length crosses a multiple of 512 by less than 16 tokens per step finishes a step sooner,
and a stream of prompts fits ~3% more tokens per step. Lengths that take as many steps either
way (2,000: 4 steps of 528 rows) show none. Medians over repeats (the first dropped) and the
median of the paired ratios (with / without).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve import SamplingParams  # noqa: E402
from jaxserve.bench.machine import cpu_description  # noqa: E402
from jaxserve.bench.paired import arg_parser, engine_llm, run_paired  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402


class ChunkSizeOnly(EngineConfig):
    """The engine as before: the chunk region is chunk_size rows beside any decodes."""

    def chunk_rows_beside(self, num_decodes: int) -> int:
        return self.chunk_tokens


def main() -> None:
    args = arg_parser(ROOT / "benchmarks/results/idle_decode_rows.json").parse_args()
    opts = dict(chunk_size=512, max_decode_slots=16, enable_prefix_caching=False)
    engines = {"with": engine_llm(args.model, EngineConfig(**opts)),
               "without": engine_llm(args.model, ChunkSizeOnly(**opts))}
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    jobs = {f"one prompt of {n} tokens (TTFT, ms)": ([[rng.integers(0, 32000, n).tolist()]
                                                      for _ in range(4)], sp)
            for n in (1024, 1040, 1536, 2000)}
    jobs["16 prompts of 260 tokens (wall, ms)"] = (
        [[rng.integers(0, 32000, 260).tolist() for _ in range(16)] for _ in range(2)], sp)
    results = run_paired(engines, jobs, args.repeats)
    out = {"cpu": cpu_description(), "repeats": args.repeats,
           "executables": {k: llm.stats["executables_compiled"] for k, llm in engines.items()},
           "results": results, "command": "python benchmarks/idle_decode_rows.py"}
    write_json(args.json_out, out)


if __name__ == "__main__":
    main()
