#!/usr/bin/env bash
# The paper's recipe end to end on one platform, from the downloaded weight files to an evaluated,
# exported student: the ImageNet backbones imported (mgd-import), both CPS teachers (ResNet-101
# deep stem, Wide-ResNet-50-2) started from them, the MGD student from the teachers' exports and
# its ImageNet backbone, mgd-eval, and mgd-export (StableHLO). Each stage starts once the stages
# it needs have finished; a finished stage is skipped, so after a stop, a crash or a preemption
# the same command continues where the run stopped.
#
#   bash launch/recipe.sh --platform=PLATFORM --weights=DIR --workdir=DIR [options]
#                         [--dry-run] [-- --config.x=... (added to every training stage)]
#
#   --platform   gpu (one process on this machine, every GPU jax sees), multi-gpu (the same,
#                refused unless jax sees several GPUs), colab (gpu, with Drive checks), slurm
#                (one job per stage, submitted with afterok dependencies), tpu (a TPU VM slice
#                of launch/env.sh: sync, setup, then every stage in order on every worker)
#   --weights    the folder (or gs:// prefix) holding the downloaded files (docs/weights.md)
#   --workdir    everything the recipe writes (local or gs://); default on tpu: $RUNS_DIR/<name>
#   --dataset    voc | cityscapes (default voc)         --partition  16 | 8 | 4 | 2 (default 8)
#   --student    resnet18 | mobilenet_v2 (default resnet18)
#   --teachers   train (default) | official: import the authors' trained teachers (1/8 only)
#   --data_dir   the prepared datasets (default: the config's; tpu: $DATA_DIR)
#   --python     the Python with mgd_jax installed (default python3; tpu: the workers' env)
#   --nodes, --gpus_per_node   slurm: the training jobs' allocation (default: slurm.sbatch's)
#   --create     tpu: create the VM first   --recreate   tpu: delete it, then create it (after
#                a spot preemption the VM keeps its name and must be deleted before a create)
#
# Layout of the workdir: imagenet/<backbone>/ (imported), teacher_deep/, teacher_wide/, student/
# (training workdirs; student/eval_val.json from mgd-eval), student_deploy/ (mgd-export).
# docs/reproducing.md#running-the-recipe shows each platform's command.
set -euo pipefail
PLATFORM=""
for arg in "$@"; do
  if [[ "$arg" == --platform=* ]]; then PLATFORM="${arg#--platform=}"; fi
done
# Only the TPU path (run from your machine) needs launch/env.sh.
if [[ "$PLATFORM" != tpu ]]; then export MGD_LAUNCH_NO_ENV=1; fi
source "$(dirname "$0")/_common.sh"
ROOT="$(cd "$HERE/.." && pwd)"
DRY_RUN_FLAG=()
if [[ "$DRY_RUN" == 1 ]]; then DRY_RUN_FLAG=(--dry-run); fi
USAGE="usage: bash launch/recipe.sh --platform=gpu|multi-gpu|colab|slurm|tpu --weights=DIR \
--workdir=DIR [--dataset=voc|cityscapes] [--partition=8] [--student=resnet18|mobilenet_v2] \
[--dry-run] [-- --config.x=...] (see the header of launch/recipe.sh)"

fail() {  # one line, exit 2
  echo "error: $*" >&2
  exit 2
}

DATASET=voc PARTITION=8 STUDENT=resnet18 TEACHERS=train WORKDIR="" WEIGHTS="" DATA_DIR_ARG=""
PY="" NODES="" GPUS_PER_NODE="" CREATE=0 RECREATE=0 EXTRA=()
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case "$1" in
    --platform=*) ;;
    --dataset=*) DATASET="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --student=*) STUDENT="${1#*=}" ;;
    --teachers=*) TEACHERS="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --weights=*) WEIGHTS="${1#*=}" ;;
    --data_dir=*) DATA_DIR_ARG="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS_PER_NODE="${1#*=}" ;;
    --create) CREATE=1 ;;
    --recreate) RECREATE=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "$USAGE" >&2; fail "unknown argument $1" ;;
  esac
  shift
done

