#!/usr/bin/env bash
# The step benchmark on one NVIDIA GPU: mgd_jax's training step beside a PyTorch port of the
# official step (fp32, and bf16 autocast + channels_last) on the same card, for MGD-R18, MGD-MBv2
# and CPS-R101 (the VOC recipe: 512x512, global batch 8 labeled + 8 + 8 unlabeled; random weights
# and inputs), 10 timed steps each. Prints one table per configuration and writes every row to
# OUT/gpu_bench.json, each with the card, the NVIDIA driver, jax or torch, CUDA and cuDNN versions.
#
#   bash launch/gpu_bench.sh [--offline] [--dry-run] [--output DIR] [--steps N] [--warmup N]
#       [--batch N] [--only NAME,...] [--with-fused] [--with-matmul] [--torch-precisions fp32,bf16]
#       [--python PY] [--cuda 12|13] [--torch-index URL|none] [--wheels DIR] [--cpu]
#       [-- FLAGS for every `mgd-bench step` run, e.g. --config.crop_size=64]
#
# --dry-run prints the plan (each command, with the environment it runs in) and runs nothing.
# NAMEs: mgd_resnet18, mgd_mobilenet_v2, cps_resnet101. --with-fused adds the fused step
# (config.fused_step=True) beside the default one; --with-matmul the default step with the
# matmul upsampling (config.resize=matmul; the GPU default is gather until this shows matmul
# ahead). OUT: --output, default gpu_bench_out here.
#
# (a) Default: a fresh CUDA machine with PyPI. Makes OUT/venv and installs there only what the
#     benchmark imports, at constraints.txt's versions (pip -c): jax with its CUDA plugin, flax,
#     optax, numpy, absl-py, ml-collections; torch, torchvision, timm from PyTorch's index.
#     - Python >= 3.11: --python PY; else uv when on PATH (`uv venv --seed --python 3.11`: uses an
#       installed CPython 3.11, else downloads one); else the first of python3.11, python3.12,
#       python3.13, python3 that runs as 3.11+ (3.11 first: constraints.txt was resolved on it).
#     - One CUDA major for both frameworks: --cuda, else the driver's (nvidia-smi's "CUDA Version":
#       12, or 13 and newer): jax[cuda12] with torch from https://download.pytorch.org/whl/cu128,
#       or jax[cuda13] with .../whl/cu130. --torch-index URL replaces that index; `none` leaves
#       pip's configured sources alone.
#     - --cpu substitutes the CPU builds (plain jax; PyTorch's CPU index) to try the script where
#       there is no GPU. CI runs it so with --python (its own Python 3.11) and --torch-index none
#       (pip's sources there hold the CPU torch): no CUDA download, no Python download.
# (b) --offline: a machine with jax, flax, optax, numpy, absl-py and torch (torchvision, timm)
#     preinstalled, and no registry. It installs nothing from anywhere and makes no venv: it runs
#     --python (default python3) with this checkout on PYTHONPATH. What that Python lacks
#     (ml-collections on many GPU images) the user carries as wheels: --wheels DIR installs
#     DIR/*.whl with `pip --no-index --no-deps --target OUT/site`, put on PYTHONPATH; no resolver
#     runs that could replace the machine's jax or torch, and nothing outside OUT changes. Get
#     them on a machine with a registry (the target's Python version and platform):
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux2014_x86_64 -d wheels ml-collections==1.1.0   # + PyYAML if missing
#     Its jax must lie in pyproject.toml's range (older: refused; newer: a warning). The bench
#     path imports only jax, flax, optax, numpy, absl and ml-collections (torch in its own
#     processes): no grain, tfds, OpenCV, orbax or clu (tests/test_gpu_bench.py makes those
#     unimportable and runs this mode end to end).
#
# Both modes then run alike. Each configuration's jax step, and each PyTorch precision, runs in a
# process of its own (`python -m mgd_jax.tools.bench step --implementation=...`) that writes its
# row to OUT/rows/<NAME>/<implementation>.json when it finishes; one that fails (out of memory,
# say) leaves a "failed" row and its log (OUT/logs) and the next one starts. JAX does not
# preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false) and keeps its programs in the persistent
# compilation cache (JAX_COMPILATION_CACHE_DIR, default OUT/jax_cache: a second run loads them,
# and its rows say so); PyTorch runs with cudnn.benchmark on (pytorch/step.py), JAX in its
# processes kept off the GPU (JAX_PLATFORMS=cpu). Last, `mgd-bench table` prints one table per
# configuration from the rows that exist and writes OUT/gpu_bench.json. Exit status 1 if a run
# failed. Budget: mode (b), the three configurations on one H100, compilation included, under
# 8 minutes (not yet measured on a GPU); each run's seconds are printed, and the total.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/gpu_bench_out"
STEPS=10
WARMUP=3
BATCH=8
DRY=0
OFFLINE=0
CPU=0
ONLY=""
FUSED=0
MATMUL=0
TORCH_PRECISIONS="fp32,bf16"
PYTHON=""
CUDA=""
TORCH_INDEX=""
WHEELS=""
EXTRA=()

