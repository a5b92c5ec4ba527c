"""The embedded default: the whole method on the synthetic dataset, no input files.

Stages, each an ordinary `train_and_evaluate` run in its own sub-workdir (rerun or inspect any):
  pretrain_deep       a reduced ResNet-101 trained on the source task (below)
  pretrain_wide       a reduced Wide-ResNet-50-2 trained on the source task
  teacher_deep        CPS on two reduced ResNet-101s, backbones from pretrain_deep -> T_D
  teacher_wide        CPS on two reduced Wide-ResNet-50-2s, from pretrain_wide     -> T_W
  student_supervised  Sup.l: the student (from scratch) on the labeled subset only
  student_mgd         the same student, steps, labeled subset and seed, distilled with MGD

The pre-training stages stand in for the teachers' ImageNet initialisation (`demo.pretrain`): a
synthetic source task whose classes are the target's two textures on another shape
(square+stripes, square+dots), with every image labeled, in which no object is a class of the
target task (no disc with stripes or dots, not even as a distractor). As ImageNet does for VOC, it
gives the teachers the features the target needs (telling stripes from dots, which a 32-label
student from scratch rarely learns) but no label of the target task; each teacher pre-trains until
it has learned them (`pretrain_steps`), and the teachers see the same labeled subset as the
students.
The students start from scratch, so the teachers start ahead, which is the method's premise (in
the official recipe: ImageNet-initialised ResNet-101 / WRN teachers trained with CPS, against a
ResNet-18 student); how far ahead they end, per seed, is in docs/demo.md.
then the table (mIoU, parameters) and the students' gain MGD - Sup.l with its bootstrap standard
error over the val images, printed and written to `<workdir>/results.json`, and the panel of every
stage's predictions on the same val images written to `<workdir>/panels.png` (per seed folder when
there are several). `demo.seeds` runs the whole demo for several seeds and adds the mean +- std of
the gain.

On a CPU, `demo.parallel_stages` stages run at once, each in a process of its own (the teachers
together, then the students; MGD starts once both teachers are exported): one training process
keeps about 1.5 of 2 cores busy, two keep both. The numbers are the same as one after another (each
stage is the same deterministic program). The stages' console lines are prefixed with the stage
name. The first SIGTERM / SIGINT to the demo stops it: every running stage stops with its
checkpoint (one started while the signal landed too), no further stage starts, the demo says so
on its last line and in `<workdir>/stopped.json`, and exits 0; the same command continues.

`configs/demo.py:ablation=1` adds the ablation's students (`ABLATION`): the MGD student with
some of its loss terms switched off, or L_P from one teacher, each distilled from the same
teachers; a stage already trained in the workdir with the same config is reused, not trained
again, so run after the demo it trains only them. It prints one more table (a row per student:
mIoU, gain over Sup.l and its bootstrap SE; mean +- std over seeds) and adds it to results.json
under `ablation`.

The top-level fields the demo sets for each stage (`PER_STAGE_FIELDS`: the seed, steps, learning
rate, networks, ...) are refused when changed, naming the `demo.*` field to use instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from mgd_jax.runtime import logs, workdir_lock
from mgd_jax.runtime.errors import ConfigError, UserError

STAGES = ("pretrain_deep", "pretrain_wide", "teacher_deep", "teacher_wide",
          "student_supervised", "student_mgd")
# The ablation (`configs/demo.py:ablation=1`): extra students, each the MGD student's stage config
# with only these loss switches changed (same init, steps, labeled subset and seed), distilled
# from the same teachers. Every variant keeps L_sup; the full MGD student and Sup.l are the
# demo's own stages, so they close the table without training again.
ABLATION = {
    "ablation_pixel_deep": ("L_sup + L_P, T_D only",
                            {"loss.image": False, "loss.region": False,
                             "loss.pixel_teachers": "deep"}),
    "ablation_pixel_wide": ("L_sup + L_P, T_W only",
                            {"loss.image": False, "loss.region": False,
                             "loss.pixel_teachers": "wide"}),
    "ablation_pixel": ("L_sup + L_P", {"loss.image": False, "loss.region": False}),
    "ablation_pixel_image": ("L_sup + L_P + L_I", {"loss.region": False}),
    "ablation_pixel_region": ("L_sup + L_P + L_R", {"loss.image": False}),
}
ABLATION_STAGES = tuple(ABLATION)
# The ablation table's rows, in order: (stage, what its student is trained with).
ABLATION_ROWS = (("student_supervised", "L_sup only (Sup.l)"),
                 *((stage, name) for stage, (name, _) in ABLATION.items()),
                 ("student_mgd", "L_sup + L_P + L_I + L_R (MGD)"))
# The stages that must finish first.
NEEDS = {"teacher_deep": {"pretrain_deep"}, "teacher_wide": {"pretrain_wide"},
         **{s: {"teacher_deep", "teacher_wide"} for s in ("student_mgd", *ABLATION_STAGES)}}
RESULT_NAMES = {
    "teacher_deep": "teacher_resnet101",
    "teacher_wide": "teacher_wide_resnet50_2",
    "student_supervised": "student_supervised",
    "student_mgd": "student_mgd",
}


DATASET = "mgd_synthetic"  # the target task's tfds name (the demo builds it in the workdir)
_STEPS = ("config.demo.student_steps, config.demo.teacher_steps or "
          "config.demo.teacher_deep.pretrain_steps / teacher_wide.pretrain_steps")
_AT_STAGE_END = ("each stage evaluates and checkpoints at its end and on a signal; "
                 "configs/demo.py:stage=<stage> gives one stage's plain config")
# Top-level fields that `stage_config` / `run` set for every stage, so a value given to the demo
# would be ignored: each with what to change instead (`check_config` refuses a changed one).
PER_STAGE_FIELDS = {
    "seed": "config.demo.seeds",
    "method": "config.stages (each stage has its method)",
    "student": "config.demo.student",
    "model.width": "config.demo.student_width or config.demo.teacher_deep.width / "
                   "teacher_wide.width",
    "model.depths": "config.demo.student_depths or config.demo.teacher_deep.depths / "
                    "teacher_wide.depths",
    "num_train_steps": _STEPS,
    "num_epochs": _STEPS,
    "lr": "config.demo.student_lr, config.demo.teacher_lr or config.demo.pretrain.lr",
    "eval_every": _AT_STAGE_END,
    "checkpoint_every": _AT_STAGE_END,
    "dataset": "config.demo.synthetic (the demo generates its data)",
    "cps.backbone": "config.demo.teacher_deep.backbone / teacher_wide.backbone",
    "cps.init": "config.stages (each teacher starts from its pretrain stage's export)",
    **{f"{t}.{k}": f"config.demo.{t}.{k}" for t in ("teacher_deep", "teacher_wide")
       for k in ("backbone", "width", "depths")},
    **{f"{t}.checkpoint": "config.stages (student_mgd distils from the teacher stages' exports)"
       for t in ("teacher_deep", "teacher_wide")},
}


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
    return functools.reduce(lambda c, key: c[key], name.split("."), config)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a demo config whose `PER_STAGE_FIELDS` differ from the defaults (the demo would
    ignore them), naming each with the field to use instead; one line."""
    from mgd_jax import config_lib

    defaults = config_lib.base_config()
    with defaults.unlocked():
        defaults.dataset = DATASET
    problems = []
    for name, instead in PER_STAGE_FIELDS.items():
        value = _field(config, name)
        if value == _field(defaults, name):
            continue
        if name == "seed":
            problems.append(f"config.seed={value}: the demo trains each seed of config.demo.seeds "
                            f"(now {config.demo.seeds!r}); use --config.demo.seeds={value} "
                            f"(or configs/demo.py:seeds={value})")
        else:
            problems.append(f"config.{name}={value!r}: the demo sets it for each stage and would "
                            f"ignore it; use {instead}")
    if problems:
        raise ConfigError("; ".join(problems))


