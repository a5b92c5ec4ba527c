"""The embedded default: the whole method on the synthetic dataset, no input files.

Stages, each an ordinary `train_and_evaluate` run in its own sub-workdir (rerun or inspect any):
  teacher_deep        CPS on two depth/width-reduced ResNet-101s  -> export/ = T_D checkpoint
  teacher_wide        CPS on two reduced Wide-ResNet-50-2s        -> export/ = T_W checkpoint
  student_supervised  Sup.l: the student on the labeled subset only
  student_mgd         the same student, steps, labeled subset and seed, distilled with MGD
then one table (mIoU, parameters) printed and written to `<workdir>/results.json`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import ml_collections

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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
    """Prepares the synthetic data, runs every stage, prints and writes the table."""
    from mgd_jax import train
    from mgd_jax.data import prepare

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if not config.data_dir:  # self-contained by default: the data lives in the workdir
        config.data_dir = os.path.join(workdir, "data")
    sizes = config.demo.synthetic.to_dict()
    if sizes.get("num_classes", config.num_classes) != config.num_classes:
        raise ValueError("config.demo.synthetic.num_classes must equal config.num_classes")
    sizes["num_classes"] = config.num_classes
    config.dataset = prepare.ensure_synthetic(config.data_dir, **sizes)
    print(
        "MGD demo on the synthetic dataset. The networks are depth- and width-reduced members "
        "of the official families (full-size teachers do not train in minutes on a CPU).",
        flush=True,
    )
    stages = [s for s in config.stages.split(",") if s]
    results: dict[str, dict[str, Any]] = {}
    for stage in stages:
        stage_dir = os.path.join(workdir, stage)
        print(f"== stage {stage} -> {stage_dir}", flush=True)
        result = train.train_and_evaluate(stage_config(config, stage, workdir), stage_dir)
        results[RESULT_NAMES[stage]] = {
            "miou": float(result["miou"]),
            "params": int(result["params"]),
            "arch": _arch_of(config, stage),
        }
    table = format_results(results)
    print(f"\n{table}\n(total {time.time() - t0:.0f} s; mIoU of the final checkpoints)", flush=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    logging.info("demo results: %s", results)
    return results
