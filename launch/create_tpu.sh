#!/usr/bin/env bash
# Creates the TPU VM described in env.sh. Pass --spot for a spot (preemptible) VM; training
# resumes exactly from the workdir after a preemption (rerun launch/run.sh).
source "$(dirname "$0")/_common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