def _arch(backbone: str, width: float, depths: str) -> str:
    if width == 1.0 and not depths:
        return backbone
    parts = [f"width x{width:g}"] + ([f"blocks {depths}"] if depths else [])
    return f"{backbone} (reduced: {', '.join(parts)})"


def _role(stage: str) -> str:
    """The network a stage trains: "teacher_deep", "teacher_wide" or "student"."""
    if stage.startswith("pretrain_"):
        return "teacher_" + stage.removeprefix("pretrain_")
    return stage if stage.startswith("teacher") else "student"


def _architecture(d: ml_collections.ConfigDict, role: str) -> tuple[str, float, str]:
    """(backbone, width, depths) of a demo role."""
    if role == "student":
        return d.student, d.student_width, d.student_depths
    return d[role].backbone, d[role].width, d[role].depths


def source_sizes(demo: ml_collections.ConfigDict) -> dict[str, Any]:
    """The synthetic spec of the pre-training source task: the target's sizes with
    `demo.pretrain.synthetic` on top. Its classes start after the target's in the class grid
    (`SyntheticSpec.first_class`, by default right after them), and the pairs before them are
    never drawn, so no object in it is a target class."""
    sizes = {**demo.demo.synthetic.to_dict(), "first_class": demo.num_classes - 1,
             **demo.demo.pretrain.synthetic.to_dict()}
    if sizes["first_class"] < demo.num_classes - 1:
        raise ConfigError(
            f"config.demo.pretrain.synthetic.first_class={sizes['first_class']}: the source "
            f"task would draw target classes; expected >= {demo.num_classes - 1}")
    return sizes


