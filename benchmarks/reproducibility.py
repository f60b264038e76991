"""Is a request's result the same to the bit whatever shares its steps? (the bench model)

  python benchmarks/reproducibility.py [--json_out=benchmarks/results/reproducibility.json]

A 100-token greedy request with logprobs, run alone and then beside (a) a 400-token prompt that
shares its prefill step and (b) a 1,500-token prompt whose chunks share its decode steps (so its
tokens come from mixed steps, whose big products run on XLA's dot, instead of decode-only steps,
whose products run on the native skinny matmul). Prints and saves whether tokens and logprobs
are identical and the largest logprob difference. The random ≈125M bench model, float32.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json_out", default="benchmarks/results/reproducibility.json")
    args = ap.parse_args()

    from jaxserve import LLM, SamplingParams
    from jaxserve.bench.machine import cpu_description
    from jaxserve.cli.make_bench_model import BENCH_HF_CONFIG
    from jaxserve.config import ModelConfig
    from jaxserve.models import init_params

    cfg = ModelConfig.from_hf_dict(BENCH_HF_CONFIG)
    llm = LLM.from_params(cfg, init_params(cfg, seed=0), max_model_len=2048,
                          enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    request = rng.integers(0, cfg.vocab_size, 100).tolist()
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)

    def run(*others):
        out = llm.generate(prompt_token_ids=[request, *others], sampling_params=sp,
                           use_tqdm=False)[0]
        return out.token_ids, [out.logprobs[i][t] for i, t in enumerate(out.token_ids)]

    alone = run()
    rows = []
    for name, n in (("beside a 400-token prompt (same prefill step)", 400),
                    ("beside a 1,500-token prompt (decodes in mixed steps)", 1500)):
        tokens, lps = run(rng.integers(0, cfg.vocab_size, n).tolist())
        diff = max(abs(a - b) for a, b in zip(lps, alone[1]))
        rows.append({"case": name, "tokens_equal": tokens == alone[0],
                     "logprobs_bit_equal": lps == alone[1], "max_abs_logprob_diff": diff})
        print(f"{name}: tokens equal {tokens == alone[0]}, logprobs bit-equal "
              f"{lps == alone[1]}, max |diff| {diff:.2e}")
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu_description(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
