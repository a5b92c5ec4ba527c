#!/usr/bin/env bash
# Stops the training on every worker at once: SIGTERM (each finishes its step and writes the
# preemption checkpoint together), waits up to STOP_GRACE seconds, then kills what is left — so
# one crashed worker never leaves the others hanging.  launch/stop.sh [--dry-run]
source "$(dirname "$0")/_common.sh"
on_workers all "bash $CODE_DIR/launch/worker_stop.sh ${STOP_GRACE:-300}"
