"""The offline job of the engine issue: 16 prompts x 256 tokens, 64 greedy tokens each.

  python benchmarks/offline_job.py [--model=DIR] [--json_out=out/offline_job.json]

Default model: the random ~125M Llama (hidden 768, intermediate 2048, 12 layers, 12/4 heads,
vocab 32000, untied, float32), built in memory unless --model points at a Hugging Face folder
(e.g. one written by `jaxserve-make-bench-model`). Token budget 512 per step, 16 sequences.
Reports start-up (load + compiles), the job's wall time, and its split between steps that carry
prefill chunks and decode-only steps (from the engine's step log: each step is charged the time
from the previous step's tokens coming back to its own).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--num_prompts", type=int, default=16)
    ap.add_argument("--input_len", type=int, default=256)
    ap.add_argument("--output_len", type=int, default=64)
    ap.add_argument("--chunk_size", type=int, default=512, help="the step's prefill budget")
    ap.add_argument("--max_chunk_seqs", type=int, default=8)
    ap.add_argument("--chunk_align", type=int, default=8)
    ap.add_argument("--max_decode_slots", type=int, default=16)
    ap.add_argument("--max_model_len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enable_prefix_caching", action="store_true",
                    help="off by default: the repeats send the same prompts, which the cache "
                         "would serve")
    ap.add_argument("--weight_layout", default="auto")
    ap.add_argument("--compare_layouts", action="store_true",
                    help="also run weight_layout=hf, interleaved with the main runs")
    ap.add_argument("--compare_attention", default=None,
                    help="also run this attention backend (e.g. xla), interleaved")
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()

    from jaxserve import LLM, SamplingParams
    t0 = time.perf_counter()
    if args.model:
        from jaxserve.weights import load_model
        cfg, params = load_model(args.model)
    else:
        from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG
        from jaxserve.config import ModelConfig
        from jaxserve.models import init_params
        cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
        params = init_params(cfg, seed=0)
    t_load = time.perf_counter() - t0
    opts = dict(chunk_size=args.chunk_size, max_chunk_seqs=args.max_chunk_seqs,
                chunk_align=args.chunk_align, enable_prefix_caching=args.enable_prefix_caching,
                max_decode_slots=args.max_decode_slots, page_size=16,
                max_model_len=args.max_model_len)
    llm = LLM.from_params(cfg, params, weight_layout=args.weight_layout, **opts)
    t_startup = time.perf_counter() - t0
    other, other_label = None, None
    if args.compare_layouts or args.compare_attention:
        alt = dict(weight_layout="hf") if args.compare_layouts else dict(
            attention=args.compare_attention)
        other_label = ", ".join(f"{k}={v}" for k, v in alt.items())
        other = LLM.from_params(cfg, params, **{**opts, **alt})
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, size=args.input_len).tolist()
               for _ in range(args.num_prompts)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    runs, other_runs = [], []
    for _ in range(args.repeats):
        if other is not None:
            t = time.perf_counter()
            other.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
            other_runs.append(time.perf_counter() - t)
        eng = llm.engine
        first_step = len(eng.step_log)
        t = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
        wall = time.perf_counter() - t
        log = list(eng.step_log)[first_step:]
        prev, split = t, {"mixed": 0.0, "decode": 0.0}
        for rec in log:
            split[rec.kind] += rec.tokens_back_s - prev
            prev = rec.tokens_back_s
        assert all(len(o.token_ids) == args.output_len for o in outs)
        runs.append({"wall_s": wall, "mixed_steps_s": split["mixed"],
                     "decode_steps_s": split["decode"],
                     "mixed_steps": sum(r.kind == "mixed" for r in log),
                     "decode_steps": sum(r.kind == "decode" for r in log)})
    med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    stats = llm.stats
    from jaxserve.bench.roofline import model_costs
    flops = args.num_prompts * (args.input_len + args.output_len) * model_costs(
        cfg, "float32")["body_flops_per_token"]
    print(f"{'start-up (load + compiles) s':<34}{t_startup:>10.2f}   (load {t_load:.2f})")
    print(f"{'job wall s (median of %d)' % args.repeats:<34}{med['wall_s']:>10.2f}")
    print(f"{'  steps with prefill chunks s':<34}{med['mixed_steps_s']:>10.2f}"
          f"   ({med['mixed_steps']} steps)")
    print(f"{'  decode-only steps s':<34}{med['decode_steps_s']:>10.2f}"
          f"   ({med['decode_steps']} steps)")
    print(f"{'output tokens/s':<34}{args.num_prompts * args.output_len / med['wall_s']:>10.1f}")
    print(f"{'decoder-body GFLOP/s':<34}{flops / med['wall_s'] / 1e9:>10.1f}")
    print(f"{'useful-token fraction':<34}{stats['useful_token_fraction']:>10.3f}"
          f"   (mixed steps: {stats['mixed_useful_token_fraction']:.3f})")
    print(f"{'executables / compiles after':<34}{stats['executables_compiled']:>10d}"
          f" / {stats['compiles_after_warmup']}")
    print("all runs:", ", ".join(f"{r['wall_s']:.2f}" for r in runs))
    if other_runs:
        o = sorted(other_runs)[len(other_runs) // 2]
        print(f"{other_label}, same process, interleaved: median {o:.2f} s "
              f"({', '.join(f'{x:.2f}' for x in other_runs)}); ratio it / main: "
              f"{o / med['wall_s']:.2f}")
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            from jaxserve.bench.machine import cpu_description
            json.dump({"args": vars(args), "cpu": cpu_description(), "startup_s": t_startup,
                       "load_s": t_load,
                       "runs": runs, "median": med, "stats": stats,
                       "attention_backend": stats["attention_backend"],
                       "compared": other_label, "compared_runs_s": other_runs}, f, indent=1)


if __name__ == "__main__":
    main()
