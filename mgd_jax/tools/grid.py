r"""The paper's tables: plan the grid of runs, or collect finished runs into tables (`grid`).

    # the runs: CPS teachers per partition, then MGD and Sup.l students per partition and seed
    mgd-grid plan --root=runs --datasets=voc --seeds=0,1,2 \
        --set=data_dir=$DATA --set=split_dir=$SPLITS \
        --init=resnet18=$CK/r18 --init=resnet101=$CK/r101 [--json=plan.json]
    # the tables, from whatever has finished under --root
    mgd-grid collect --root=runs [--metric=best_miou] [--json=FILE]

`plan` prints shell lines (teachers first) and, with --json, writes the runs as a JSON list
(name, stage, workdir, command, depends_on, ...) for a launcher.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax.runtime.errors import UserError
from mgd_jax.tools import cli
from mgd_jax.workflows import grid

FLAGS = flags.FlagValues()
_ROOT = flags.DEFINE_multi_string("root", None, "plan: the folder of the run workdirs; collect: "
                                  "folders searched for workdirs (repeatable).", flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the plan / the collected records here.",
                            flag_values=FLAGS)
_DATASETS = flags.DEFINE_list("datasets", ["voc"], f"Of {grid.DATASETS}.", flag_values=FLAGS)
_PARTITIONS = flags.DEFINE_list("partitions", [str(p) for p in grid.PARTITIONS],
                                "1/N labeled partitions.", flag_values=FLAGS)
_STUDENTS = flags.DEFINE_list("students", list(grid.STUDENTS), "Student networks.",
                              flag_values=FLAGS)
_METHODS = flags.DEFINE_list("methods", list(grid.STUDENT_METHODS), "Student methods.",
                             flag_values=FLAGS)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Student seeds.", flag_values=FLAGS)
_TEACHER_SEED = flags.DEFINE_integer("teacher_seed", 0, "Seed of the teacher runs.",
                                     flag_values=FLAGS)
_STAGES = flags.DEFINE_list("stages", ["teacher", "student"], "Plan the teachers, the "
                            "students, or both.", flag_values=FLAGS)
_INIT = flags.DEFINE_multi_string("init", [], "backbone=DIR: ImageNet backbone directory "
                                  "(mgd-import --backbone_only), repeatable.", flag_values=FLAGS)
_SET = flags.DEFINE_multi_string("set", [], "field=value: a config override of every run "
                                 "(e.g. split_dir=DIR), repeatable.", flag_values=FLAGS)
_CONFIG_DIR = flags.DEFINE_string("config_dir", "configs", "Where voc.py / cityscapes.py are.",
                                  flag_values=FLAGS)
_PYTHON = flags.DEFINE_string("python", "python", "The interpreter in the commands.",
                              flag_values=FLAGS)
_METRIC = flags.DEFINE_enum("metric", "miou", ("miou", "best_miou"), "collect: the final "
                            "checkpoint's mIoU, or the best on val.", flag_values=FLAGS)
flags.mark_flag_as_required("root", flag_values=FLAGS)


def _pairs(name: str, values: Sequence[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise UserError(f"--{name}={value}: expected KEY=VALUE")
        out[key] = rest
    return out


def _ints(name: str, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{name}={','.join(values)}: expected integers") from None


def _plan() -> None:
    if len(_ROOT.value) != 1:
        raise UserError("plan takes one --root")
    runs = grid.plan(
        _ROOT.value[0], datasets=_DATASETS.value, partitions=_ints("partitions",
                                                                   _PARTITIONS.value),
        students=_STUDENTS.value, methods=_METHODS.value, seeds=_ints("seeds", _SEEDS.value),
        teacher_seed=_TEACHER_SEED.value, init=_pairs("init", _INIT.value),
        overrides=_pairs("set", _SET.value), config_dir=_CONFIG_DIR.value, stages=_STAGES.value,
    )
    print(grid.format_plan(runs, _PYTHON.value))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump([r.to_json(_PYTHON.value) for r in runs], f, indent=2)
        print(f"# {len(runs)} runs written to {_JSON.value}")


def _collect() -> None:
    records = grid.collect(_ROOT.value)
    print(grid.format_tables(records, metric=_METRIC.value), end="")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f, indent=2)


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, {"plan": _plan, "collect": _collect})


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
