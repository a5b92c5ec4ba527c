# shellcheck shell=bash
# The one env file of the launch scripts: cp launch/env.example.sh launch/env.sh (untracked) and
# edit. Every script sources it (or the file named by MGD_LAUNCH_ENV).
export PROJECT=my-gcp-project
export ZONE=us-central2-b
export TPU_NAME=mgd-v4-32
# v4-32 = 4 hosts x 4 chips = 16 devices (multi-host). The device count must divide the global
# batch: see docs/scaling.md for the batch / learning-rate settings of each size.
export ACCELERATOR_TYPE=v4-32
export RUNTIME_VERSION=tpu-ubuntu2204-base   # v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p
export SPOT=1        # 1: a spot VM (cheaper, can be preempted; rerun launch/run.sh to resume)
export QUEUED=0      # 1: create through a queued resource (waits for capacity)
# Installed on the workers with uv (the image's python3 is 3.10); 3.12: the jax releases after
# 0.10 need it (3.11 gets jax 0.10). An existing ~/mgd_jax_env keeps its Python: delete it first.
export PYTHON_VERSION=3.12
export EXTRAS=tpu,gcs         # the extras of pyproject.toml installed on the workers
export BUCKET=my-bucket
# Workdirs straight on the bucket (orbax, logs, metrics and TensorBoard write gs:// natively).
export RUNS_DIR=gs://$BUCKET/runs
# Prepared datasets: grain/array_record read local files only, so the bucket is mounted with
# gcsfuse at the same path on every worker (MOUNT_BUCKET=1), or copy the data to each worker.
export MOUNT_BUCKET=1
export MOUNT=/mnt/$BUCKET
export DATA_DIR=$MOUNT/tensorflow_datasets
export SPLIT_DIR=            # optional: split lists of your own (empty: the built-in ones)
export STOP_GRACE=300        # seconds stop.sh waits for the preemption checkpoint
export REPO_REF=HEAD         # what sync.sh ships (committed files only)
