"""Where a step's time goes: per-op device times of the engine's two executables, from a
`jax.profiler` trace of the offline job (the figures behind the README's split).

  python benchmarks/profile_steps.py [--num_prompts=16 --input_len=256 --output_len=64]
      [--attention=auto] [--batch_invariant=default|on|off] [--top=12]
      [--json_out=out/profile_steps.json]

Runs the job once to warm up, then once under the profiler, and groups every traced op of each
executable run by (op kind, output shape): e.g. the matmuls of the mixed step, the attention
custom call, the cache scatter. The mixed (prefill) runs are told apart from the decode-only ones
by their count (the job's first steps). Times are per step, summed over the op's instances, so
ops that overlap in time are each counted; they are per-op costs, not a wall-clock split.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import numpy as np


def _op_shapes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its output shape, from an executable's optimized HLO."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            shapes[m.group(1)] = m.group(2)
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_prompts", type=int, default=16)
    ap.add_argument("--input_len", type=int, default=256)
    ap.add_argument("--output_len", type=int, default=64)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--batch_invariant", choices=("default", "on", "off"), default="default",
                    help="EngineConfig.batch_invariant: the engine's default (None), True, False")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()

    import jax

    from jaxserve import LLM, SamplingParams
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG
    from jaxserve.config import ModelConfig
    from jaxserve.models import init_params

    cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
    llm = LLM.from_params(cfg, init_params(cfg, seed=0), chunk_size=512,
                          # one executable of each kind, so ops map to one program each
                          chunk_buckets=1, decode_buckets=1,
                          max_decode_slots=16, page_size=16,
                          max_model_len=max(512, -(-(args.input_len + args.output_len) // 16) * 16),
                          attention=args.attention,
                          batch_invariant={"default": None, "on": True,
                                           "off": False}[args.batch_invariant])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, size=args.input_len).tolist()
               for _ in range(args.num_prompts)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    first = len(llm.engine.step_log)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
        path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    num_mixed = sum(r.kind == "mixed" for r in list(llm.engine.step_log)[first:])

    runs = collections.defaultdict(list)
    for e in events:
        if (e.get("ph") == "X" and "run_id" in e.get("args", {}) and "Thunk" not in e["name"]
                and not e["name"].startswith("cond")):
            runs[e["args"]["run_id"]].append(e)
    # The mixed steps are the job's first ones; run ids are not ordered, their start times are.
    ordered = sorted(runs, key=lambda r: min(e["ts"] for e in runs[r]))
    kinds = {"mixed": ordered[:num_mixed], "decode": ordered[num_mixed:]}
    exes = llm.engine.runner.executables
    # Op names -> shapes from every executable of each kind (the mixed steps also have the
    # wide-chunk executables; their ops share names, and a name's shape is the last one seen).
    shapes = {kind: {name: shape for exe, _ in group.values()
                     for name, shape in _op_shapes(exe.as_text()).items()}
              for kind, group in (("mixed", exes.mixed), ("decode", exes.decode_only))}
    report = {}
    for kind, ids in kinds.items():
        per_op = collections.Counter()
        for r in ids:
            for e in runs[r]:
                name = e["name"]
                per_op[(re.sub(r"\.\d+$", "", name), shapes[kind].get(name, "?"))] += e["dur"]
        n = max(len(ids), 1)
        total = sum(per_op.values()) / n / 1e3
        print(f"== {kind} steps: {len(ids)}, ops sum {total:.1f} ms/step "
              f"(attention: {llm.stats['attention_backend']})")
        rows = []
        for (op, shape), us in per_op.most_common(args.top):
            ms = us / n / 1e3
            rows.append({"op": op, "shape": shape, "ms_per_step": ms})
            print(f"  {ms:8.2f} ms  {op:<28} {shape}")
        report[kind] = {"steps": len(ids), "ops_ms_per_step": total, "top": rows}
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), **report}, f, indent=1)


if __name__ == "__main__":
    main()
