"""The embedded default: the whole method on the synthetic dataset, no input files.

Stages, each an ordinary `train_and_evaluate` run in its own sub-workdir (rerun or inspect any):
  teacher_deep        CPS on two depth/width-reduced ResNet-101s  -> export/ = T_D checkpoint
  teacher_wide        CPS on two reduced Wide-ResNet-50-2s        -> export/ = T_W checkpoint
  student_supervised  Sup.l: the student on the labeled subset only
  student_mgd         the same student, steps, labeled subset and seed, distilled with MGD
then one table (mIoU, parameters) printed and written to `<workdir>/results.json`, and the panel
of every stage's predictions on the same val images written to `<workdir>/panels.png`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import ml_collections

from mgd_jax import logs

STAGES = ("teacher_deep", "teacher_wide", "student_supervised", "student_mgd")
RESULT_NAMES = {
    "teacher_deep": "teacher_resnet101",
    "teacher_wide": "teacher_wide_resnet50_2",
    "student_supervised": "student_supervised",
    "student_mgd": "student_mgd",
}


def _arch(backbone: str, width: float, depths: str) -> str:
    if width == 1.0 and not depths:
        return backbone
    parts = [f"width x{width:g}"] + ([f"blocks {depths}"] if depths else [])
    return f"{backbone} (reduced: {', '.join(parts)})"


def stage_config(
    demo: ml_collections.ConfigDict, stage: str, workdir: str | None = None
) -> ml_collections.ConfigDict:
    """The plain training config of one demo stage (no `stages` field).

    With `workdir`, the MGD stage points at the teachers exported by the earlier stages.
    """
    if stage not in STAGES:
        raise ValueError(f"demo stage {stage!r} is not one of {STAGES}")
    c = copy.deepcopy(demo)
    d = c.demo
    with c.unlocked():
        del c["stages"]
    if stage.startswith("teacher"):
        t = d[stage]
        c.method = "cps"
        c.cps.backbone = t.backbone
        c.model.width = t.width
        c.model.depths = t.depths
        c.num_train_steps = d.teacher_steps
        c.lr = d.teacher_lr
    else:
        c.method = "supervised" if stage == "student_supervised" else "mgd"
        c.student = d.student
        c.model.width = d.student_width
        c.model.depths = d.student_depths
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
    d = config.demo
    if stage.startswith("teacher"):
        return _arch(d[stage].backbone, d[stage].width, d[stage].depths)
    return _arch(d.student, d.student_width, d.student_depths)


def format_results(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'network':<22} {'mIoU %':>7} {'params':>10}  architecture", "-" * 78]
    for name, r in results.items():
        lines.append(f"{name:<22} {100 * r['miou']:>7.2f} {r['params']:>10,}  {r['arch']}")
    return "\n".join(lines)


PANEL_TITLES = {"student_supervised": "student Sup.l", "student_mgd": "student MGD",
                "teacher_deep": "teacher T_D", "teacher_wide": "teacher T_W"}
PANEL_FILE = "panels.png"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
    """Prepares the synthetic data, runs every stage, prints and writes the table and the
    panel of all stages (`<workdir>/panels.png`); everything is logged to `<workdir>/log.txt`."""
    import jax

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with logs.log_file(workdir, enabled=jax.process_index() == 0):
        return _run(config, workdir, jax.process_index() == 0)


def _run(config: ml_collections.ConfigDict, workdir: str, primary: bool
         ) -> dict[str, dict[str, Any]]:
    from mgd_jax import export, panels, train
    from mgd_jax.data import prepare

    t0 = time.time()
    if not config.data_dir:  # self-contained by default: the data lives in the workdir
        config.data_dir = os.path.join(workdir, "data")
    sizes = config.demo.synthetic.to_dict()
    if sizes.get("num_classes", config.num_classes) != config.num_classes:
        raise ValueError("config.demo.synthetic.num_classes must equal config.num_classes")
    sizes["num_classes"] = config.num_classes
    config.dataset = prepare.ensure_synthetic(config.data_dir, **sizes)
    logs.say(
        "MGD demo on the synthetic dataset. The networks are depth- and width-reduced members "
        "of the official families (full-size teachers do not train in minutes on a CPU).",
        primary=primary,
    )
    stages = [s for s in config.stages.split(",") if s]
    results: dict[str, dict[str, Any]] = {}
    for stage in stages:
        stage_dir = os.path.join(workdir, stage)
        logs.say(f"== stage {stage} -> {stage_dir}", primary=primary)
        result = train.train_and_evaluate(stage_config(config, stage, workdir), stage_dir)
        if result.get("stopped"):  # SIGTERM / SIGINT: rerunning continues this stage
            return results
        results[RESULT_NAMES[stage]] = {
            "miou": float(result["miou"]),
            "params": int(result["params"]),
            "arch": _arch_of(config, stage),
        }
    table = format_results(results)
    if primary:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if primary and config.eval.panels > 0:
        networks = {PANEL_TITLES[stage]: export.load_network(
            os.path.join(workdir, stage, "export"), precision=config.precision)
            for stage in sorted(stages, key=list(PANEL_TITLES).index)}
        path = os.path.join(workdir, PANEL_FILE)
        panels.save_png(path, panels.networks_panel(
            stage_config(config, stages[-1]), networks, config.eval.panels))
        logs.say(f"prediction panels of every stage: {path}")
    logs.say(f"\n{table}\n(total {time.time() - t0:.0f} s; mIoU of the final checkpoints)",
             primary=primary)
    return results
