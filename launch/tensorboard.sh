#!/usr/bin/env bash
# Port-forwards TensorBoard from worker 0 to localhost:6006.  launch/tensorboard.sh WORKDIR
source "$(dirname "$0")/_common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=0 \
  -- -L 6006:localhost:6006 "cd ~/mgd_jax && .venv/bin/pip install -q tensorboard && \
  .venv/bin/tensorboard --logdir=$1 --port=6006"
