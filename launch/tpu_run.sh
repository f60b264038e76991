#!/usr/bin/env bash
# Runs a jaxserve binary on every worker at once (multi-controller JAX: each host runs the same
# program; --distributed makes them one job). Usage:
#   ./tpu_run.sh generate flags/v5e-8_generate.flags [extra flags...]
#   ./tpu_run.sh bench flags/v5e-8_bench.flags --model=/path/on/workers
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
binary="${1:?usage: tpu_run.sh generate|bench FLAGFILE [flags...]}"
flagfile="${2:?usage: tpu_run.sh generate|bench FLAGFILE [flags...]}"
shift 2
on_all_workers "cd $REMOTE_DIR && jaxserve-$binary --flagfile=launch/$flagfile --distributed $*"
