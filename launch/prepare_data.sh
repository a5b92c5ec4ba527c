#!/usr/bin/env bash
# Prepares a dataset on worker 0 into $DATA_DIR (the gcsfuse mount: every worker then sees it).
#   launch/prepare_data.sh [--dry-run] voc|cityscapes MANUAL_DIR
# MANUAL_DIR: the raw archives' folder on the worker; one not starting with / is a folder of the
# bucket, read through its mount at $MOUNT (expanded here, from env.sh).
source "$(dirname "$0")/_common.sh"
need_args 2 "launch/prepare_data.sh [--dry-run] voc|cityscapes MANUAL_DIR"
MANUAL="${ARGS[1]}"
if [[ "$MANUAL" != /* ]]; then MANUAL="$MOUNT/$MANUAL"; fi
on_workers 0 "cd $CODE_DIR && $ENV_DIR/bin/mgd-prepare --dataset=${ARGS[0]} \
  --manual_dir=$MANUAL --data_dir=$DATA_DIR"
