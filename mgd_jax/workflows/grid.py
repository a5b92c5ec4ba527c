"""The paper's tables: plan the grid of training runs, and collect the finished ones into tables.

`plan` lists the runs for a machine or a launcher: per dataset and partition the two CPS teachers
(T_D ResNet-101, T_W Wide-ResNet-50-2), then per partition x student x seed the MGD and Sup.l
students, each MGD run wired to its partition's two teacher exports. Every run is one
`python -m mgd_jax.main` command with its own workdir; `depends_on` names the runs that must
finish first. `collect` reads finished workdirs (`config.json`, `network.json`,
`final_metrics.json`; any run of this package, planned here or not) and `format_tables` prints
mean ± sample standard deviation over seeds, one markdown table per dataset.
The command line is `mgd-grid plan|collect` (docs/reproducing.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mgd_jax.runtime.errors import ConfigError

DATASETS = ("voc", "cityscapes")  # configs/<name>.py
PARTITIONS = (16, 8, 4, 2)
STUDENTS = ("resnet18", "mobilenet_v2")
STUDENT_METHODS = ("mgd", "supervised")
TEACHERS = {"teacher_deep": "resnet101", "teacher_wide": "wide_resnet50_2"}  # MGD's T_D, T_W
METHOD_TITLES = {"cps": "CPS (teacher)", "supervised": "Sup.l", "mgd": "MGD"}
RESULT_FILE = "final_metrics.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    name: str
    stage: str  # "teacher" | "student"
    dataset: str
    partition: int
    method: str
    network: str
    seed: int
    workdir: str
    config: str  # the --config argument
    overrides: dict[str, str]  # config field -> value (--config.<field>=<value>)
    depends_on: tuple[str, ...] = ()

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "mgd_jax.main", f"--config={self.config}",
                f"--workdir={self.workdir}",
                *(f"--config.{k}={v}" for k, v in self.overrides.items())]

    def to_json(self, python: str = "python") -> dict[str, Any]:
        command = self.command(python)
        return dict(dataclasses.asdict(self), depends_on=list(self.depends_on),
                    command=command, shell=shlex.join(command))


def _teacher_name(dataset: str, partition: int, backbone: str) -> str:
    return f"{dataset}{partition}_cps_{backbone}"


def plan(root: str, *, datasets: Sequence[str] = ("voc",),
         partitions: Sequence[int] = PARTITIONS, students: Sequence[str] = STUDENTS,
         methods: Sequence[str] = STUDENT_METHODS, seeds: Sequence[int] = (0, 1, 2),
         teacher_seed: int = 0, init: Mapping[str, str] | None = None,
         overrides: Mapping[str, str] | None = None, config_dir: str = "configs",
         stages: Sequence[str] = ("teacher", "student")) -> list[Run]:
    """The runs of the grid, teachers first (see the module doc).

    init: backbone -> ImageNet backbone directory (`cps.init` of the teachers, `student_init` of
      the students; `mgd-import --backbone_only`). overrides: config field -> value for every
      run (e.g. data_dir, split_dir). stages: plan the teachers, the students or both (students
      still point at the teachers' planned workdirs).
    """
    for name, values, allowed in (("dataset", datasets, DATASETS),
                                  ("partition", partitions, PARTITIONS),
                                  ("student", students, STUDENTS),
                                  ("method", methods, STUDENT_METHODS),
                                  ("stage", stages, ("teacher", "student"))):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise ConfigError(f"grid: {name} {unknown or 'list is empty'}; expected values of "
                              f"{allowed}")
    init, common = dict(init or {}), dict(overrides or {})
    teacher_runs: list[Run] = []
    runs: list[Run] = []
    for dataset in datasets:
        config_file = os.path.join(config_dir, f"{dataset}.py")
        for p in partitions:
            teachers = {field: _teacher_name(dataset, p, backbone)
                        for field, backbone in TEACHERS.items()}
            if "teacher" in stages:
                for backbone in TEACHERS.values():
                    extra = {"cps.init": init[backbone]} if backbone in init else {}
                    teacher_runs.append(Run(
                        _teacher_name(dataset, p, backbone), "teacher", dataset, p, "cps",
                        backbone, teacher_seed, os.path.join(root, _teacher_name(
                            dataset, p, backbone)),
                        f"{config_file}:method=cps,teacher={backbone},partition={p}",
                        {"seed": str(teacher_seed), **extra, **common}))
            if "student" not in stages:
                continue
            for student in students:
                for method in methods:
                    for seed in seeds:
                        name = f"{dataset}{p}_{method}_{student}_s{seed}"
                        extra = {"student_init": init[student]} if student in init else {}
                        depends: tuple[str, ...] = ()
                        if method == "mgd":
                            depends = tuple(teachers.values())
                            extra.update({f"{field}.checkpoint": os.path.join(
                                root, teacher, "export") for field, teacher in teachers.items()})
                        runs.append(Run(
                            name, "student", dataset, p, method, student, seed,
                            os.path.join(root, name),
                            f"{config_file}:method={method},student={student},partition={p}",
                            {"seed": str(seed), **extra, **common}, depends))
    return teacher_runs + runs


def format_plan(runs: Sequence[Run], python: str = "python") -> str:
    """Shell lines, teachers first, with comments saying what may run in parallel."""
    teachers = [r for r in runs if r.stage == "teacher"]
    students = [r for r in runs if r.stage == "student"]
    lines = [f"# mgd_jax grid: {len(teachers)} teacher runs, then {len(students)} student runs."]
    if teachers:
        lines += ["# 1. Teachers (CPS; independent of each other)."]
        lines += [shlex.join(r.command(python)) for r in teachers]
    if students:
        lines += ["# 2. Students (independent of each other; MGD runs need their partition's two "
                  "teacher exports)."]
        lines += [shlex.join(r.command(python)) for r in students]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Collecting finished runs


@dataclasses.dataclass(frozen=True)
class Record:
    """What one workdir says about its run (`miou` None while unfinished)."""

    workdir: str
    dataset: str
    partition: str  # "1/8", "1/8 (seeded)" or "32 labeled (seeded)"
    method: str
    network: str
    seed: int
    miou: float | None
    best_miou: float | None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e


def _partition_label(config: Mapping[str, Any]) -> str:
    count = int(config.get("labeled_count", 0) or 0)
    label = f"{count} labeled" if count > 0 else f"1/{int(config['partition'])}"
    return label + (" (seeded)" if config.get("partition_source") == "seeded" else "")


def read_run(workdir: str) -> Record:
    """The record of one training workdir (it must hold `config.json` and `network.json`)."""
    config = _read_json(os.path.join(workdir, "config.json"))
    network = _read_json(os.path.join(workdir, "network.json"))
    result_file = os.path.join(workdir, RESULT_FILE)
    result = _read_json(result_file) if os.path.isfile(result_file) else {}
    best = result.get("best") or {}
    return Record(workdir, str(config["dataset"]), _partition_label(config),
                  str(config["method"]), str(network["backbone"]), int(config.get("seed", 0)),
                  result.get("miou"), best.get("miou", result.get("miou")))


def find_runs(roots: Iterable[str]) -> list[str]:
    """Training workdirs (folders holding config.json and network.json) under `roots`."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            raise ConfigError(f"{root}: no such directory")
        for folder, _, files in os.walk(root):
            if "config.json" in files and "network.json" in files:
                found.add(os.path.abspath(folder))
    return sorted(found)


def collect(roots: Iterable[str]) -> list[Record]:
    return [read_run(w) for w in find_runs(roots)]


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value) if value in known else len(known), value)


