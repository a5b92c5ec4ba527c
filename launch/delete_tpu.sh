#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource when QUEUED=1).  launch/delete_tpu.sh [--dry-run]
source "$(dirname "$0")/_common.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" \
    --zone="$ZONE" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
