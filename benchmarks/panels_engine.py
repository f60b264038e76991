"""The `fused_panels` weight layout against `fused_native` (`[out, in]`) in the engine: two
engines in one process, the same requests alternating between them.

  python benchmarks/panels_engine.py [--model=/tmp/bench_model] [--repeats=8]
      [--json_out=benchmarks/results/panels_engine.json]

Workloads (`jaxserve.bench.paired.standard_jobs`): one prompt alone of 512-2,000 tokens (TTFT)
and the offline job (16 x 256 + 64, wall). Both layouts give the same bits; the table says
whether the tokens agreed. Per-product figures: benchmarks/panels_layout.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve.bench.machine import cpu_description  # noqa: E402
from jaxserve.bench.paired import arg_parser, engine_llm, run_paired, standard_jobs  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402


def main() -> None:
    args = arg_parser(ROOT / "benchmarks/results/panels_engine.json").parse_args()
    engines = {layout: engine_llm(args.model, EngineConfig(
        chunk_size=512, max_decode_slots=16, enable_prefix_caching=False, weight_layout=layout))
        for layout in ("fused_panels", "fused_native")}
    results = run_paired(engines, standard_jobs(), args.repeats)
    write_json(args.json_out, {"cpu": cpu_description(), "repeats": args.repeats,
                               "results": results, "command": "python benchmarks/panels_engine.py"})


if __name__ == "__main__":
    main()
