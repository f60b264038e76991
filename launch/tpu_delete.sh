#!/usr/bin/env bash
# Deletes the TPU VM (billing stops).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
