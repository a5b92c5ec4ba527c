#!/usr/bin/env bash
# The step comparison on one NVIDIA GPU, in one command (about 5-8 minutes including installs):
# mgd_jax's MGD / CPS training step beside the official PyTorch step (fp32, and bf16 autocast +
# channels_last) on the same card, random weights and inputs, VOC recipe at 512x512, global batch
# 8 labeled + 8 + 8 unlabeled. Prints one table per step and writes every row to OUT/gpu_bench.json.
#
#   bash launch/gpu_bench.sh [--dry-run] [--output DIR] [--steps N] [--with-reference] [--only NAME]
#
# It creates OUT/venv and installs only this package with its [torch] extra and the CUDA build of
# jax (JAX_EXTRA, default cuda12; JAX_VERSION, default the tested pin); nothing else. The venv's
# Python is the first of python3, python3.12, python3.13 that is 3.12 or newer (the jax releases
# after 0.10 need it), else python3. --dry-run prints the plan and runs nothing.
# --with-reference also times config.fused_step=False (the unbatched step; longer to compile).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/gpu_bench_out"
STEPS=20
DRY=0
COMPARE=torch
ONLY=""
JAX_EXTRA="${JAX_EXTRA:-cuda12}"
# the tested pin unless given
JAX_VERSION="${JAX_VERSION:-$(grep -o '^jax==[^ ]*' "$ROOT/constraints.txt" | cut -d= -f3)}"
PYTHON=python3
for candidate in python3 python3.12 python3.13; do
  # (runs it: a pyenv shim is on PATH even where its version is not installed)
  if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    PYTHON="$candidate"
    break
  fi
done
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --output) OUT="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --with-reference) COMPARE=reference,torch ;;
    --only) ONLY="$2"; shift ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# name | config argument: the three steps of the issue's PyTorch table
RUNS=(
  "mgd_resnet18|configs/voc.py:method=mgd,student=resnet18"
  "mgd_mobilenet_v2|configs/voc.py:method=mgd,student=mobilenet_v2"
  "cps_resnet101|configs/voc.py:method=cps,teacher=resnet101"
)
PY="$OUT/venv/bin/python"
BENCH="$OUT/venv/bin/mgd-bench"  # the package's console script

run() {
  echo "+ $*"
  if [[ $DRY == 0 ]]; then "$@"; fi
}

start=$(date +%s)
run mkdir -p "$OUT"
if [[ $DRY == 1 || ! -x "$PY" ]]; then
  run "$PYTHON" -m venv "$OUT/venv"
fi
run "$OUT/venv/bin/pip" install -q -e "${ROOT}[torch]" "jax[$JAX_EXTRA]==$JAX_VERSION"
run "$PY" -c "import jax, torch; print(jax.devices(), torch.cuda.get_device_name(0))"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"
for entry in "${RUNS[@]}"; do
  name="${entry%%|*}"
  config="${entry#*|}"
  if [[ -n "$ONLY" && "$ONLY" != "$name" ]]; then continue; fi
  (cd "$ROOT" && run "$BENCH" step --config="$config" --batch_size=8 \
    --steps="$STEPS" --warmup=3 --compare="$COMPARE" --torch_precisions=fp32,bf16 \
    --json="$OUT/$name.json")
done
if [[ $DRY == 0 ]]; then
  "$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(f"{out}/*_*.json"))
        if not f.endswith("gpu_bench.json")}
with open(f"{out}/gpu_bench.json", "w") as f:
    json.dump(rows, f, indent=2)
print(f"wrote {out}/gpu_bench.json ({', '.join(rows)})")
EOF
fi
echo "total $(( $(date +%s) - start )) s"
