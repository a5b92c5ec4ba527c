#!/usr/bin/env bash
# Creates the venv on every worker once: jax[tpu] at the pinned version plus mgd_jax.
source "$(dirname "$0")/_common.sh"
all_workers 'cd ~/mgd_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
  .venv/bin/pip install -q -e . && .venv/bin/pip install -q "jax[tpu]==0.10.2" &&
  .venv/bin/python -c "import jax; print(jax.device_count(), jax.devices()[0])"'
if [[ "${MOUNT_BUCKET:-0}" == "1" ]]; then
  # gcsfuse: the bucket at the same local path on every worker (data, split lists, workdirs).
  all_workers "sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT &&
    (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
fi
