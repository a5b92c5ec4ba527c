# shellcheck shell=bash
# Sourced by the launch scripts: loads the one env file, parses --dry-run, and defines the
# helpers. --dry-run (any script, anywhere in its arguments) prints the exact commands instead
# of running them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The per-command switches: a prefix on the command line (`SPOT=0 bash launch/create_tpu.sh`)
# wins over the env file, even one that exports them unconditionally.
PREFIXES=(SPOT QUEUED STOP_GRACE)
declare -A GIVEN=()
for name in "${PREFIXES[@]}"; do
  if [[ -n "${!name+set}" ]]; then GIVEN[$name]="${!name}"; fi
done
# MGD_LAUNCH_NO_ENV=1: a script that needs no cloud settings (launch/recipe.sh off the TPU).
if [[ "${MGD_LAUNCH_NO_ENV:-0}" != 1 ]]; then
  ENV_FILE="${MGD_LAUNCH_ENV:-$HERE/env.sh}"
  if [[ ! -f "$ENV_FILE" ]]; then
    echo "$ENV_FILE is missing: cp launch/env.example.sh launch/env.sh and edit it" >&2
    exit 1
  fi
  # shellcheck source=/dev/null
  source "$ENV_FILE"
fi
for name in "${!GIVEN[@]}"; do export "$name=${GIVEN[$name]}"; done
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
