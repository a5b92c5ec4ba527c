#!/usr/bin/env bash
# Creates the venv on every worker once: jax[tpu] at the pinned version plus mgd_jax.
source "$(dirname "$0")/_common.sh"
all_workers 'cd ~/mgd_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
  .venv/bin/pip install -q -e . && .venv/bin/pip install -q "jax[tpu]==0.10.2" &&
  .venv/bin/python -c "import jax; print(jax.device_count(), jax.devices()[0])"'