case "$PLATFORM" in
  gpu | multi-gpu | colab | slurm | tpu | tpu-worker) ;;
  "") echo "$USAGE" >&2; exit 2 ;;
  *) fail "--platform=$PLATFORM: one of gpu, multi-gpu, colab, slurm, tpu" ;;
esac
case "$DATASET" in
  voc) CLASSES=21 SHORT=voc SIZES=512x512 ;;
  cityscapes) CLASSES=19 SHORT=city SIZES=1024x2048 ;;
  *) fail "--dataset=$DATASET: voc or cityscapes" ;;
esac
case "$PARTITION" in 16 | 8 | 4 | 2) ;; *) fail "--partition=$PARTITION: 16, 8, 4 or 2" ;; esac
case "$STUDENT" in
  resnet18) STUDENT_FILE=resnet18-f37072fd.pth ;;
  mobilenet_v2) STUDENT_FILE=mobilenet_v2-b0353104.pth ;;
  *) fail "--student=$STUDENT: resnet18 or mobilenet_v2" ;;
esac
case "$TEACHERS" in
  train) ;;
  official)
    if [[ "$PARTITION" != 8 ]]; then
      fail "--teachers=official: the authors published 1/8 teachers only (--partition=8)"
    fi ;;
  *) fail "--teachers=$TEACHERS: train or official" ;;
esac
if (( RECREATE || CREATE )) && [[ "$PLATFORM" != tpu ]]; then
  fail "--create / --recreate: --platform=tpu only"
fi
NAME="${SHORT}${PARTITION}_$STUDENT"
if [[ "$PLATFORM" == tpu ]]; then
  WORKDIR="${WORKDIR:-$RUNS_DIR/$NAME}"
  WEIGHTS="${WEIGHTS:-${WEIGHTS_DIR:-}}"
  DATA_DIR_ARG="${DATA_DIR_ARG:-$DATA_DIR}"
