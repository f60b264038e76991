#!/usr/bin/env bash
# jaxserve and vLLM's CPU backend side by side on the issue's workloads, one after another.
#
#   bash benchmarks/vs_vllm.sh [BENCH_MODEL_DIR] [OUT_DIR] [WORKLOADS]
#
# WORKLOADS: a space-separated subset of "offline prefill alone interference online score"
# (default: all; the score run alone takes about half the time).
#
# Needs vLLM in its own virtualenv (see BENCHMARKS.md, "Setup"); every run writes its JSON to
# OUT_DIR (default benchmarks/results/vllm) and its printed tables next to it (.txt). Budget 512
# prompt tokens per step (+16 decode slots), 16 sequences, float32, greedy, EOS ignored; both
# engines' prefix caches are off (the workloads' prompts share no prefix, but warm-ups and
# calibration runs may repeat them), except in the score run, which runs jaxserve's with the cache
# on and off and vLLM's on. Nothing else should run on the machine meanwhile.
set -euo pipefail
model=${1:-bench_model}
out=${2:-benchmarks/results/vllm}
only=" ${3:-offline prefill alone interference online score} "
mkdir -p "$out"
[ -d "$model" ] || jaxserve-make-bench-model --out="$model"
engine=(--model="$model" --chunk_size=512 --max_decode_slots=16 --peer=vllm --progress=false)
common=("${engine[@]}" --enable_prefix_caching=false)

run() {  # name, then every flag but --json_out
  local name=$1; shift
  [[ $only == *" $name "* ]] || return 0
  echo "== $name: jaxserve-bench $*" | tee "$out/$name.txt"
  jaxserve-bench "$@" --json_out="$out/$name.json" | tee -a "$out/$name.txt"
}

# Offline: 16 x 256-token prompts + 64 output tokens, all at once.
run offline "${common[@]}" --workload=offline --num_prompts=16 --input_len=256 --output_len=64
# Prefill only: the same prompts, one output token each.
run prefill "${common[@]}" --workload=offline --num_prompts=16 --input_len=256 --output_len=1
# One prompt alone: 512, 1,024, 1,536 and 2,000 tokens, three of each (groups alone512, ...:
# their mean TTFT), 3 s apart, one output token each.
python - "$out/alone_trace.jsonl" <<'PY'
import json, sys
import numpy as np
rng = np.random.default_rng(0)
with open(sys.argv[1], "w") as f:
    for i, (rep, n) in enumerate((r, n) for r in range(3) for n in (512, 1024, 1536, 2000)):
        f.write(json.dumps({"id": f"alone{n}-{rep}", "arrival_s": 3.0 * i, "max_tokens": 1,
                            "prompt_token_ids": rng.integers(0, 32000, n).tolist()}) + "\n")
PY
run alone "${common[@]}" --workload=trace --trace_file="$out/alone_trace.jsonl"
rm "$out/alone_trace.jsonl"
# Interference: 8 streams (48-80-token prompts, 64 tokens each) decoding while four 1,536-token
# prompts arrive.
run interference "${common[@]}" --workload=interference --num_streams=8 --stream_prompt_len=64 \
  --range_ratio=0.25 --output_len=64 --num_long_prompts=4 --long_prompt_len=1536 \
  --long_output_len=16
# Online: Poisson arrivals at 1 request/s, prompts 128-384 tokens, 32-96 output tokens.
run online "${common[@]}" --workload=online --num_prompts=32 --input_len=256 --output_len=64 \
  --range_ratio=0.5 --request_rate=1
# Scoring: the multiple-choice job (4 few-shot prefixes of 384 tokens, 128 items of one prefix +
# a 16-48-token question, 4 continuations of 1-12 tokens: 512 pairs) through LLM.score with the
# prefix cache on, then off; vLLM scores the same pairs through prompt_logprobs=1 with its prefix
# cache on (its default), which vLLM does not read for requests asking prompt logprobs.
run score "${engine[@]}" --workload=score
