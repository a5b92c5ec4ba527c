# Copy to launch/env.sh (untracked) and edit. Every launch script sources it.
export PROJECT=my-gcp-project
export ZONE=us-central2-b
export TPU_NAME=mgd-v4-32
# v4-8 = 4 devices, which divides the recipe's global batch of 8 (VOC, Cityscapes teachers).
# Larger slices need a larger global batch: see docs/reproducing.md (scaling guide).
export ACCELERATOR_TYPE=v4-8             # v5litepod-8 / v5p-8 / ...
export RUNTIME_VERSION=tpu-ubuntu2204-base  # v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p
export BUCKET=my-bucket
# Paths must be local on every worker: mount the bucket with gcsfuse at the same path on all
# workers (launch/setup_worker.sh does it when MOUNT_BUCKET=1), or copy the data to local disk.
export MOUNT=/mnt/$BUCKET
export MOUNT_BUCKET=1
export DATA_DIR=$MOUNT/tensorflow_datasets   # prepared with launch/prepare_data.sh
export SPLIT_DIR=                           # optional: split lists of your own (empty: built in)
export RUNS_DIR=$MOUNT/runs                  # workdirs (checkpoints, logs)
export REPO_REF=main
