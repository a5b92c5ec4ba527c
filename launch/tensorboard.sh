#!/usr/bin/env bash
# TensorBoard of a run, on this machine (it reads gs:// workdirs directly).
#   launch/tensorboard.sh [--dry-run] RUN_NAME
source "$(dirname "$0")/_common.sh"
need_args 1 "launch/tensorboard.sh [--dry-run] RUN_NAME"
run tensorboard --logdir="$RUNS_DIR/${ARGS[0]}" --port=6006
