#!/usr/bin/env bash
# Starts one training on every worker (multi-host JAX: each runs the same command).
#   launch/run.sh [--dry-run] CONFIG RUN_NAME [--config.x=...]
# The workdir is $RUNS_DIR/RUN_NAME: checkpoints, log.txt, metrics, TensorBoard and each
# worker's console (console/<host>.txt, copied every minute) outlive the VM. After a preemption,
# recreate the VM, sync, setup, and rerun the same command: training resumes from the workdir.
source "$(dirname "$0")/_common.sh"
set -- "${ARGS[@]}"
if [[ $# -lt 2 ]]; then echo "usage: launch/run.sh [--dry-run] CONFIG RUN_NAME [--config.x=...]" >&2; exit 2; fi
CONFIG="$1"; WORKDIR="$RUNS_DIR/$2"; shift 2
EXTRA="--config.data_dir=$DATA_DIR ${SPLIT_DIR:+--config.split_dir=$SPLIT_DIR} $*"
on_workers all "cd $CODE_DIR && nohup bash launch/worker_run.sh $ENV_DIR/bin/python $WORKDIR \
  -m mgd_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA > /dev/null 2>&1 < /dev/null &"
echo "started $WORKDIR; follow with launch/tail.sh, stop with launch/stop.sh"
