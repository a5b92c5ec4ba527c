#!/usr/bin/env bash
# Creates the TPU VM of env.sh: spot when SPOT=1, through a queued resource when QUEUED=1.
#   launch/create_tpu.sh [--dry-run] [extra gcloud arguments]
source "$(dirname "$0")/_common.sh"
SPOT_FLAG=()
if [[ "${SPOT:-0}" == 1 ]]; then SPOT_FLAG=(--spot); fi
if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}" "${ARGS[@]}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}" \
    "${ARGS[@]}"
fi
