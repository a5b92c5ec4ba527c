"""The newest stack: a fresh Python 3.12 venv gets mgd_jax with the newest releases pip resolves
(no constraints.txt; the `test` and `torch` extras, the references of the parity tests) and runs
the core subset there (`-m core`, chosen in tests/conftest.py: CORE).

CI tests the pinned Python 3.11 set in full (constraints.txt); this checks that the version ranges
of pyproject.toml still hold at their top, which is what a GPU image, Colab or a fresh
`pip install` gets. It installs from the package registry by design: an install step like CI's
own, not something the package does when it runs.

Under CI=true a missing Python 3.12, a failed install or a jax older than 0.12 fails; elsewhere
the test is skipped ("newest stack not checked: ...") unless MGD_CHECK_NEWEST=1. A fresh venv
every run: a reused one would keep the releases of its first install (pip's own download cache
still saves the downloads). About 5-6 minutes on 2 cores, most of it torch's CUDA wheels and the
core tests' compiles.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import time
import warnings

import pytest

from conftest import CORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_JAX = (0, 12)
REPORTED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "clu", "numpy", "torch", "torchvision", "timm")


class NewestStackReport(UserWarning):
    """What was installed and how the core subset went: a warning so that it reaches the run's
    summary from an xdist worker too (their stdout is not shown)."""


def checking() -> bool:
    return (os.environ.get("CI", "").lower() in ("true", "1")
            or os.environ.get("MGD_CHECK_NEWEST") == "1")


def not_checked(reason: str) -> None:
    """Fails under CI=true or MGD_CHECK_NEWEST=1, skips otherwise."""
    if checking():
        pytest.fail(f"newest stack: {reason}", pytrace=False)
    pytest.skip(f"newest stack not checked: {reason} (MGD_CHECK_NEWEST=1 checks it)")


def python312() -> str | None:
    """The path of a Python 3.12 interpreter: `python3.12` on PATH as it is, else through pyenv
    with the newest 3.12 it has (its shim needs PYENV_VERSION when 3.12 is not selected)."""
    exe = shutil.which("python3.12")
    if exe is None:
        return None
    probe = [exe, "-c", "import sys; print(sys.executable)"]
    tries = [dict(os.environ)]
    if shutil.which("pyenv"):
        listed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True)
        ours = sorted((v for v in listed.stdout.split() if re.fullmatch(r"3\.12\.\d+", v)),
                      key=lambda v: int(v.split(".")[2]))
        tries += [dict(os.environ, PYENV_VERSION=v) for v in reversed(ours)]
    for env in tries:
        found = subprocess.run(probe, capture_output=True, text=True, env=env)
        if found.returncode == 0:
            return found.stdout.strip()
    return None


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          **kwargs)


@pytest.mark.xdist_group("processes")  # see tests/conftest.py
def test_core_subset_on_the_newest_releases(tmp_path):
    if not checking():
        not_checked("not a CI run (it installs torch's CUDA wheels, about 7 GB, from the registry)")
    start = time.monotonic()
    python = python312()
    if python is None:
        not_checked("no Python 3.12 (python3.12 on PATH, or pyenv's)")
    venv = tmp_path / "venv"
    try:
        check_in(python, venv, start)
    finally:  # (about 7 GB with torch's CUDA libraries: not left in pytest's kept temp folders)
        shutil.rmtree(venv, ignore_errors=True)


def check_in(python: str, venv: pathlib.Path, start: float) -> None:
    """Installs into a new venv at `venv` with `python`, reports the versions, runs the subset."""
    made = run([python, "-m", "venv", str(venv)], 120)
    assert made.returncode == 0, made.stderr[-3000:]
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    # -e: the tests import this checkout's mgd_jax; no other requirement is pinned.
    installed = run([*pip, "install", "-q", "--disable-pip-version-check", "-e",
                     f"{ROOT}[test,torch]"], 900)
    if installed.returncode != 0:
        not_checked(f"pip install failed:\n{installed.stdout[-2000:]}{installed.stderr[-3000:]}")
    installed_s = time.monotonic() - start
    listed = run([*pip, "list", "--format=json", "--disable-pip-version-check"], 120)
    versions = {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"]
                for p in json.loads(listed.stdout)}
    report = ", ".join(f"{name} {versions.get(name, '-')}" for name in REPORTED)
    print(f"newest stack: {report}")
    jax_version = tuple(int(part) for part in versions["jax"].split(".")[:2])
    if jax_version < MIN_JAX:
        not_checked(f"pip resolved jax {versions['jax']}, older than "
                    f"{'.'.join(map(str, MIN_JAX))}: {report}")

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The subset's own compilation cache (programs of another jax must not mix in) and its own
    # 8 CPU devices (tests/conftest.py sets them unless given).
    for name in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS", "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    files = [os.path.join("tests", name) for name in CORE]
    # One process: this test shares the machine with the other xdist worker.
    tested = run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-m", "core",
                  "-o", "addopts=", "-p", "no:cacheprovider", "--durations=10", *files], 900,
                 env=env)
    lines = tested.stdout.strip().splitlines()
    result = lines[-1] if lines else tested.stderr[-500:]
    summary = (f"{report}; core subset: {result}; install {installed_s:.0f} s, "
               f"total {time.monotonic() - start:.0f} s")
    print("\n".join(lines[-14:]))  # the slowest tests (the subset's size is kept to minutes)
    print(f"newest stack: {summary}")
    warnings.warn(NewestStackReport(summary), stacklevel=1)
    assert tested.returncode == 0, tested.stdout[-8000:] + tested.stderr[-3000:]
    assert " passed" in result and "skipped" not in result, result

