#!/usr/bin/env bash
# Copies this checkout (without .venv, data or workdirs) to every worker.
source "$(dirname "$0")/_common.sh"
ROOT="$(cd "$HERE/.." && pwd)"
TMP="$(mktemp -d)"
git -C "$ROOT" archive --format=tar.gz -o "$TMP/mgd_jax.tar.gz" "${REPO_REF:-HEAD}"
gcloud compute tpus tpu-vm scp "$TMP/mgd_jax.tar.gz" "$TPU_NAME": --project="$PROJECT" \
  --zone="$ZONE" --worker=all
all_workers "rm -rf ~/mgd_jax && mkdir -p ~/mgd_jax && tar -xzf ~/mgd_jax.tar.gz -C ~/mgd_jax"
rm -rf "$TMP"
