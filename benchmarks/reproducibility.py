"""Is a request's result the same to the bit whatever shares its steps? And what does
`batch_invariant` cost? (the bench model)

  python benchmarks/reproducibility.py [--json_out=benchmarks/results/reproducibility.json]

With `batch_invariant` off and on, 16 greedy requests (60-140-token prompts, 64 tokens each,
logprobs on) run (a) each alone, its prompt computed; (b) all 16 together, their prompts from
the prefix cache; (c) together beside a 1,500-token prompt whose chunks share their decode steps
(so their tokens come from mixed steps of 512 + 16 rows instead of decode-only steps of 8-16);
and 16 other requests run (d) together, their prompts computed in one shared prefill, then
alone, from the cache. Each case is compared with the request alone: tokens equal and logprobs
identical to the bit, for how many of the 16, and the largest logprob difference.

The cost: the offline job (16 prompts x 256 tokens, 64 greedy tokens each, budget 512, prefix
cache off) on two engines in this process, option off and on, run alternately; medians of the
wall time and of its mixed- and decode-step shares, and the median of the per-repeat ratios
(on / off). The random ≈125M bench model, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _results(outs):
    return [(list(o.token_ids), [o.logprobs[i][t] for i, t in enumerate(o.token_ids)])
            for o in outs]


def _compare(name, got, want):
    tokens = sum(g[0] == w[0] for g, w in zip(got, want))
    bits = sum(g[0] == w[0] and g[1] == w[1] for g, w in zip(got, want))
    diff = max(max((abs(a - b) for a, b in zip(g[1], w[1])), default=0.0)
               for g, w in zip(got, want))
    return {"case": name, "requests": len(want), "tokens_equal": tokens,
            "logprobs_bit_equal": bits, "max_abs_logprob_diff": diff}


def identity_rows(llm, vocab, rng):
    from jaxserve import SamplingParams
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=0)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(60, 140, 16)]
    others = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(60, 140, 16)]
    long = rng.integers(0, vocab, 1500).tolist()

    def gen(ps, params=sp):
        return llm.generate(prompt_token_ids=ps, sampling_params=params, use_tqdm=False)

    alone = [_results(gen([p]))[0] for p in prompts]
    together = _results(gen(prompts))
    beside = _results(gen(prompts + [long], [sp] * 16 + [one])[:16])
    crowd = _results(gen(others))
    others_alone = [_results(gen([p]))[0] for p in others]
    return [_compare("all 16 together, prompts from the prefix cache", together, alone),
            _compare("together beside a 1,500-token prompt (decodes in mixed steps)", beside,
                     alone),
            _compare("16 others: prompts computed together vs alone from the cache", crowd,
                     others_alone)]


def offline_job(llms, vocab, rng, repeats):
    """Alternating runs of the 16 x 256 + 64 job on each engine: {label: median figures}."""
    from jaxserve import SamplingParams
    prompts = [rng.integers(0, vocab, 256).tolist() for _ in range(16)]
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    runs = {label: [] for label in llms}
    for _ in range(repeats):
        for label, llm in llms.items():
            eng = llm.engine
            first = len(eng.step_log)
            t = time.perf_counter()
            llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
            wall = time.perf_counter() - t
            prev, split = t, {"mixed": 0.0, "decode": 0.0}
            for rec in list(eng.step_log)[first:]:
                split[rec.kind] += rec.tokens_back_s - prev
                prev = rec.tokens_back_s
            runs[label].append({"wall_s": wall, "mixed_steps_s": split["mixed"],
                                "decode_steps_s": split["decode"]})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json_out", default="benchmarks/results/reproducibility.json")
    ap.add_argument("--repeats", type=int, default=9, help="offline-job runs per engine")
    ap.add_argument("--skip_identity", action="store_true", help="only the cost")
    args = ap.parse_args()

    from jaxserve import LLM
    from jaxserve.bench.machine import cpu_description
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG
    from jaxserve.config import ModelConfig
    from jaxserve.models import init_params

    cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
    params = init_params(cfg, seed=0)
    report = {"cpu": cpu_description(), "model": "bench (≈125M, float32, random)",
              "identity": {}, "offline_job": {}}
    for on in () if args.skip_identity else (False, True):
        llm = LLM.from_params(cfg, params, max_model_len=2048, batch_invariant=on)
        rows = identity_rows(llm, cfg.vocab_size, np.random.default_rng(0))
        report["identity"][f"batch_invariant={on}"] = rows
        for r in rows:
            print(f"batch_invariant={on}: {r['case']}: tokens equal {r['tokens_equal']}/16, "
                  f"logprobs bit-equal {r['logprobs_bit_equal']}/16, max |diff| "
                  f"{r['max_abs_logprob_diff']:.2e}", flush=True)
        del llm
    opts = dict(max_model_len=512, enable_prefix_caching=False)
    llms = {f"batch_invariant={on}": LLM.from_params(cfg, params, batch_invariant=on, **opts)
            for on in (False, True)}
    load = os.getloadavg()[0]
    runs = offline_job(llms, cfg.vocab_size, np.random.default_rng(1), args.repeats)
    off, on = runs["batch_invariant=False"], runs["batch_invariant=True"]
    medians = {label: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
               for label, rs in runs.items()}
    # Each repeat runs both engines back to back: the median of the per-repeat ratios is less
    # sensitive than a ratio of medians to other work on a shared machine.
    cost = {k: float(np.median([b[k] / a[k] for a, b in zip(off, on)]) - 1) for k in off[0]}
    report["offline_job"] = {
        "workload": "16 prompts x 256 tokens, 64 greedy tokens each, chunk_size 512, 16 decode "
                    "slots, prefix cache off", "repeats": args.repeats,
        "load_average_before": load, "load_average_after": os.getloadavg()[0],
        "medians": medians, "cost_median_of_paired_ratios": cost, "runs": runs}
    for label, m in medians.items():
        print(f"offline job, {label}: wall {m['wall_s']:.2f} s (mixed steps "
              f"{m['mixed_steps_s']:.2f} s, decode steps {m['decode_steps_s']:.2f} s)")
    print("cost of batch_invariant=True (median of paired ratios): " + ", ".join(
        f"{k} {100 * v:+.1f}%" for k, v in cost.items()))
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
