# shellcheck shell=bash
# Sourced by the launch scripts: loads the one env file, parses --dry-run, and defines the
# helpers. --dry-run (any script, anywhere in its arguments) prints the exact commands instead
# of running them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_FILE="${MGD_LAUNCH_ENV:-$HERE/env.sh}"
if [[ ! -f "$ENV_FILE" ]]; then
  echo "$ENV_FILE is missing: cp launch/env.example.sh launch/env.sh and edit it" >&2
  exit 1
fi
# shellcheck source=/dev/null
source "$ENV_FILE"
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

need_args() {  # need_args N "USAGE": a missing argument is a usage line (exit 2), not a bash error
  if (( ${#ARGS[@]} < $1 )); then echo "usage: $2" >&2; exit 2; fi
}
# On the workers: the code (replaced by every sync) and the Python environment (kept: outside it).
# shellcheck disable=SC2016,SC2034  # used by the scripts; $HOME expands on the workers
CODE_DIR='$HOME/mgd_jax'
# shellcheck disable=SC2016,SC2034
ENV_DIR='$HOME/mgd_jax_env'

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

on_workers() {  # on_workers all|N COMMAND: runs COMMAND (bash) on the TPU VM's workers
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="$1" --command "$2"
}