usage() {
  echo "error: $1 (see the header of $0)" >&2
  exit 2
}
value() {  # the value of option $1, given as $2
  [[ -n "${2:-}" ]] || usage "$1 needs a value"
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --offline) OFFLINE=1 ;;
    --cpu) CPU=1 ;;
    --with-fused) FUSED=1 ;;
    --with-matmul) MATMUL=1 ;;
    --output) value "$1" "${2:-}"; OUT="$2"; shift ;;
    --steps) value "$1" "${2:-}"; STEPS="$2"; shift ;;
    --warmup) value "$1" "${2:-}"; WARMUP="$2"; shift ;;
    --batch) value "$1" "${2:-}"; BATCH="$2"; shift ;;
    --only) value "$1" "${2:-}"; ONLY="$2"; shift ;;
    --torch-precisions) value "$1" "${2:-}"; TORCH_PRECISIONS="$2"; shift ;;
    --python) value "$1" "${2:-}"; PYTHON="$2"; shift ;;
    --cuda) value "$1" "${2:-}"; CUDA="$2"; shift ;;
    --torch-index) value "$1" "${2:-}"; TORCH_INDEX="$2"; shift ;;
    --wheels) value "$1" "${2:-}"; WHEELS="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage "unknown argument: $1" ;;
  esac
  shift
done
for number in "$STEPS" "$WARMUP" "$BATCH"; do
  [[ "$number" =~ ^[0-9]+$ ]] || usage "--steps, --warmup and --batch take whole numbers, not '$number'"
