#!/usr/bin/env bash
# Prepares a dataset on worker 0 into $DATA_DIR (the gcsfuse mount: every worker then sees it).
#   launch/prepare_data.sh [--dry-run] voc|cityscapes MANUAL_DIR
source "$(dirname "$0")/_common.sh"
need_args 2 "launch/prepare_data.sh [--dry-run] voc|cityscapes MANUAL_DIR"
on_workers 0 "cd $CODE_DIR && $ENV_DIR/bin/mgd-prepare --dataset=${ARGS[0]} \
  --manual_dir=${ARGS[1]} --data_dir=$DATA_DIR"