def _plain_copy(demo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = copy.deepcopy(demo)
    with c.unlocked():
        del c["stages"]
        del c.demo["seeds"]
        if "parallel_stages" in c.demo:  # how the demo runs, not what a stage trains
            del c.demo["parallel_stages"]
    return c


def stage_config(
    demo: ml_collections.ConfigDict, stage: str, workdir: str | None = None
) -> ml_collections.ConfigDict:
    """The plain training config of one demo stage (no `stages` or `demo.seeds` field).

    With `workdir`, the MGD stage points at the teachers exported by the earlier stages. An
    ablation stage (`ABLATION`) is the MGD stage with its loss switches changed, nothing else.
    """
    if stage in ABLATION:
        c = stage_config(demo, "student_mgd", workdir)
        for name, value in ABLATION[stage][1].items():
            parent, key = name.rsplit(".", 1)
            _field(c, parent)[key] = value
        return c
    if stage not in STAGES:
        raise ConfigError(f"demo stage {stage!r} is not one of {STAGES + ABLATION_STAGES}")
    c = _plain_copy(demo)
    d = c.demo
    backbone, c.model.width, c.model.depths = _architecture(d, _role(stage))
    if stage.startswith("pretrain"):  # supervised on every image of the source task
        from mgd_jax.data import prepare

        sizes = source_sizes(demo)
        c.method = "supervised"
        c.student = backbone
        c.dataset = prepare.synthetic_name(**sizes)
        c.num_classes = sizes["num_classes"]
        c.labeled_count = sizes["num_train"]
        c.num_train_steps = d[_role(stage)].pretrain_steps
        c.lr = d.pretrain.lr
    elif stage.startswith("teacher"):
        c.method = "cps"
        c.cps.backbone = backbone
        c.num_train_steps = d.teacher_steps
        c.lr = d.teacher_lr
        pretrain = "pretrain_" + stage.removeprefix("teacher_")
        if pretrain not in demo.stages.split(","):
            c.cps.init = "none"  # no pre-training stage: from random weights (methods.base)
        elif workdir is not None:
            c.cps.init = os.path.join(workdir, pretrain, "export")
    else:
        c.method = "supervised" if stage == "student_supervised" else "mgd"
        c.student = backbone
        c.num_train_steps = d.student_steps
        c.lr = d.student_lr
        if c.method == "mgd" and workdir is not None:
            for name in ("teacher_deep", "teacher_wide"):
                c[name].backbone = d[name].backbone
                c[name].checkpoint = os.path.join(workdir, name, "export")
    c.eval_every = c.num_train_steps
    c.checkpoint_every = c.num_train_steps
    return c


def _arch_of(config: ml_collections.ConfigDict, stage: str) -> str:
    return _arch(*_architecture(config.demo, _role(stage)))


def format_results(results: dict[str, dict[str, Any]],
                   source_miou: dict[str, float] | None = None) -> str:
    lines = [f"{'network':<24} {'mIoU %':>7} {'params':>10}  architecture", "-" * 80]
    for name, r in results.items():
        lines.append(f"{name:<24} {100 * r['miou']:>7.2f} {r['params']:>10,}  {r['arch']}")
    if source_miou:
        cells = ", ".join(f"{stage} {100 * m:.2f}" for stage, m in source_miou.items())
        lines.append(f"(pre-training, mIoU % on the source task's val: {cells})")
    return "\n".join(lines)


def format_seeds(per_seed: dict[int, dict[str, Any]]) -> str:
    """One row per seed (the four mIoUs, the gain and its bootstrap SE), then the mean +- std."""
    names = list(RESULT_NAMES.values())
    short = {"teacher_resnet101": "T_D", "teacher_wide_resnet50_2": "T_W",
             "student_supervised": "Sup.l", "student_mgd": "MGD"}
    lines = ["seed " + "".join(f"{short[n]:>8}" for n in names) + "   MGD - Sup.l (SE)"]
    for seed, r in per_seed.items():
        cells = "".join(f"{100 * r['networks'][n]['miou']:>8.2f}" for n in names)
        lines.append(f"{seed:>4} {cells}   {100 * r['gain']:+6.2f} ({100 * r['gain_se']:.2f})")
    gains = np.array([r["gain"] for r in per_seed.values()])
    spread = f" +- {100 * gains.std(ddof=1):.2f} (std over seeds)" if len(gains) > 1 else ""
    lines.append(f"mean gain {100 * gains.mean():+.2f}{spread}; min {100 * gains.min():+.2f}")
    return "\n".join(lines)


def ablation_table(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ablation's rows (`ABLATION_ROWS`) from each seed's: per row what the student is
    trained with, the switches it changes against the MGD student, its mIoU, gain over Sup.l
    and that gain's bootstrap SE per seed, and the mean and std over seeds (std 0 for one seed;
    Sup.l's gain is None)."""
    def spread(values: list[float | None]) -> tuple[float | None, float | None]:
        if None in values:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    table = {}
    for stage, name in ABLATION_ROWS:
        rows = {str(seed): r["ablation"][stage] for seed, r in per_seed.items()}
        miou_mean, miou_std = spread([row["miou"] for row in rows.values()])
        gain_mean, gain_std = spread([row["gain"] for row in rows.values()])
        table[stage] = {"variant": name, "switches": ABLATION.get(stage, (None, {}))[1],
                        "seeds": rows, "miou_mean": miou_mean, "miou_std": miou_std,
                        "gain_mean": gain_mean, "gain_std": gain_std}
    if "student_supervised" in table:
        table["student_supervised"]["switches"] = None  # another method, not a switch of MGD's
    return table


def format_ablation(table: dict[str, dict[str, Any]]) -> str:
    """One row per student: its mIoU and gain over Sup.l (bootstrap SE) per seed; with several
    seeds, the mean +- std (over seeds) of both."""
    seeds = list(next(iter(table.values()))["seeds"])
    several = len(seeds) > 1
    header = f"{'student trained with':<32}" + "".join(f"{'seed ' + s:>23}" for s in seeds)
    if several:
        header += f"{'mIoU mean +- std':>20}{'gain mean +- std':>20}"
    lines = ["ablation: mIoU % and gain over Sup.l (its bootstrap SE over the val images) of "
             "the same student (init, steps, labeled subset, seed) trained with", header]
    for row in table.values():
        cells = ""
        for r in row["seeds"].values():
            gain = ("" if r["gain"] is None
                    else f"{100 * r['gain']:+7.2f} ({100 * r['gain_se']:.2f})")
            cells += f"{100 * r['miou']:>8.2f}{gain:>15}"
        if several:
            cells += f"{100 * row['miou_mean']:>12.2f} +- {100 * row['miou_std']:4.2f}"
            cells += ("" if row["gain_mean"] is None else
                      f"{100 * row['gain_mean']:>+12.2f} +- {100 * row['gain_std']:4.2f}")
        lines.append(f"{row['variant']:<32}{cells}".rstrip())
    return "\n".join(lines)


def student_gains(config: ml_collections.ConfigDict, seed_dir: str, stages: Sequence[str]
                  ) -> dict[str, tuple[float, float]]:
    """For each of `stages` (students exported in `seed_dir`): its val mIoU minus Sup.l's, with
    the bootstrap standard error over the val images (`evaluate.bootstrap_difference`, paired:
    the same resamples for both); Sup.l is evaluated once."""
    from mgd_jax import network_dir
    from mgd_jax.data import input_pipeline
    from mgd_jax.evaluation import evaluate

    evaluator = evaluate.Evaluator.from_config(config)
    source = input_pipeline.eval_source(config)

    def per_example(stage: str) -> np.ndarray:
        network = network_dir.load_network(os.path.join(seed_dir, stage),
                                           precision=config.precision)
        return evaluator.per_example(
            evaluate.model_logits(network.model), network.variables,
            input_pipeline.eval_dataset(source, batch_size=config.eval.batch_size,
                                        pad_to=tuple(config.eval.pad_to)),
        )[: len(source)]

    supervised = per_example("student_supervised")
    return {stage: evaluate.bootstrap_difference(supervised, per_example(stage))
            for stage in stages}


def final_metrics(seed_dir: str, stage: str) -> dict[str, Any]:
    with open(os.path.join(seed_dir, stage, "final_metrics.json")) as f:
        return json.load(f)


def finished_stage(config: ml_collections.ConfigDict, stage: str, seed_dir: str
                   ) -> dict[str, Any] | None:
    """The final metrics of `stage` when `seed_dir` holds it trained to the end with this very
    stage config (its recorded config.json differs in no field that changes the run), else
    None. Such a stage is not started again: the ablation reuses a finished demo's stages."""
    from mgd_jax import config_lib

    try:
        metrics = final_metrics(seed_dir, stage)
        with open(os.path.join(seed_dir, stage, "config.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):  # not there, or cut short
        return None
    # (what a run records: the fields left to the backend resolved, as they are in the stages)
    wanted = config_lib.resolve_backend_defaults(stage_config(config, stage, seed_dir))
    if (not os.path.isdir(os.path.join(seed_dir, stage, "export"))
            or config_lib.resume_changes(recorded, wanted)):
        return None
    return metrics


@dataclasses.dataclass
class Stopped:
    """A seed's stages stopped by a signal: its name (None where the stage trained in the demo's
    own process, which names it on its console line) and each stage's state: "finished",
    "stopped" (with its checkpoint) or "not started"."""
    signal: str | None
    stages: dict[str, str]


def run_seed(config: ml_collections.ConfigDict, seed_dir: str) -> dict[str, Any] | Stopped:
    """Every stage of one seed: the four networks' results (the pre-trained ones' mIoU on the
    source task apart) and the students' gain with its SE, or `Stopped` when a signal stopped
    the stages."""
    stages = [s for s in config.stages.split(",") if s]
    width = parallel_width(config)
    results = (_run_stages_at_once(config, stages, seed_dir, width) if width > 1
               else _run_stages_in_turn(config, stages, seed_dir))
    if isinstance(results, Stopped):
        return results
    networks = {RESULT_NAMES[stage]: {
        "miou": float(results[stage]["miou"]),
        "params": int(results[stage]["params"]),
        "arch": _arch_of(config, stage),
    } for stage in stages if stage in RESULT_NAMES}
    source_miou = {stage: float(results[stage]["miou"]) for stage in stages
                   if stage.startswith("pretrain")}
    ablation = [s for s in ABLATION_STAGES if s in stages]
    gains = student_gains(config, seed_dir, ["student_mgd", *ablation])
    gain, gain_se = gains["student_mgd"]
    record = {"networks": networks, "pretraining_source_miou": source_miou, "gain": gain,
              "gain_se": gain_se}
    if ablation:  # the rows of this seed: every student of the table
        record["ablation"] = {stage: {
            "miou": float((results[stage] if stage in results
                           else final_metrics(seed_dir, stage))["miou"]),
            "gain": gains[stage][0] if stage in gains else None,
            "gain_se": gains[stage][1] if stage in gains else None,
        } for stage, _ in ABLATION_ROWS}
    return record


def parallel_width(config: ml_collections.ConfigDict) -> int:
    """How many stages run at once: `demo.parallel_stages` on a single-process CPU run, else 1
    (an accelerator is not shared between processes; a multi-host run is one program)."""
    import jax

    wanted = int(config.demo.get("parallel_stages", 1))
    if wanted < 1:
        raise ConfigError(f"config.demo.parallel_stages: must be >= 1, got {wanted}")
    if jax.process_count() > 1 or jax.default_backend() != "cpu":
        return 1
    return wanted


def _run_stages_in_turn(config: ml_collections.ConfigDict, stages: Sequence[str],
                        seed_dir: str) -> dict[str, dict[str, Any]] | Stopped:
    from mgd_jax import train

    results = {}
    for stage in stages:
        stage_dir = os.path.join(seed_dir, stage)
        if _reuse(config, stage, seed_dir, results):
            continue
        logs.say(f"== seed {config.seed}: stage {stage} -> {stage_dir}")
        results[stage] = train.train_and_evaluate(stage_config(config, stage, seed_dir),
                                                  stage_dir)
        if results[stage].get("stopped"):
            return Stopped(None, {s: "finished" if s in results and s != stage else
                                  "stopped" if s == stage else "not started" for s in stages})
    return results


# The exit status of a stage process stopped by a signal (with its checkpoint written).
STOPPED_EXIT = 75
STAGE_CONFIG_FILE = "stage_config.pkl"  # what the parent hands a stage process


def _needs(stage: str, stages: Sequence[str]) -> set[str]:
    return NEEDS.get(stage, set()) & set(stages)


def _reuse(config: ml_collections.ConfigDict, stage: str, seed_dir: str,
           results: dict[str, dict[str, Any]]) -> bool:
    """Whether `stage` is already trained (`finished_stage`): then its result goes to `results`
    and it is said so."""
    metrics = finished_stage(config, stage, seed_dir)
    if metrics is None:
        return False
    results[stage] = metrics
    logs.say(f"== seed {config.seed}: stage {stage}: already trained in "
             f"{os.path.join(seed_dir, stage)} (mIoU {100 * metrics['miou']:.2f} %), reused")
    return True


# The points of the stage scheduler, in order, where it calls `scheduler_point(point, stage)`:
# a seam for the tests, which inject a signal at each one ("waiting": the poll interval, stage "").
SCHEDULER_POINTS = ("before_start", "spawned", "started", "waiting", "polled", "finished")


def scheduler_point(point: str, stage: str) -> None:
    """Does nothing: the seam the tests replace (`SCHEDULER_POINTS`)."""
    del point, stage


def _run_stages_at_once(config: ml_collections.ConfigDict, stages: Sequence[str], seed_dir: str,
                        width: int) -> dict[str, dict[str, Any]] | Stopped:
    """The stages, up to `width` at once, each `python -m mgd_jax.tools.demo_stage` in a session
    of its own (signals reach it only through here); a stage starts once the stages it needs
    finished.

    The signal handler only records a signal; the loop passes each one on, once, to every running
    stage after each of its steps, a stage started while the signal landed included (a second
    signal to a stage aborts its checkpointing stop, so none gets one twice), and starts nothing
    once a signal came or a stage failed.
    """
    pending, running, results = list(stages), {}, {}
    failed: tuple[str, int] | None = None
    received: list[int] = []  # the signals to the demo
    orders: list[int] = []  # what every running stage gets: the signals, or SIGTERM on a failure
    delivered: dict[str, int] = {}  # stage -> how many of `orders` it got
    stopped: set[str] = set()  # by a signal, with their checkpoints
    checked: set[str] = set()  # looked for as trained before (`_reuse`)

    def record(signum: int, frame: Any) -> None:
        del frame
        received.append(signum)
        orders.append(signum)

    def deliver() -> None:
        for stage, (proc, _) in running.items():
            wanted = len(orders)  # a signal landing meanwhile is passed on at the next call
            for signum in orders[delivered.get(stage, 0):wanted]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
            delivered[stage] = wanted

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            for stage in [s for s in pending if _needs(s, stages) <= results.keys()]:
                if stage not in checked and not (received or failed or stopped):
                    checked.add(stage)  # once: a stage trained before is reused
                    if _reuse(config, stage, seed_dir, results):
                        pending.remove(stage)
                        continue
                scheduler_point("before_start", stage)
                if received or failed or stopped or len(running) >= width:
                    break
                pending.remove(stage)
                proc = _start_stage(config, stage, seed_dir, cancelled=lambda: bool(received))
                if proc is None:
                    break
                running[stage] = proc
                scheduler_point("started", stage)
                deliver()
            if received or failed or stopped:
                pending.clear()
            deliver()
            scheduler_point("waiting", "")
            time.sleep(0.2)
            for stage, (proc, printer) in list(running.items()):
                code = proc.poll()
                scheduler_point("polled", stage)
                if code is None:
                    continue
                printer.join()
                del running[stage]
                if code == 0:
                    with open(os.path.join(seed_dir, stage, "final_metrics.json")) as f:
                        results[stage] = json.load(f)
                elif received or code == STOPPED_EXIT:
                    if not (received or stopped or failed):  # a signal sent to the stage alone
                        orders.append(signal.SIGTERM)  # stops the demo the same way
                    stopped.add(stage)  # with its checkpoint, or before it had made any
                elif failed is None:
                    failed = (stage, code)
                    orders.append(signal.SIGTERM)  # the others stop with a checkpoint
                scheduler_point("finished", stage)
                deliver()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        stage, code = failed
        raise UserError(f"demo stage {stage} failed (exit status {code}); its log: "
                        f"{os.path.join(seed_dir, stage, logs.LOG_FILE)}")
    if received or stopped:
        return Stopped(signal.Signals(received[0]).name if received else None, {
            s: "finished" if s in results else "stopped" if s in stopped else "not started"
            for s in stages})
    return results


def _start_stage(config: ml_collections.ConfigDict, stage: str, seed_dir: str,
                 cancelled: Callable[[], bool] = lambda: False,
                 ) -> tuple[subprocess.Popen, threading.Thread] | None:
    """One stage in a process of its own; its output is printed here line by line, prefixed.
    None, with nothing started, when `cancelled()` says so right before the start (a signal
    landed while the stage's files were written)."""
    import jax

    stage_dir = os.path.join(seed_dir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    logs.say(f"== seed {config.seed}: stage {stage} -> {stage_dir} (a process of its own)")
    with open(os.path.join(stage_dir, STAGE_CONFIG_FILE), "wb") as f:
        pickle.dump(stage_config(config, stage, seed_dir), f)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    if cancelled():
        return None
    with warnings.catch_warnings():
        # JAX warns on every fork; the child here only sets PDEATHSIG and execs a new Python.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        proc = subprocess.Popen(
            stage_command(stage_dir), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=_stop_with_parent(),
        )
    scheduler_point("spawned", stage)
    printer = threading.Thread(target=_print_prefixed, args=(proc.stdout, stage), daemon=True)
    printer.start()
    return proc, printer


def stage_command(stage_dir: str) -> list[str]:
    return [sys.executable, "-m", "mgd_jax.tools.demo_stage", f"--stage_dir={stage_dir}"]


def _print_prefixed(stream: Any, stage: str) -> None:
    for line in stream:
        print(f"[{stage}] {line}", end="", flush=True)


def _stop_with_parent() -> Any:
    """What the stage process runs before it starts (Linux; else None): SIGTERM when the demo
    process dies, so a killed demo leaves no stage training on (it stops with a checkpoint).
    Looked up here, in the demo's process: between fork and exec only the call itself runs."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return functools.partial(ctypes.CDLL(None).prctl, 1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def save_panels(config: ml_collections.ConfigDict, seed_dir: str) -> None:
    """`<seed_dir>/panels.png`: every stage's predictions on the same val images."""
    from mgd_jax import network_dir
    from mgd_jax.evaluation import panels

    stages = [s for s in config.stages.split(",") if s in PANEL_TITLES]
    networks = {PANEL_TITLES[stage]: network_dir.load_network(
        os.path.join(seed_dir, stage, "export"), precision=config.precision)
        for stage in sorted(stages, key=list(PANEL_TITLES).index)}
    path = os.path.join(seed_dir, PANEL_FILE)
    panels.save_png(path, panels.networks_panel(
        stage_config(config, stages[-1]), networks, config.eval.panels))
    logs.say(f"prediction panels of every stage: {path}")


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    try:
        seeds = [int(s) for s in str(config.demo.seeds).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"config.demo.seeds: {config.demo.seeds!r}: expected e.g. 0 or 0,1,2")
    return seeds


PANEL_TITLES = {"student_supervised": "student Sup.l", "student_mgd": "student MGD",
                "teacher_deep": "teacher T_D", "teacher_wide": "teacher T_W"}
PANEL_FILE = "panels.png"


STOPPED_FILE = "stopped.json"
RESULTS_FILE = "results.json"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Prepares the synthetic data, runs every stage for each seed, prints and writes the tables
    (`<workdir>/results.json`) and the panels; everything is logged to `<workdir>/log.txt`. One
    seed runs in `<workdir>/<stage>`, several in `<workdir>/seed<k>/<stage>`; the data is shared.

    Stopped by a signal, it returns (and writes to `<workdir>/stopped.json`, with no
    results.json) `{"status": "stopped", "signal", "seed", "stages": {stage: state}}`; the same
    call continues."""
    import jax

    check_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # The demo holds its workdir (one demo per workdir), each stage its own sub-workdir.
    with workdir_lock.hold(workdir, primary=jax.process_index() == 0), \
            logs.log_file(workdir, enabled=jax.process_index() == 0):
        return _run(config, workdir, jax.process_index() == 0)


def _run(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> dict[str, Any]:
    from mgd_jax.data import prepare

    t0 = time.time()
    config = copy.deepcopy(config)
    if not config.data_dir:  # self-contained by default: the data lives in the workdir
        config.data_dir = os.path.join(workdir, "data")
    sizes = config.demo.synthetic.to_dict()
    if sizes.get("num_classes", config.num_classes) != config.num_classes:
        raise ConfigError("config.demo.synthetic.num_classes must equal config.num_classes")
    sizes["num_classes"] = config.num_classes
    logs.say(
        "MGD demo on the synthetic dataset. The networks are depth- and width-reduced members "
        "of the official families (full-size teachers do not train in minutes on a CPU).",
        primary=primary,
    )
    config.dataset = prepare.ensure_synthetic(config.data_dir, **sizes)
    if any(s.startswith("pretrain") for s in config.stages.split(",")):
        prepare.ensure_synthetic(config.data_dir, **source_sizes(config))
    seeds = seeds_of(config)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        config.seed = seed
        seed_dir = workdir if len(seeds) == 1 else os.path.join(workdir, f"seed{seed}")
        result = run_seed(config, seed_dir)
        if isinstance(result, Stopped):  # SIGTERM / SIGINT: rerunning continues the stopped stages
            return _say_stopped(result, seed, workdir, primary)
        per_seed[seed] = result
        if len(seeds) == 1:
            logs.say("\n" + format_results(per_seed[seed]["networks"],
                                            per_seed[seed]["pretraining_source_miou"]),
                     primary=primary)
        if primary and config.eval.panels > 0:
            save_panels(config, seed_dir)
    logs.say("\n" + format_seeds(per_seed), primary=primary)
    gains = [r["gain"] for r in per_seed.values()]
    results = {
        "seeds": {str(seed): r for seed, r in per_seed.items()},
        "gain_mean": float(np.mean(gains)),
        "gain_std": float(np.std(gains, ddof=1)) if len(gains) > 1 else 0.0,
        "gain_min": float(np.min(gains)),
    }
    if any("ablation" in r for r in per_seed.values()):
        results["ablation"] = ablation_table(per_seed)
        for r in per_seed.values():  # the table holds each seed's rows
            del r["ablation"]
        logs.say("\n" + format_ablation(results["ablation"]), primary=primary)
    logs.say(f"(total {time.time() - t0:.0f} s; mIoU of the final checkpoints on "
             f"{sizes['num_val']} val images; SE: bootstrap over those images)", primary=primary)
    if primary:
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
        with contextlib.suppress(FileNotFoundError):  # of an earlier, stopped, run
            os.remove(os.path.join(workdir, STOPPED_FILE))
    return results


def _say_stopped(stopped: Stopped, seed: int, workdir: str, primary: bool) -> dict[str, Any]:
    """The stopped demo's last console line and `<workdir>/stopped.json` (results.json only
    stands for a finished demo, so an earlier one is removed)."""
    record = {"status": "stopped", "stopped": True, "signal": stopped.signal, "seed": seed,
              "stages": stopped.stages}
    path = os.path.join(workdir, STOPPED_FILE)
    if primary:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(workdir, RESULTS_FILE))
    by_state = {state: [s for s, v in stopped.stages.items() if v == state]
                for state in ("stopped", "finished", "not started")}
    parts = [f"{state}: {', '.join(names)}" for state, names in by_state.items() if names]
    logs.say(f"demo stopped by {stopped.signal or 'a signal'} at seed {seed} "
             f"({'; '.join(parts)}); the stopped stages wrote their checkpoints; rerun the same "
             f"command to continue ({path})", primary=primary)
    return record