done
[[ "$STEPS" -ge 1 && "$BATCH" -ge 1 ]] || usage "--steps and --batch must be at least 1"
for precision in ${TORCH_PRECISIONS//,/ }; do
  [[ "$precision" == fp32 || "$precision" == bf16 ]] ||
    usage "--torch-precisions: '$precision' is not fp32 or bf16"
done
if [[ $OFFLINE == 1 && ( -n "$CUDA" || -n "$TORCH_INDEX" ) ]]; then
  usage "--cuda and --torch-index choose what mode (a) installs: not with --offline"
fi
if [[ $CPU == 1 && -n "$CUDA" ]]; then
  usage "--cpu installs the CPU builds: not with --cuda"
fi
if [[ $OFFLINE == 0 && -n "$WHEELS" ]]; then
  usage "--wheels is for --offline (mode (a) installs from the registry)"
fi
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
  usage "--wheels $WHEELS: no such directory"
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # the processes run in $ROOT

# NAME | the recipe: the three steps of the issue's PyTorch table
CONFIGS=(
  "mgd_resnet18|$ROOT/configs/voc.py:method=mgd,student=resnet18"
  "mgd_mobilenet_v2|$ROOT/configs/voc.py:method=mgd,student=mobilenet_v2"
  "cps_resnet101|$ROOT/configs/voc.py:method=cps,teacher=resnet101"
)
if [[ -n "$ONLY" ]]; then
  for name in ${ONLY//,/ }; do
    found=0
    for entry in "${CONFIGS[@]}"; do [[ "${entry%%|*}" == "$name" ]] && found=1; done
    [[ $found == 1 ]] || usage "--only: unknown configuration '$name'"
  done
fi

say() { echo "$*"; }
run() {  # prints the command, then runs it unless --dry-run
  echo "+ $(printf '%q ' "$@")"
  if [[ $DRY == 0 ]]; then "$@"; fi
}

# ------------------------------------------------------------------------------------------------
# The Python, and what it can import

find_python() {  # the first Python >= 3.11 on PATH, by its real path
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    # (runs it: a pyenv shim is on PATH even where its version is not installed)
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      "$candidate" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}

# Imports what the benchmark needs and prints the versions; exit 2 with one error line otherwise.
# argv: jax's range from pyproject.toml, 1 if a GPU is expected, the hint for a missing module.
read -r -d '' PREFLIGHT <<'EOF' || true
import importlib, importlib.util, platform, re, sys

spec, want_gpu, hint = sys.argv[1], sys.argv[2] == "1", sys.argv[3]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def release(version):
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


if sys.version_info < (3, 11):
    fail(f"{sys.executable} is Python {platform.python_version()}: mgd_jax needs 3.11 or newer")
for module in ("numpy", "absl", "ml_collections", "jax", "jaxlib", "flax", "optax"):
    try:
        importlib.import_module(module)
    except ImportError as e:
        fail(f"{sys.executable} cannot import {module} ({e}): {hint}")
missing = [m for m in ("torch", "torchvision", "timm") if importlib.util.find_spec(m) is None]
if missing:
    fail(f"{sys.executable} has no {', '.join(missing)}: {hint}")
import jax

low = re.search(r">=\s*([\d.]+)", spec)
high = re.search(r"<\s*([\d.]+)", spec)
if low and release(jax.__version__) < release(low.group(1)):
    fail(f"jax {jax.__version__} is older than mgd_jax supports ({spec}, pyproject.toml)")
if high and release(jax.__version__) >= release(high.group(1)):
    print(f"warning: jax {jax.__version__} is newer than the range mgd_jax is tested with ({spec})")
backend = jax.default_backend()
import torch

cuda = torch.cuda.is_available()
if want_gpu and (backend != "gpu" or not cuda):
    fail(f"no GPU: jax runs on {backend}, torch.cuda.is_available() is {cuda} (a CPU-only "
         "build, or no driver; --cpu runs on the CPU anyway)")
print(f"python {platform.python_version()} ({sys.executable}); jax {jax.__version__} on "
      f"{jax.devices()[0].device_kind}; torch {torch.__version__} on "
      f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}")
EOF

JAX_RANGE="$(grep -o '"jax>=[^"]*"' "$ROOT/pyproject.toml" | head -n 1 | tr -d '"')"
JAX_RANGE="${JAX_RANGE#jax}"
start=$SECONDS
say "gpu_bench: mode $([[ $OFFLINE == 1 ]] && echo "(b) offline" || echo "(a) install"), output $OUT"
run mkdir -p "$OUT/rows" "$OUT/logs"

if [[ $OFFLINE == 1 ]]; then
  # ---------------------------------------------------------------------------------------------
  # (b) the machine's own Python and packages
  command -v "${PYTHON:-python3}" >/dev/null || usage "--python ${PYTHON:-python3}: not found"
  # its absolute path (the runs start in $ROOT), not resolving a venv's link
  PY="$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')"
  PYPATH="$ROOT"
  if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -gt 0 ]] || usage "--wheels $WHEELS: no .whl file in it"
    run "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
      --upgrade --target "$OUT/site" "${wheels[@]}"
    PYPATH="$ROOT:$OUT/site"
  fi
  HINT="carry the missing wheels in a folder and pass --wheels DIR (the header of $0 says how)"
else
  # ---------------------------------------------------------------------------------------------
  # (a) a venv with the constraints' versions
  if [[ $CPU == 1 ]]; then
    JAX_REQ="jax"
    DEFAULT_INDEX="https://download.pytorch.org/whl/cpu"
  else
    if [[ -z "$CUDA" ]]; then
      command -v nvidia-smi >/dev/null ||
        usage "no NVIDIA driver found (nvidia-smi): pass --cuda 12|13, or --cpu to try the script on a CPU"
      CUDA="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)"
      [[ -n "$CUDA" ]] || usage "nvidia-smi shows no 'CUDA Version': pass --cuda 12|13"
      say "the driver runs CUDA $CUDA"
      if [[ "$CUDA" -gt 13 ]]; then CUDA=13; fi
    fi
    case "$CUDA" in
      12) DEFAULT_INDEX="https://download.pytorch.org/whl/cu128" ;;
      13) DEFAULT_INDEX="https://download.pytorch.org/whl/cu130" ;;
      *) usage "CUDA $CUDA: jax's CUDA builds need a driver for CUDA 12 or 13 (--cuda 12|13)" ;;
    esac
    JAX_REQ="jax[cuda$CUDA]"
  fi
  TORCH_INDEX="${TORCH_INDEX:-$DEFAULT_INDEX}"
  INDEX_ARGS=()
  if [[ "$TORCH_INDEX" != none ]]; then INDEX_ARGS=(--extra-index-url "$TORCH_INDEX"); fi
  PY="$OUT/venv/bin/python"
  if [[ -x "$PY" ]]; then
    say "# $OUT/venv exists: reused"
  elif [[ -n "$PYTHON" ]]; then
    run "$PYTHON" -m venv "$OUT/venv"
  elif command -v uv >/dev/null; then
    run uv venv --seed --python 3.11 "$OUT/venv"
  else
    BASE="$(find_python)" ||
      usage "no Python 3.11+ (python3.11 / python3.12 / python3.13 / python3) and no uv to get one: install uv (https://docs.astral.sh/uv/) or pass --python PY"
    run "$BASE" -m venv "$OUT/venv"
  fi
  run "$PY" -m pip install --disable-pip-version-check -c "$ROOT/constraints.txt" \
    "${INDEX_ARGS[@]}" "$JAX_REQ" flax optax numpy absl-py ml-collections torch torchvision timm
  PYPATH="$ROOT"
  HINT="the install in $OUT/venv is incomplete"
