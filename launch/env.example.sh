# shellcheck shell=bash
# The one env file of the launch scripts: cp launch/env.example.sh launch/env.sh (untracked) and
# edit. Every script sources it (or the file named by MGD_LAUNCH_ENV). Each line is a default:
# the same name set on the command line wins (`SPOT=0 bash launch/create_tpu.sh`).
: "${PROJECT:=my-gcp-project}"
: "${ZONE:=us-central2-b}"
: "${TPU_NAME:=mgd-v4-32}"
# v4-32 = 4 hosts x 4 chips = 16 devices (multi-host). The device count must divide the global
# batch: docs/reproducing.md#scaling-guide-global-batch-devices-learning-rate gives the batch /
# learning-rate settings of each size.
: "${ACCELERATOR_TYPE:=v4-32}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"   # v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p
: "${SPOT:=1}"        # 1: a spot VM (cheaper, can be preempted: launch/recipe.sh --recreate)
: "${QUEUED:=0}"      # 1: create through a queued resource (waits for capacity)
# Installed on the workers with uv (the image's python3 is 3.10); 3.12: the jax releases after
# 0.10 need it (3.11 gets jax 0.10). An existing ~/mgd_jax_env keeps its Python: delete it first.
: "${PYTHON_VERSION:=3.12}"
: "${EXTRAS:=tpu,gcs}"         # the extras of pyproject.toml installed on the workers
: "${BUCKET:=my-bucket}"
# Workdirs straight on the bucket (orbax, logs, metrics and TensorBoard write gs:// natively).
: "${RUNS_DIR:=gs://$BUCKET/runs}"
# Prepared datasets: grain/array_record read local files only, so the bucket is mounted with
# gcsfuse at the same path on every worker (MOUNT_BUCKET=1), or copy the data to each worker.
: "${MOUNT_BUCKET:=1}"
: "${MOUNT:=/mnt/$BUCKET}"
: "${DATA_DIR:=$MOUNT/tensorflow_datasets}"
# The downloaded weight files (docs/weights.md#the-files-the-recipe-needs), copied to the bucket:
# gcloud storage cp resnet18-f37072fd.pth ... gs://$BUCKET/weights/
: "${WEIGHTS_DIR:=gs://$BUCKET/weights}"
: "${SPLIT_DIR:=}"            # optional: split lists of your own (empty: the built-in ones)
: "${STOP_GRACE:=300}"        # seconds stop.sh waits for the preemption checkpoint
: "${REPO_REF:=HEAD}"         # what sync.sh ships (committed files only)
export PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED PYTHON_VERSION EXTRAS
export BUCKET RUNS_DIR MOUNT_BUCKET MOUNT DATA_DIR WEIGHTS_DIR SPLIT_DIR STOP_GRACE REPO_REF
