#!/usr/bin/env bash
# The last lines of every worker's console.  launch/tail.sh [--dry-run] [N]
source "$(dirname "$0")/_common.sh"
on_workers all "tail -n ${ARGS[0]:-20} ~/mgd_jax_run/console.txt"
