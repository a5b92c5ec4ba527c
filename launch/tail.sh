#!/usr/bin/env bash
# Shows the last lines of every worker's log.
source "$(dirname "$0")/_common.sh"
all_workers "tail -n ${1:-20} ~/train.log"
