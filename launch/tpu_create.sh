#!/usr/bin/env bash
# Creates the TPU VM (or pod slice) named $TPU_NAME.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
