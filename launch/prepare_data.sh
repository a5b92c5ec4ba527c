#!/usr/bin/env bash
# Builds a dataset on worker 0 (or run the same command on any CPU VM) into $DATA_DIR.
#   launch/prepare_data.sh voc /path/on/worker/to/manual_dir
source "$(dirname "$0")/_common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=0 \
  --command "cd ~/mgd_jax && .venv/bin/python -m mgd_jax.prepare_main --dataset=$1 --manual_dir=$2 \
  --data_dir=$DATA_DIR"