fi
installed=$((SECONDS - start))

# ------------------------------------------------------------------------------------------------
# The runs: one process per row
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}"
say "+ export PYTHONPATH=$PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
say "+ $(printf '%q ' "$PY") -c \"\$PREFLIGHT\" '$JAX_RANGE' $((1 - CPU))  # imports and versions"
if [[ $DRY == 0 ]]; then
  (cd "$ROOT" && "$PY" -c "$PREFLIGHT" "$JAX_RANGE" "$((1 - CPU))" "$HINT")
fi

failed=0
measure() {  # NAME IMPLEMENTATION [mgd-bench step flags]: one row, in a process of its own
  local name=$1 implementation=$2
  shift 2
  local row="$OUT/rows/$name/$implementation.json" log="$OUT/logs/$name.$implementation.log"
  local cmd=("$PY" -m mgd_jax.tools.bench step "$@" --steps="$STEPS" --warmup="$WARMUP"
             --batch_size="$BATCH" "${EXTRA[@]}" --json="$row")
  if [[ $implementation == torch_* ]]; then cmd=(env JAX_PLATFORMS=cpu "${cmd[@]}"); fi
  echo "+ $(printf '%q ' "${cmd[@]}")> $log"
  if [[ $DRY == 1 ]]; then return 0; fi
  mkdir -p "$OUT/rows/$name"
  rm -f "$row"
  local t0=$SECONDS status
  set +e
  (cd "$ROOT" && "${cmd[@]}") 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  local seconds=$((SECONDS - t0))
  if [[ $status == 0 && -s "$row" ]]; then
    say "= $name $implementation: done in $seconds s"
    return 0
  fi
  failed=1
  say "= $name $implementation: FAILED (exit status $status) after $seconds s; log $log"
  # the row that says so (json.dumps: any path quoted right)
  "$PY" -c 'import json, sys; kind, why = sys.argv[2], sys.argv[3]
row = {"implementation": "torch" if kind.startswith("torch_") else kind, "failed": why}
if kind.startswith("torch_"):
    row["precision"] = kind.split("_")[1]
else:
    row["step"] = "configured" if kind in ("mgd_jax", "matmul") else "flipped"
    if kind == "matmul":
        row["resize"] = "matmul"
json.dump(row, open(sys.argv[1], "w"))' "$row" "$implementation" \
    "exit status $status after $seconds s; log $log"
}

for entry in "${CONFIGS[@]}"; do
  name="${entry%%|*}"
  config="--config=${entry#*|}"
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then continue; fi
  measure "$name" mgd_jax "$config" --implementation=mgd_jax
  if [[ $FUSED == 1 ]]; then
    measure "$name" fused "$config" --implementation=fused
  fi
  if [[ $MATMUL == 1 ]]; then
    measure "$name" matmul "$config" --implementation=mgd_jax --config.resize=matmul
  fi
  for precision in ${TORCH_PRECISIONS//,/ }; do
    measure "$name" "torch_$precision" "$config" --implementation=torch \
      --torch_precisions="$precision"
  done
done
ran=$((SECONDS - start - installed))

cd "$ROOT"
run "$PY" -m mgd_jax.tools.bench table --rows="$OUT/rows" --json="$OUT/gpu_bench.json"
if [[ $DRY == 0 ]]; then
  say "total $((SECONDS - start)) s: setup and installs $installed s, runs $ran s"
  if [[ $ran -gt 480 ]]; then say "note: the runs took over the 8-minute budget ($ran s)"; fi
fi
exit "$failed"
