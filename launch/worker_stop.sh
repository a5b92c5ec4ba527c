#!/usr/bin/env bash
# On one worker (run by launch/stop.sh): SIGTERM to the training process of worker_run.sh, which
# finishes its step, writes a checkpoint and exits; after GRACE seconds, SIGKILL what is left.
#   bash launch/worker_stop.sh [GRACE]
set -uo pipefail
GRACE="${1:-300}"
PID_FILE="$HOME/mgd_jax_run/train.pid"
# Tells launch/recipe.sh on this worker that the stage ends because it was stopped: it starts no
# further stage.
mkdir -p "$HOME/mgd_jax_run"
touch "$HOME/mgd_jax_run/stop_requested"
if [[ ! -f "$PID_FILE" ]]; then echo "$(hostname): no training running"; exit 0; fi
pid="$(cat "$PID_FILE")"
if ! kill -TERM "$pid" 2> /dev/null; then echo "$(hostname): no training running"; exit 0; fi
for _ in $(seq "$GRACE"); do
  if ! kill -0 "$pid" 2> /dev/null; then echo "$(hostname): stopped after its checkpoint"; exit 0; fi
  sleep 1
done
kill -KILL "$pid" 2> /dev/null || true
echo "$(hostname): killed after ${GRACE}s (resume starts from its last checkpoint)"
