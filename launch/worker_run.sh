#!/usr/bin/env bash
# On one worker (started by launch/run.sh, or by launch/recipe.sh for each of its stages): runs
# `PYTHON ARGS...` (e.g. `-m mgd_jax.main --config=...`) in the foreground, keeps its pid in
# ~/mgd_jax_run/train.pid (for stop.sh) and its console in ~/mgd_jax_run/console.txt, copied to
# WORKDIR/console/<host>.txt every minute and at the end (a local path or gs://).
#   bash launch/worker_run.sh PYTHON WORKDIR ARGS...
set -uo pipefail
PYTHON="$1"; WORKDIR="$2"; shift 2
RUN_DIR="$HOME/mgd_jax_run"
mkdir -p "$RUN_DIR"
CONSOLE="$RUN_DIR/console.txt"
copy_console() {
  "$PYTHON" - "$CONSOLE" "$WORKDIR/console/$(hostname).txt" <<'PY' || true
import sys
from etils import epath
target = epath.Path(sys.argv[2])
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(open(sys.argv[1], errors="replace").read())
PY
}
MGD_JAX_DISTRIBUTED="${MGD_JAX_DISTRIBUTED:-1}" "$PYTHON" "$@" > "$CONSOLE" 2>&1 &
pid=$!
echo "$pid" > "$RUN_DIR/train.pid"
while kill -0 "$pid" 2> /dev/null; do
  for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null && sleep 1; done
  copy_console
done
wait "$pid"
status=$?
echo "exit status $status" >> "$CONSOLE"
copy_console
rm -f "$RUN_DIR/train.pid"
exit "$status"
