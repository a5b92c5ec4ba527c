# Sourced by the launch scripts: loads env.sh and defines the ssh-to-all-workers helper.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$HERE/env.sh" ]]; then
  echo "launch/env.sh is missing: cp launch/env.example.sh launch/env.sh and edit it" >&2
  exit 1
fi
# shellcheck source=/dev/null
source "$HERE/env.sh"
all_workers() {  # run a command on every worker of the TPU VM
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker=all --command "$1"
}
