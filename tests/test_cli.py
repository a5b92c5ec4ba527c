"""The command-line tools as installed: every `[project.scripts]` console script is a
zero-argument function that `--help` runs (exit 0), `python -m` still starts the training
command, the demo's stage process and a tool, and a missing or unknown subcommand is one
`error:` line with exit status 2."""

import importlib.metadata
import inspect
import os
import subprocess
import sys
import tomllib

import pytest

from mgd_jax.tools import bench, cli, grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]
# Run as `python -m` too: the training command the docs give, the demo's stage process (no console
# script), and a tool whose spawned grain workers re-import the main module.
AS_MODULES = ("mgd_jax.main", "mgd_jax.tools.demo_stage", "mgd_jax.tools.bench")


def test_console_scripts_are_zero_argument_functions():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    installed = {ep.name: ep.value for ep in scripts
                 if ep.dist is not None and ep.dist.name in ("mgd_jax", "mgd-jax")}
    assert installed == SCRIPTS, "the installed scripts are stale: pip install --no-deps -e ."
    for name, target in SCRIPTS.items():
        module, _, attr = target.partition(":")
        function = getattr(__import__(module, fromlist=[attr]), attr)
        assert callable(function) and not inspect.signature(function).parameters, name


def test_every_tool_answers_help():
    """Each installed script, and `AS_MODULES` through `python -m`, at once (each start mostly
    imports jax)."""
    bin_dir = os.path.dirname(sys.executable)
    commands = [[os.path.join(bin_dir, name), "--help"] for name in SCRIPTS]
    commands += [[sys.executable, "-m", module, "--help"] for module in AS_MODULES]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for command in commands]
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (command, err[-2000:])
        assert "\nflags:\n  --" in out, (command, out[:500])


@pytest.mark.parametrize("tool, args, message", [
    (bench, [], "expected a command: step | data | models | compile | table"),
    (bench, ["--steps=1", "stepp"],
     "unknown command 'stepp': expected step | data | models | compile | table"),
    (grid, ["--root=r"], "expected a command: plan | collect"),
    (grid, ["plan", "collect", "--root=r"], "unexpected arguments: collect"),
])
def test_subcommand_errors_are_one_line(tool, args, message, capsys):
    assert tool.main(["tool", *args]) == cli.USER_ERROR
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def test_help_prints_the_usage_lines_and_flags(capsys):
    assert grid.main(["mgd-grid", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(grid.__doc__.strip().splitlines()[0]) and "mgd-grid plan" in out
    assert "  --root:" in out and "--mode" not in out
