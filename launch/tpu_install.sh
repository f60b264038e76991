#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with the TPU extra.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -t jaxserve.XXXXXX.tar.gz)"
tar -C "$repo" --exclude=.git -czf "$archive" .
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:jaxserve.tar.gz" --project="$PROJECT" \
  --zone="$ZONE" --worker=all
on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf jaxserve.tar.gz -C $REMOTE_DIR && \
  cd $REMOTE_DIR && pip install -q -e '.[tpu]'"
rm -f "$archive"