fi
[[ -n "$WORKDIR" ]] || { echo "$USAGE" >&2; fail "--workdir is required"; }
[[ -n "$WEIGHTS" ]] || { echo "$USAGE" >&2; fail "--weights is required"; }
WORKDIR="${WORKDIR%/}" WEIGHTS="${WEIGHTS%/}"
absolute() {  # the stages run from the repository root: a relative local path is made absolute
  # shellcheck disable=SC2088  # the quoted ~ is the text the shell left unexpanded after =
  if [[ "$1" == "~/"* ]]; then echo "$HOME/${1#"~/"}"
  elif [[ -z "$1" || "$1" == gs://* || "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}
if [[ "$PLATFORM" != tpu ]]; then
  WORKDIR="$(absolute "$WORKDIR")" WEIGHTS="$(absolute "$WEIGHTS")"
  DATA_DIR_ARG="$(absolute "$DATA_DIR_ARG")"
fi

# ------------------------------------------------------------------------------------------------
# tpu: from your machine. env.sh's values are expanded here; the workers' own paths ($HOME) are
# expanded there. Every stage then runs in order on every worker, in one detached job.
if [[ "$PLATFORM" == tpu ]]; then
  if [[ "$WEIGHTS" != gs://* && "$WEIGHTS" != "${MOUNT:-/nonexistent}"/* ]]; then
    fail "--weights=$WEIGHTS: the workers read the bucket, not this machine: copy the files with" \
      "gcloud storage cp FILES gs://$BUCKET/weights/ and pass --weights=gs://$BUCKET/weights"
  fi
  # (each script prints its own commands, and runs them unless --dry-run)
  if (( RECREATE )); then
    bash "$HERE/delete_tpu.sh" "${DRY_RUN_FLAG[@]}" || say "the delete failed (no such VM?): creating it"
  fi
  if (( RECREATE || CREATE )); then bash "$HERE/create_tpu.sh" "${DRY_RUN_FLAG[@]}"; fi
  bash "$HERE/sync.sh" "${DRY_RUN_FLAG[@]}"
  bash "$HERE/setup_worker.sh" "${DRY_RUN_FLAG[@]}"
  WORKER_ARGS=(--platform=tpu-worker "--dataset=$DATASET" "--partition=$PARTITION"
               "--student=$STUDENT" "--teachers=$TEACHERS" "--workdir=$WORKDIR"
               "--weights=$WEIGHTS" "--data_dir=$DATA_DIR_ARG")
  if [[ -n "${SPLIT_DIR:-}" ]]; then EXTRA=("--config.split_dir=$SPLIT_DIR" "${EXTRA[@]}"); fi
  if (( ${#EXTRA[@]} )); then WORKER_ARGS+=(-- "${EXTRA[@]}"); fi
  QUOTED="$(printf ' %q' "${WORKER_ARGS[@]}")"
  on_workers all "cd $CODE_DIR && nohup bash launch/recipe.sh --python=$ENV_DIR/bin/python$QUOTED \
> \$HOME/mgd_jax_recipe.txt 2>&1 < /dev/null &"
  echo "started the recipe on every worker: $WORKDIR (its progress: launch/tail.sh, each" \
    "worker's ~/mgd_jax_recipe.txt; stop: launch/stop.sh; after a preemption: the same command" \
    "with --recreate)"
  exit 0
fi

# ------------------------------------------------------------------------------------------------
# The stages (every other platform; on a TPU VM, on each worker).
PY="${PY:-python3}"
if [[ "$PLATFORM" == slurm ]]; then PY="$(command -v "$PY" || echo "$PY")"; fi

exists() {  # exists PATH: a local path or gs:// (read with the training Python's etils)
  if [[ "$1" == gs://* ]]; then
    "$PY" -c 'import sys; from etils import epath; sys.exit(not epath.Path(sys.argv[1]).exists())' "$1"
  else
    [[ -e "$1" ]]
  fi
}

weight_file() {  # the downloaded file of an ImageNet backbone (docs/weights.md)
  case "$1" in
    resnet18 | mobilenet_v2) echo "$WEIGHTS/$STUDENT_FILE" ;;
    resnet101) echo "$WEIGHTS/resnet101_v1c.pth" ;;
    wide_resnet50_2)  # the official file when present, else torchvision's
      if exists "$WEIGHTS/checkpoint-wres34.pth.tar"; then echo "$WEIGHTS/checkpoint-wres34.pth.tar"
      else echo "$WEIGHTS/wide_resnet50_2-95faca4d.pth"; fi ;;
  esac
}
official_teacher() {  # the authors' trained teacher file (docs/weights.md)
  echo "$WEIGHTS/teacher-${SHORT}8-$1.pth"
}
imported() { echo "$WORKDIR/imagenet/$1"; }
CONFIG="configs/$DATASET.py"
DATA=()
if [[ -n "$DATA_DIR_ARG" ]]; then DATA=("--config.data_dir=$DATA_DIR_ARG"); fi
# Each stage's command (after the Python); what marks it finished is given where it runs
# (training writes final_metrics.json after both of its exports).
TD_RUN="$WORKDIR/teacher_deep" TW_RUN="$WORKDIR/teacher_wide" STUDENT_RUN="$WORKDIR/student"
DEPLOY="$WORKDIR/student_deploy"
if [[ "$TEACHERS" == official ]]; then TD="$WORKDIR/teacher_deep_official"
  TW="$WORKDIR/teacher_wide_official"
else TD="$TD_RUN/export" TW="$TW_RUN/export"; fi
# (the paths the recipe builds become single words of the commands below)
if [[ "$WORKDIR$WEIGHTS$DATA_DIR_ARG$PY" == *[[:space:]]* ]]; then
  fail "--workdir, --weights, --data_dir and --python must not contain spaces"
fi
IMPORT=(-m mgd_jax.tools.import_weights --backbone_only)
IMPORT_TD=("${IMPORT[@]}" --backbone=resnet101 "--torch=$(weight_file resnet101)"
  "--output=$(imported resnet101)")
IMPORT_TW=("${IMPORT[@]}" --backbone=wide_resnet50_2 "--torch=$(weight_file wide_resnet50_2)"
  "--output=$(imported wide_resnet50_2)")
IMPORT_S=("${IMPORT[@]}" "--backbone=$STUDENT" "--torch=$(weight_file "$STUDENT")"
  "--output=$(imported "$STUDENT")")
TRAIN_TD=(-m mgd_jax.main "--config=$CONFIG:method=cps,teacher=resnet101,partition=$PARTITION"
  "--workdir=$TD_RUN" "--config.cps.init=$(imported resnet101)")
TRAIN_TW=(-m mgd_jax.main
  "--config=$CONFIG:method=cps,teacher=wide_resnet50_2,partition=$PARTITION"
  "--workdir=$TW_RUN" "--config.cps.init=$(imported wide_resnet50_2)")
OFFICIAL_TD=(-m mgd_jax.tools.import_weights --backbone=resnet101
  "--torch=$(official_teacher resnet101)" --prefix=branch1 "--num_classes=$CLASSES"
  "--output=$TD")
OFFICIAL_TW=(-m mgd_jax.tools.import_weights --backbone=wide_resnet34_2
  "--torch=$(official_teacher wideresnet34)" --prefix=branch1 "--num_classes=$CLASSES"
  "--output=$TW")
TRAIN_S=(-m mgd_jax.main "--config=$CONFIG:method=mgd,student=$STUDENT,partition=$PARTITION"
  "--workdir=$STUDENT_RUN" "--config.student_init=$(imported "$STUDENT")"
  "--config.teacher_deep.checkpoint=$TD" "--config.teacher_wide.checkpoint=$TW")
# (mgd-eval reads the dataset and protocol from the student's config.json)
EVAL=(-m mgd_jax.tools.evaluate "--checkpoint=$STUDENT_RUN")
EXPORT=(-m mgd_jax.tools.export "--checkpoint=$STUDENT_RUN" --format=jax "--sizes=$SIZES"
  "--output=$DEPLOY")

say() { echo "recipe: $*"; }

# ---- slurm: one job per stage; a stage's job waits (afterok) for the jobs of the stages it needs
if [[ "$PLATFORM" == slurm ]]; then
  SMALL=(--nodes=1 --gpus-per-node=1 --ntasks-per-node=1)
  LARGE=()
  if [[ -n "$NODES" ]]; then LARGE+=("--nodes=$NODES"); fi
  if [[ -n "$GPUS_PER_NODE" ]]; then
    LARGE+=("--gpus-per-node=$GPUS_PER_NODE" "--ntasks-per-node=$GPUS_PER_NODE")
  fi
  JOB_COUNT=0
  submit() {  # submit NAME DEPENDENCIES(a:b or "") MARKER ALLOCATION... -- COMMAND...; sets JOB
    local name="$1" after="$2" marker="$3"; shift 3
    local alloc=()
    while [[ "$1" != -- ]]; do alloc+=("$1"); shift; done
    shift
    JOB=""
    if exists "$marker"; then say "$name: done ($marker)"; return; fi
    local dependency=()
    if [[ -n "$after" ]]; then dependency=("--dependency=afterok:$after" --kill-on-invalid-dep=yes); fi
    local command=(sbatch --parsable "--job-name=mgd_${NAME}_$name" "${dependency[@]}"
      "--export=ALL,MGD_CODE_DIR=$ROOT,MGD_PYTHON=$PY" "${alloc[@]}" "$HERE/slurm.sbatch" "$@")
    printf '+'; printf ' %q' "${command[@]}"; printf '\n'
    JOB_COUNT=$((JOB_COUNT + 1))
    if [[ "$DRY_RUN" == 1 ]]; then JOB="JOB$JOB_COUNT"; else
      JOB="$("${command[@]}")"; JOB="${JOB%%;*}"; fi
    say "$name: job $JOB"
  }
  joined() { local IFS=:; echo "$*"; }
  deps() { local ids=(); for id in "$@"; do if [[ -n "$id" ]]; then ids+=("$id"); fi; done
           joined "${ids[@]+"${ids[@]}"}"; }
  submit "import_$STUDENT" "" "$(imported "$STUDENT")/meta.json" "${SMALL[@]}" -- "${IMPORT_S[@]}"
  IMPORT_S_JOB="$JOB"
  if [[ "$TEACHERS" == official ]]; then
    submit teacher_deep "" "$TD/meta.json" "${SMALL[@]}" -- "${OFFICIAL_TD[@]}"; TD_JOB="$JOB"
    submit teacher_wide "" "$TW/meta.json" "${SMALL[@]}" -- "${OFFICIAL_TW[@]}"; TW_JOB="$JOB"
  else
    submit import_resnet101 "" "$(imported resnet101)/meta.json" "${SMALL[@]}" -- "${IMPORT_TD[@]}"
    IMPORT_TD_JOB="$JOB"
    submit import_wide_resnet50_2 "" "$(imported wide_resnet50_2)/meta.json" "${SMALL[@]}" -- \
      "${IMPORT_TW[@]}"
    IMPORT_TW_JOB="$JOB"
    submit teacher_deep "$IMPORT_TD_JOB" "$TD_RUN/final_metrics.json" "${LARGE[@]}" -- \
      "${TRAIN_TD[@]}" "${DATA[@]}" "${EXTRA[@]}"
    TD_JOB="$JOB"
    submit teacher_wide "$IMPORT_TW_JOB" "$TW_RUN/final_metrics.json" "${LARGE[@]}" -- \
      "${TRAIN_TW[@]}" "${DATA[@]}" "${EXTRA[@]}"
    TW_JOB="$JOB"
  fi
  submit student "$(deps "$IMPORT_S_JOB" "$TD_JOB" "$TW_JOB")" "$STUDENT_RUN/final_metrics.json" \
    "${LARGE[@]}" -- "${TRAIN_S[@]}" "${DATA[@]}" "${EXTRA[@]}"
  STUDENT_JOB="$JOB"
  submit eval "$STUDENT_JOB" "$STUDENT_RUN/eval_val.json" "${SMALL[@]}" -- "${EVAL[@]}"
  submit export "$STUDENT_JOB" "$DEPLOY/deploy.json" "${SMALL[@]}" -- "${EXPORT[@]}"
  say "submitted; squeue -u \$USER shows the jobs, each stage's log is mgd_${NAME}_<stage>-<job>.out"
  exit 0
fi

# ---- gpu, multi-gpu, colab, tpu-worker: the stages in order, in the foreground
cd "$ROOT"  # (the configs are named from the repository root)
PRIMARY=1
if [[ "$PLATFORM" == tpu-worker ]]; then
  # the worker number jax's own TPU cluster detection reads (TPU_WORKER_ID where set)
  WORKER="${TPU_WORKER_ID:-$(curl -sf --max-time 30 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/agent-worker-number" \
    || true)}"
  [[ "$WORKER" =~ ^[0-9]+$ ]] || fail "cannot read this TPU worker's number from the metadata server"
  if [[ "$WORKER" != 0 ]]; then PRIMARY=0; fi
  STOP_FLAG="$HOME/mgd_jax_run/stop_requested"  # written by launch/worker_stop.sh
  # One detached recipe per worker: a second one would start every stage a second time.
  RECIPE_PID="$HOME/mgd_jax_run/recipe.pid"
  if [[ -f "$RECIPE_PID" ]] && kill -0 "$(cat "$RECIPE_PID")" 2> /dev/null; then
    fail "$(hostname): a recipe is running here already (pid $(cat "$RECIPE_PID")):" \
      "launch/stop.sh stops it"
  fi
  if [[ "$DRY_RUN" == 0 ]]; then
    mkdir -p "$HOME/mgd_jax_run"
    echo $$ > "$RECIPE_PID"
    trap 'rm -f "$RECIPE_PID"' EXIT
  fi
  rm -f "$STOP_FLAG"
fi
if [[ "$PLATFORM" == multi-gpu ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    run "$PY" -c 'import jax; print(jax.local_device_count())'
  else
    COUNT="$("$PY" -c 'import jax; print(jax.local_device_count())')"
    if (( COUNT < 2 )); then
      fail "--platform=multi-gpu: jax sees $COUNT device(s) (CUDA_VISIBLE_DEVICES? the jax CUDA" \
        "plugin installed?); --platform=gpu trains on one"
    fi
    say "$COUNT devices, one process"
  fi
fi
if [[ "$PLATFORM" == colab && "$WORKDIR" != /content/drive/* && "$WORKDIR" != gs://* ]]; then
  say "warning: $WORKDIR is lost when the Colab runtime disconnects; a workdir under" \
    "/content/drive/MyDrive (drive.mount) or on gs:// survives it"
fi

stopped() {  # a training that ended without its finished marker: stopped (signal), not done
  say "$1 stopped before it finished (its checkpoint is in $2): rerun the same command to continue"
  exit 0
}

# stage NAME MARKER [--primary] COMMAND...: runs COMMAND with the Python unless MARKER exists;
# --primary: on a TPU VM only worker 0 runs it (a single-process tool writing one output), with
# the CPU backend, and the other workers wait for MARKER.
stage() {
  local name="$1" marker="$2"; shift 2
  local primary=0
  if [[ "$1" == --primary ]]; then primary=1; shift; fi
  if exists "$marker"; then say "$name: done ($marker)"; return; fi
  say "$name"
  if [[ "$PLATFORM" == tpu-worker ]]; then
    if (( primary && ! PRIMARY )); then
      run wait_for "$marker"
      return
    fi
    if (( primary )); then
      run env JAX_PLATFORMS=cpu MGD_JAX_DISTRIBUTED=0 "$PY" "$@"
    else  # every worker, one multi-host program; its pid for launch/stop.sh
      run bash "$HERE/worker_run.sh" "$PY" "$(dirname "$marker")" "$@"
    fi
  else
    run "$PY" "$@"
  fi
  if [[ "$DRY_RUN" == 1 ]] || exists "$marker"; then return; fi
  if [[ "$PLATFORM" == tpu-worker ]]; then
    # launch/stop.sh leaves this flag; otherwise the program ended at its last step, and
    # worker 0 (process 0, which writes the marker) may end a moment after this worker
    if [[ -e "$STOP_FLAG" ]]; then stopped "$name" "$(dirname "$marker")"; fi
    if (( ! PRIMARY )); then wait_for "$marker"; return; fi
  fi
  stopped "$name" "$(dirname "$marker")"
}

wait_for() {  # wait_for PATH: polls until worker 0 has written it
  local start=$SECONDS limit="${MGD_RECIPE_WAIT:-7200}"
  until exists "$1"; do
    if (( SECONDS - start >= limit )); then
      fail "$1 did not appear within ${limit}s (worker 0's log: ~/mgd_jax_recipe.txt there)"
    fi
    sleep "${MGD_RECIPE_POLL:-10}"
  done
}

stage "import $STUDENT" "$(imported "$STUDENT")/meta.json" --primary "${IMPORT_S[@]}"
if [[ "$TEACHERS" == official ]]; then
  stage "import teacher_deep (official)" "$TD/meta.json" --primary "${OFFICIAL_TD[@]}"
  stage "import teacher_wide (official)" "$TW/meta.json" --primary "${OFFICIAL_TW[@]}"
else
  stage "import resnet101" "$(imported resnet101)/meta.json" --primary "${IMPORT_TD[@]}"
  stage "import wide_resnet50_2" "$(imported wide_resnet50_2)/meta.json" --primary \
    "${IMPORT_TW[@]}"
  stage teacher_deep "$TD_RUN/final_metrics.json" "${TRAIN_TD[@]}" "${DATA[@]}" \
    "${EXTRA[@]+"${EXTRA[@]}"}"
  stage teacher_wide "$TW_RUN/final_metrics.json" "${TRAIN_TW[@]}" "${DATA[@]}" \
    "${EXTRA[@]+"${EXTRA[@]}"}"
fi
stage student "$STUDENT_RUN/final_metrics.json" "${TRAIN_S[@]}" "${DATA[@]}" \
  "${EXTRA[@]+"${EXTRA[@]}"}"
stage eval "$STUDENT_RUN/eval_val.json" "${EVAL[@]}"
stage export "$DEPLOY/deploy.json" --primary "${EXPORT[@]}"
say "finished: $STUDENT_RUN (eval_val.json: the val scores), $DEPLOY (the deployable student)"
