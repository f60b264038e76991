#!/usr/bin/env bash
# Shared settings for the Cloud TPU scripts. Override any of them in the environment:
#   PROJECT=my-proj ZONE=us-west4-a ACCELERATOR=v5litepod-8 TPU_NAME=jaxserve ./tpu_create.sh
set -euo pipefail
PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"   # v5e: v5litepod-N; v6e: v6e-N
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"    # v6e: v2-alpha-tpuv6e
TPU_NAME="${TPU_NAME:-jaxserve}"
REMOTE_DIR="${REMOTE_DIR:-jaxserve}"

# Runs a command on every worker of the TPU VM (one for a single host, all hosts of a pod slice).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker=all --command="$1"
}
