"""What computing only a step's used rows buys (`StepBatch.live_rows`: the native kernel's
products skip the padding of the chunk and decode regions): two engines in one process, one as
the engine runs (the default) and one whose batches name every row live (each product computes
the whole static shape, as before), the same requests alternating between them.

  python benchmarks/live_rows.py [--model=/tmp/bench_model] [--repeats=8]
      [--json_out=benchmarks/results/live_rows.json]

Workloads (greedy, prefix cache off): one prompt alone of 512, 1,024, 1,536 and 2,000 tokens
(one output token: TTFT), and the offline job, 16 prompts of 256 tokens with 64 output tokens
(wall time). A 2,000-token prompt runs in 528 + 528 + 528 + 416 rows; its last step's products
cost 416 rows instead of 528. Medians over repeats (the first dropped) and the median of the
paired ratios (live / all rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.bench.machine import cpu_description, cpu_line  # noqa: E402
from jaxserve.bench.report import write_json  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.engine import Engine  # noqa: E402
from jaxserve.llm import load_params  # noqa: E402


def _llm(model: str, all_rows: bool) -> LLM:
    cfg = EngineConfig(chunk_size=512, max_decode_slots=16, enable_prefix_caching=False)
    model_cfg, params = load_params(model, None, cfg)
    llm = LLM.__new__(LLM)
    llm.model_path, llm._ids, llm.last_score_summary = model, itertools.count(), None
    llm.engine = Engine(model_cfg, params, cfg, None)
    if all_rows:
        runner, run = llm.engine.runner, llm.engine.runner.run

        def run_all_rows(exe, batch):
            t = len(batch.token_ids)
            return run(exe, dataclasses.replace(batch, live_rows=np.array([0, t, t, t],
                                                                          np.int32)))
        runner.run = run_all_rows
    return llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/bench_model",
                    help="a folder from jaxserve-make-bench-model")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json_out", default=str(ROOT / "benchmarks/results/live_rows.json"))
    args = ap.parse_args()
    engines = {"live": _llm(args.model, False), "all": _llm(args.model, True)}
    rng = np.random.default_rng(0)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    jobs = {f"one prompt of {n} tokens (TTFT, ms)": ([[rng.integers(0, 32000, n).tolist()]
                                                      for _ in range(4)], one)
            for n in (512, 1024, 1536, 2000)}
    jobs["16 x 256 + 64 offline (wall, ms)"] = (
        [[rng.integers(0, 32000, 256).tolist() for _ in range(16)] for _ in range(2)],
        SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    print(cpu_line())
    print(f"{'workload':<38}{'live':>9}{'all':>9}{'ratio':>8}")
    results = {}
    for name, (batches, sp) in jobs.items():
        times = {k: [] for k in engines}
        outs = {}
        for i in range(args.repeats):
            for k, llm in engines.items():
                start = time.perf_counter()
                res = llm.generate(prompt_token_ids=batches[i % len(batches)],
                                   sampling_params=sp, use_tqdm=False)
                times[k].append((time.perf_counter() - start) * 1e3)
                outs[k] = [r.token_ids for r in res]
        same = outs["live"] == outs["all"]
        ratio = float(np.median(np.array(times["live"][1:]) / np.array(times["all"][1:])))
        results[name] = {"live_ms": float(np.median(times["live"][1:])),
                         "all_ms": float(np.median(times["all"][1:])),
                         "paired_ratio": ratio, "same_tokens": same, "times_ms": times}
        print(f"{name:<38}{results[name]['live_ms']:9.1f}{results[name]['all_ms']:9.1f}"
              f"{ratio:8.3f}{'' if same else '  TOKENS DIFFER'}")
    out = {"cpu": cpu_description(), "repeats": args.repeats, "results": results,
           "command": "python benchmarks/live_rows.py"}
    write_json(args.json_out, out)


if __name__ == "__main__":
    main()
