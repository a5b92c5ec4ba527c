#!/usr/bin/env bash
# Runs one training command on every worker (multi-host JAX), logs tee'd per worker.
#   launch/run.sh configs/voc.py:method=mgd,student=resnet18,partition=8 $RUNS_DIR/voc8_r18 \
#       --config.teacher_deep.checkpoint=$RUNS_DIR/voc8_cps_r101/export --config.teacher_wide.checkpoint=...
source "$(dirname "$0")/_common.sh"
CONFIG="$1"; WORKDIR="$2"; shift 2
all_workers "cd ~/mgd_jax && MGD_JAX_DISTRIBUTED=1 nohup .venv/bin/python -m mgd_jax.main \
  --config=$CONFIG --workdir=$WORKDIR --config.data_dir=$DATA_DIR ${SPLIT_DIR:+--config.split_dir=$SPLIT_DIR} $* \
  > ~/train.log 2>&1 &"
echo "started; follow with launch/tail.sh"
