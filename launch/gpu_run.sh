#!/usr/bin/env bash
# One GPU host: install with the CUDA extra, then run a binary with a flagfile. Usage:
#   ./gpu_run.sh generate flags/gpu_generate.flags --model=/models/Llama-3.2-1B
set -euo pipefail
binary="${1:?usage: gpu_run.sh generate|bench FLAGFILE [flags...]}"
flagfile="${2:?usage: gpu_run.sh generate|bench FLAGFILE [flags...]}"
shift 2
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
python -m pip install -q -e '.[gpu]'
ndev="$(python -c 'import jax; print(jax.device_count())')"
mesh=""
if [ "$ndev" -gt 1 ]; then mesh="--mesh_shape=model=$ndev"; fi
# shellcheck disable=SC2086  # $mesh is empty or one flag
exec "jaxserve-$binary" --flagfile="launch/$flagfile" $mesh "$@"
