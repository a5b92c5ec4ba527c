# Copy to launch/env.sh (untracked) and edit. Every launch script sources it.
export PROJECT=my-gcp-project
export ZONE=us-central2-b
export TPU_NAME=mgd-v4-32
export ACCELERATOR_TYPE=v4-32            # v5litepod-32 / v5p-32 / ...
export RUNTIME_VERSION=tpu-ubuntu2204-base  # v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p
export BUCKET=my-bucket
export DATA_DIR=gs://$BUCKET/tensorflow_datasets   # prepared with launch/prepare_data.sh
export SPLIT_DIR=gs://$BUCKET/mgd_splits           # your copy of the standard split lists
export REPO_REF=main
