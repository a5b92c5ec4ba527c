#!/usr/bin/env bash
# Installs the environment on every worker (after launch/sync.sh); idempotent, rerun it after a
# dependency change: uv, Python $PYTHON_VERSION (3.12 in env.example.sh: uv installs it whatever
# the image has), ~/mgd_jax_env with mgd_jax[$EXTRAS], and the gcsfuse mount of the bucket when
# MOUNT_BUCKET=1. The environment keeps the Python it was made with: remove it for another.
#   launch/setup_worker.sh [--dry-run]
source "$(dirname "$0")/_common.sh"
on_workers all "set -e; export PATH=\$HOME/.local/bin:\$PATH
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  uv python install $PYTHON_VERSION
  [ -x $ENV_DIR/bin/python ] || uv venv --python $PYTHON_VERSION $ENV_DIR
  uv pip install --python $ENV_DIR/bin/python -e \"${CODE_DIR}[$EXTRAS]\"
  $ENV_DIR/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0])'"
if [[ "${MOUNT_BUCKET:-0}" == 1 ]]; then
  # --implicit-dirs: folders that exist only as object prefixes; --rename-dir-limit: folder
  # renames (tfds' incomplete.* -> final, orbax's tmp -> step) on a flat bucket.
  on_workers all "set -e
  command -v gcsfuse >/dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
    echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }
  sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
  mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET $MOUNT"
fi
