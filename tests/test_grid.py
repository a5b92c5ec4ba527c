"""The paper's grid: the planned runs (teachers wired into the MGD students, every command parses
with the training tool's own flags into a valid config) and the collected tables (mean ± sample
std over seeds against NumPy)."""

import json
import os
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mgd_jax import config_lib, main
from mgd_jax.runtime.errors import ConfigError
from mgd_jax.tools import grid as grid_main
from mgd_jax.workflows import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# config_flags loads config files with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def test_plan_wires_the_teachers_and_every_command_parses(tmp_path, monkeypatch):
    root, splits, ck = tmp_path / "runs", tmp_path / "splits", tmp_path / "r18"
    splits.mkdir()
    ck.mkdir()
    runs = grid.plan(str(root), partitions=(16, 8), seeds=(0, 1), init={"resnet18": str(ck)},
                     overrides={"split_dir": str(splits)},
                     config_dir=os.path.join(ROOT, "configs"))
    teachers = [r for r in runs if r.stage == "teacher"]
    students = [r for r in runs if r.stage == "student"]
    assert len(teachers) == 2 * 2 and len(students) == 2 * 2 * 2 * 2  # partitions x ... x seeds
    assert runs[:len(teachers)] == teachers and len({r.name for r in runs}) == len(runs)
    assert len({r.workdir for r in runs}) == len(runs)
    by_name = {r.name: r for r in runs}
    for run in students:
        if run.method != "mgd":
            assert not run.depends_on and "teacher_deep.checkpoint" not in run.overrides
            continue
        deep, wide = (by_name[name] for name in run.depends_on)
        assert (deep.network, wide.network) == ("resnet101", "wide_resnet50_2")
        assert deep.partition == wide.partition == run.partition
        assert run.overrides["teacher_deep.checkpoint"] == os.path.join(deep.workdir, "export")
        assert run.overrides["teacher_wide.checkpoint"] == os.path.join(wide.workdir, "export")
        for teacher in (deep, wide):
            os.makedirs(os.path.join(teacher.workdir, "export"), exist_ok=True)  # for validate

    for run in runs:
        command = run.command()
        assert command[:3] == ["python", "-m", "mgd_jax.main"]
        argv = ["main", *command[3:]]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the overrides' names there
        # main's two flags, defined afresh: config_flags defines each override flag once.
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                        lock_config=True)
        flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
        assert set(main.FLAGS) >= set(flag_values)
        flag_values(argv)
        config = flag_values["config"].value
        assert (config.method, config.partition, config.seed) == (run.method, run.partition,
                                                                  run.seed)
        network = config.cps.backbone if run.method == "cps" else config.student
        assert network == run.network and config.split_dir == str(splits)
        assert config.student_init == (str(ck) if run.network == "resnet18" else "")
        assert flag_values["workdir"].value == run.workdir
        if run.network == "resnet18":
            config_lib.validate(config)
        else:  # planned without an ImageNet backbone: the run would be refused, naming the field
            field = "cps.init" if run.method == "cps" else "student_init"
            with pytest.raises(ConfigError, match=f"config.{field}: is empty"):
                config_lib.validate(config)

    with pytest.raises(ConfigError, match="partition \\[3\\]"):
        grid.plan("r", partitions=(3,))


def test_plan_tool_prints_shell_lines_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert grid_main.main(["mgd-grid", "plan", f"--root={tmp_path}", "--partitions=8",
                           "--seeds=0", "--students=resnet18", f"--json={out}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python")]
    planned = json.loads(out.read_text())
    assert [p["shell"] for p in planned] == lines and len(lines) == 2 + 2
    assert planned[-1]["depends_on"] == [] and planned[-2]["depends_on"] == [
        "voc8_cps_resnet101", "voc8_cps_wide_resnet50_2"]
    assert grid_main.main(["mgd-grid", f"--root={tmp_path}", "--seeds=x", "plan"]) == 2


def _write_run(directory, method, network, partition, seed, miou=None, best=None):
    directory.mkdir(parents=True)
    config = {"dataset": "mgd_voc_aug", "method": method, "partition": partition, "seed": seed,
              "labeled_count": 0, "partition_source": "lists"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "network.json").write_text(json.dumps({"backbone": network}))
    if miou is not None:
        result = {"miou": miou, "best": {"miou": best if best is not None else miou}}
        (directory / grid.RESULT_FILE).write_text(json.dumps(result))


def test_collected_table_is_mean_and_sample_std_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(0)
    mgd = rng.uniform(0.6, 0.8, 3)
    sup = rng.uniform(0.5, 0.6, 2)
    for seed, value in enumerate(mgd):
        _write_run(tmp_path / f"voc8_mgd_s{seed}", "mgd", "resnet18", 8, seed, value,
                   best=value + 0.01)
    for seed, value in enumerate(sup):
        _write_run(tmp_path / "nested" / f"voc8_sup_s{seed}", "supervised", "resnet18", 8, seed,
                   value)
    _write_run(tmp_path / "voc16_cps", "cps", "resnet101", 16, 0, 0.7)
    _write_run(tmp_path / "voc16_mgd_s0", "mgd", "resnet18", 16, 0)  # still training

    table = grid.format_tables(grid.collect([str(tmp_path)]))
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip():
            [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines() if line.startswith("| ") and "method" not in line}
    assert "| method | network | 1/16 | 1/8 |" in table
    expected = f"{100 * mgd.mean():.2f} ± {100 * mgd.std(ddof=1):.2f} (3)"
    assert rows["MGD/resnet18"] == ["—", expected]
    assert rows["Sup.l/resnet18"][1] == f"{100 * sup.mean():.2f} ± {100 * sup.std(ddof=1):.2f} (2)"
    assert rows["CPS (teacher)/resnet101"] == ["70.00 (1)", "—"]
    assert list(rows) == ["CPS (teacher)/resnet101", "Sup.l/resnet18", "MGD/resnet18"]
    assert "1 run(s) not finished: voc16_mgd_s0" in table

    best = grid.format_tables(grid.collect([str(tmp_path)]), metric="best_miou")
    assert f"{100 * (mgd.mean() + 0.01):.2f} ± {100 * mgd.std(ddof=1):.2f} (3)" in best
    records = tmp_path / "records.json"
    assert grid_main.main(["mgd-grid", "collect", f"--root={tmp_path}",
                           f"--json={records}"]) == 0
    assert capsys.readouterr().out == table
    assert len(json.loads(records.read_text())) == 7
