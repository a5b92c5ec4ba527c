#!/usr/bin/env bash
source "$(dirname "$0")/_common.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
