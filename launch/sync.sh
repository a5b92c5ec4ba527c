#!/usr/bin/env bash
# Ships `git archive $REPO_REF` of this checkout to ~/mgd_jax on every worker. The Python
# environment lives outside it (~/mgd_jax_env), so a sync never breaks it.
#   launch/sync.sh [--dry-run]
source "$(dirname "$0")/_common.sh"
ROOT="$(cd "$HERE/.." && pwd)"
ARCHIVE="${TMPDIR:-/tmp}/mgd_jax_sync_$$.tar.gz"
run git -C "$ROOT" archive --format=tar.gz -o "$ARCHIVE" "${REPO_REF:-HEAD}"
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":mgd_jax_sync.tar.gz \
  --project="$PROJECT" --zone="$ZONE" --worker=all
# Unpacked beside, then swapped in: the old code stays whole until the new one is complete.
on_workers all "rm -rf $CODE_DIR.new && mkdir -p $CODE_DIR.new &&
  tar -xzf ~/mgd_jax_sync.tar.gz -C $CODE_DIR.new && rm -rf $CODE_DIR && mv $CODE_DIR.new $CODE_DIR"
run rm -f "$ARCHIVE"