def _partition_order(label: str) -> tuple[int, float, str]:
    number = label.split()[0]
    if number.startswith("1/"):
        return (0, -int(number[2:]), label)  # 1/16 before 1/8 ...
    return (1, float(number), label)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value)."""
    if len(values) == 1:
        return float(values[0]), math.nan
    return statistics.fmean(values), statistics.stdev(values)


def format_cell(values: Sequence[float]) -> str:
    """'mean ± std (n)' in percent; '—' when there is no finished run."""
    if not values:
        return "—"
    mean, std = mean_std([100 * v for v in values])
    spread = "" if math.isnan(std) else f" ± {std:.2f}"
    return f"{mean:.2f}{spread} ({len(values)})"


def format_tables(records: Sequence[Record], *, metric: str = "miou") -> str:
    """One markdown table per dataset: rows method x network, columns partitions, cells the
    `metric` ("miou": final checkpoint; "best_miou": best on val) as mean ± std over seeds."""
    if metric not in ("miou", "best_miou"):
        raise ConfigError(f"metric {metric!r}: expected miou or best_miou")
    what = "final checkpoint" if metric == "miou" else "best checkpoint on val"
    out = []
    for dataset in sorted({r.dataset for r in records}):
        mine = [r for r in records if r.dataset == dataset]
        columns = sorted({r.partition for r in mine}, key=_partition_order)
        rows = sorted({(r.method, r.network) for r in mine},
                      key=lambda mn: (_order(mn[0], list(METHOD_TITLES)), mn[1]))
        out += [f"**{dataset}**: val mIoU % ({what}), mean ± std over seeds (runs)", "",
                "| method | network | " + " | ".join(columns) + " |",
                "|---|---|" + "---|" * len(columns)]
        for method, network in rows:
            cells = []
            for column in columns:
                values = [getattr(r, metric) for r in mine if (r.method, r.network, r.partition)
                          == (method, network, column) and getattr(r, metric) is not None]
                cells.append(format_cell(values))
            out.append(f"| {METHOD_TITLES.get(method, method)} | {network} | "
                       + " | ".join(cells) + " |")
        unfinished = [r for r in mine if r.miou is None]
        if unfinished:
            out += ["", f"{len(unfinished)} run(s) not finished: "
                    + ", ".join(os.path.basename(r.workdir) for r in unfinished)]
        out.append("")
    return "\n".join(out).rstrip() + "\n" if out else "no training workdirs found\n"
