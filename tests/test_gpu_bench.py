"""launch/gpu_bench.sh in both its modes: the plans --dry-run prints (the CUDA major matched
between jax and torch, the Python found, one process per row, nothing run), and each mode run end
to end on the CPU at a tiny size. (b) --offline with the data, checkpoint and OpenCV stacks made
unimportable by a guard the run carries in as a wheel (--wheels); (a) the install into a fresh
venv from constraints.txt with the CPU builds substituted (--cpu: plain jax; --torch-index none:
pip's configured sources, which hold the CPU torch on the project's machines) and the same guard.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gpu_bench.sh")
CONFIGS = ("mgd_resnet18", "mgd_mobilenet_v2", "cps_resnet101")
# What the bench path must not need (a GPU image lacks them, or they drag TensorFlow / OpenCV in)
BLOCKED = ("grain", "tensorflow_datasets", "tensorflow", "cv2", "clu", "orbax")
GUARD = '''
# The test's import guard, as sitecustomize: every Python process the script starts loads it.
import atexit, json, os, sys

BLOCKED = __BLOCKED__


class Hidden:
    """A finder that finds nothing of BLOCKED: as if not installed (find_spec gives None, which
    torch._dynamo, for one, asks of tensorflow; an import raises ModuleNotFoundError)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]


def record():  # what this process imported, for the test to read
    folder = os.environ.get("MGD_IMPORT_LOG")
    if folder:
        loaded = sorted({m.split(".")[0] for m in sys.modules})
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "loaded": loaded}, f)


atexit.register(record)
'''.replace("__BLOCKED__", repr(set(BLOCKED)))


def tiny_flags(student_depths):
    """Every network at width 1/8, 32 px, 5 classes; the student's depths as given (ResNets
    take 4 stage depths, MobileNetV2 7), the teachers' one block per stage."""
    flags = ["--config.num_classes=5", "--config.crop_size=32"]
    for net, depths in (("model", student_depths), ("teacher_deep", "1,1,1,1"),
                        ("teacher_wide", "1,1,1,1")):
        flags += [f"--config.{net}.width=0.125", f"--config.{net}.depths={depths}"]
    return flags


def script(*args, env=None, timeout=60):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def plan(stdout):
    """The commands of a --dry-run, each as its argv (`+ export ...` as one list too)."""
    return [shlex.split(line[2:].split("  #")[0]) for line in stdout.splitlines()
            if line.startswith("+ ")]


def step_runs(commands):
    return [c for c in commands if "mgd_jax.tools.bench" in c and "step" in c]


def fake_bin(tmp_path, **programs):
    """A folder of stand-in programs (name -> shell body) to put first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in programs.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


def plan_env(tmp_path, **programs):
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the script's own default is what is checked
    env["PATH"] = fake_bin(tmp_path, **programs) + os.pathsep + env["PATH"]
    return env


SMI = 'echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: {}  |"'


@pytest.mark.parametrize("driver_cuda, jax_extra, torch_index", [
    ("12.4", "cuda12", "cu128"), ("13.0", "cuda13", "cu130"), ("14.1", "cuda13", "cu130"),
])
def test_install_plan_matches_the_cuda_major(tmp_path, driver_cuda, jax_extra, torch_index):
    out = tmp_path / "out"
    env = plan_env(tmp_path, **{"nvidia-smi": SMI.format(driver_cuda)})
    result = script("--dry-run", "--output", str(out), "--python", sys.executable, env=env)
    assert result.returncode == 0, result.stderr
    commands = plan(result.stdout)
    assert commands[1] == [sys.executable, "-m", "venv", f"{out}/venv"]
    pip = commands[2]
    assert pip[:4] == [f"{out}/venv/bin/python", "-m", "pip", "install"]
    assert pip[pip.index("-c") + 1] == os.path.join(ROOT, "constraints.txt")
    assert pip[pip.index("--extra-index-url") + 1] == (
        f"https://download.pytorch.org/whl/{torch_index}")
    assert f"jax[{jax_extra}]" in pip and {"torch", "torchvision", "timm", "flax"} <= set(pip)
    exported = dict(a.split("=", 1) for a in commands[3][1:])
    assert exported["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert exported["JAX_COMPILATION_CACHE_DIR"] == f"{out}/jax_cache"
    assert exported["PYTHONPATH"].split(":")[0] == ROOT
    # one process per row: each configuration's jax step, then PyTorch fp32 and bf16 alone
    runs = step_runs(commands)
    rows = [next(a for a in run if a.startswith("--json=")) for run in runs]
    assert rows == [f"--json={out}/rows/{name}/{kind}.json" for name in CONFIGS
                    for kind in ("mgd_jax", "torch_fp32", "torch_bf16")]
    for run in runs:
        assert {"--steps=10", "--batch_size=8", "--warmup=3"} <= set(run)
        torch = "--implementation=torch" in run
        assert (run[:2] == ["env", "JAX_PLATFORMS=cpu"]) == torch  # JAX stays off the GPU there
    assert "table" in commands[-1] and f"--rows={out}/rows" in commands[-1]
    assert not out.exists()  # a dry run runs nothing


def test_install_plan_finds_a_python(tmp_path):
    """uv when on PATH (it brings a Python 3.11 if none is installed); else a Python >= 3.11."""
    out = str(tmp_path / "out")
    env = plan_env(tmp_path, **{"nvidia-smi": SMI.format("12.8"), "uv": "exit 0"})
    result = script("--dry-run", "--output", out, env=env)
    assert result.returncode == 0, result.stderr
    assert plan(result.stdout)[1] == ["uv", "venv", "--seed", "--python", "3.11", f"{out}/venv"]
    if shutil.which("uv"):
        return  # the real uv on PATH: the search below is not reached
    env = plan_env(tmp_path / "no_uv", **{"nvidia-smi": SMI.format("12.8")})
    result = script("--dry-run", "--output", out, env=env)
    assert result.returncode == 0, result.stderr
    python, dash_m, venv = plan(result.stdout)[1][:3]
    assert (dash_m, venv) == ("-m", "venv")
    found = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True)
    assert found.stdout.strip() == "True"


def test_offline_plan_installs_nothing(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "ml_collections-1.1.0-py3-none-any.whl").write_bytes(b"")
    env = plan_env(tmp_path)
    result = script("--dry-run", "--offline", "--python", sys.executable, "--wheels",
                    str(wheels), "--output", str(out), "--only", "cps_resnet101",
                    "--with-fused", "--with-matmul", env=env)
    assert result.returncode == 0, result.stderr
    commands = plan(result.stdout)
    assert commands[1] == [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                           "--no-compile", "--disable-pip-version-check", "--upgrade",
                           "--target", f"{out}/site",
                           str(wheels / "ml_collections-1.1.0-py3-none-any.whl")]
    assert not any("venv" in c or "-c" in c[3:4] for c in commands)  # no venv, no constraints
    assert "http" not in result.stdout
    exported = dict(a.split("=", 1) for a in commands[2][1:])
    assert exported["PYTHONPATH"].split(":")[:2] == [ROOT, f"{out}/site"]
    runs = step_runs(commands)
    assert [r[0] for r in runs if r[0] != "env"] == [sys.executable] * 3
    assert [a for r in runs for a in r if a.startswith("--implementation")] == [
        "--implementation=mgd_jax", "--implementation=fused", "--implementation=mgd_jax",
        "--implementation=torch", "--implementation=torch"]
    assert "--config.resize=matmul" in runs[2]


@pytest.mark.parametrize("args, message", [
    (["--offline", "--cuda", "12"], "--cuda and --torch-index choose what mode (a) installs"),
    (["--wheels", "/tmp"], "--wheels is for --offline"),
    (["--cpu", "--cuda", "13"], "--cpu installs the CPU builds: not with --cuda"),
    (["--offline", "--wheels", "/nonexistent"], "--wheels /nonexistent: no such directory"),
    (["--steps", "ten"], "whole numbers, not 'ten'"),
    (["--only", "mgd_resnet50"], "--only: unknown configuration 'mgd_resnet50'"),
    (["--torch-precisions", "fp16"], "'fp16' is not fp32 or bf16"),
    (["--cuda", "11"], "CUDA 11: jax's CUDA builds need a driver for CUDA 12 or 13"),
    (["--bogus"], "unknown argument: --bogus"),
])
def test_bad_arguments_get_one_error_line(tmp_path, args, message):
    result = script("--dry-run", "--output", str(tmp_path / "out"), *args, env=plan_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_driver_no_cuda_major(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    result = script("--dry-run", "--output", str(tmp_path / "out"), env=plan_env(tmp_path))
    assert result.returncode == 2
    assert "no NVIDIA driver found (nvidia-smi): pass --cuda 12|13" in result.stderr


# ------------------------------------------------------------------------------------------------
# Runs on the CPU


def guard_wheel(folder):
    """The guard as a wheel of its own: carried in with --wheels like any missing package."""
    folder.mkdir()
    path = folder / "mgd_import_guard-1.0-py3-none-any.whl"
    info = "mgd_import_guard-1.0.dist-info"
    files = {"sitecustomize.py": GUARD,
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: mgd-import-guard\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def run_env(tmp_path):
    log = tmp_path / "imports"
    log.mkdir()
    # one CPU device; the session's compilation cache (the two modes share programs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MGD_IMPORT_LOG=str(log))
    return env, log


def check_run(result, out, names, log):
    """Each configuration of `names`: its jax row and its PyTorch row in the table, finite
    numbers, the machine's fields; and every process this call started imported none of BLOCKED
    (and a jax step's process no torch)."""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    table = json.loads((out / "gpu_bench.json").read_text())
    for name in names:
        jax_row, torch_row = table[name]
        assert jax_row["implementation"] == "mgd_jax" and torch_row["implementation"] == "torch"
        for row in (jax_row, torch_row):
            assert np.isfinite(row["loss"]) and row["ms_per_step"] > 0, row
            assert row["card"] == "cpu" and row["cudnn"] == "n/a (cpu)", row
            assert row["driver"].startswith("n/a") and row["python"]
        assert jax_row["jax"] and torch_row["torch"] and jax_row["flops_per_step_per_device"] > 0
        assert torch_row["label"] == "PyTorch port of the official step"
        assert torch_row["method"] == jax_row["method"]
        assert torch_row["images_per_step"] == jax_row["images_per_step"]
        assert f"{name}: {jax_row['method']} step" in result.stdout
    assert result.stdout.count("PyTorch port of the official step  fp32") >= len(names)
    processes = [json.loads(p.read_text()) for p in log.iterdir()]
    steps = [p for p in processes if "step" in p["argv"]]
    assert len(steps) == 2 * len(names), [p["argv"] for p in processes]
    for p in processes:
        assert not set(p["loaded"]) & set(BLOCKED), p
        if "--implementation=mgd_jax" in p["argv"]:
            assert "torch" not in p["loaded"], p["argv"]
    for p in log.iterdir():  # the next call's processes alone
        p.unlink()
    return table


def test_a_failed_run_leaves_a_failed_row_and_the_next_runs(tmp_path):
    """Both runs fail here (a config field that does not exist): each leaves its row, saying so,
    the second still runs, the table is printed, and the exit status is 1."""
    need("torch", "torchvision", "timm")
    out = tmp_path / "out"
    result = script("--offline", "--cpu", "--python", sys.executable, "--output", str(out),
                    "--only", "mgd_resnet18", "--torch-precisions", "fp32", "--",
                    "--config.no_such_field=1", env=run_env(tmp_path)[0], timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "gpu_bench.json").read_text())["mgd_resnet18"]
    assert [(r["implementation"], r.get("step"), r.get("precision")) for r in rows] == [
        ("mgd_jax", "configured", None), ("torch", None, "fp32")]
    logs = ("mgd_resnet18.mgd_jax.log", "mgd_resnet18.torch_fp32.log")
    for row, log in zip(rows, logs, strict=True):
        assert row["failed"].startswith("exit status 2 after ")
        assert row["failed"].endswith(f"log {out / 'logs' / log}")
        assert "no_such_field" in (out / "logs" / log).read_text()
    assert "mgd_jax (configured step)" in result.stdout and "failed: exit status 2" in result.stdout


COMMON = ["--cpu", "--steps", "1", "--warmup", "0", "--batch", "2", "--torch-precisions", "fp32"]


@pytest.mark.slow
def test_offline_mode_runs_on_the_bench_stack_alone(tmp_path):
    """Mode (b): this interpreter's packages as they are; the guard arrives as a carried wheel.
    The MobileNetV2 student takes 7 stage depths, so it runs in a second call into the same
    output, whose table then holds the rows of both calls."""
    need("torch", "torchvision", "timm")
    env, log = run_env(tmp_path)
    out = tmp_path / "out"
    common = ["--offline", *COMMON, "--python", sys.executable, "--output", str(out),
              "--wheels", str(guard_wheel(tmp_path / "wheels"))]
    first = script(*common, "--only", "mgd_resnet18,cps_resnet101", "--",
                   *tiny_flags("1,1,1,1"), env=env, timeout=900)
    check_run(first, out, ["cps_resnet101", "mgd_resnet18"], log)
    second = script(*common, "--only", "mgd_mobilenet_v2", "--", *tiny_flags("1,1,1,1,1,1,1"),
                    env=env, timeout=900)
    table = check_run(second, out, ["mgd_mobilenet_v2"], log)
    assert sorted(table) == sorted(CONFIGS)
    assert not (out / "venv").exists()  # nothing installed but the carried wheel, into OUT/site
    assert sorted(os.listdir(out / "site")) == ["mgd_import_guard-1.0.dist-info",
                                                "sitecustomize.py"]


@pytest.mark.slow
def test_install_mode_runs_with_the_cpu_builds(tmp_path):
    """Mode (a): a fresh venv of this interpreter's base Python (no Python download), the
    constraints' versions with the CPU builds (no CUDA download); the guard on PYTHONPATH."""
    need("torch", "torchvision", "timm")
    env, log = run_env(tmp_path)
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    env["PYTHONPATH"] = str(tmp_path / "guard")
    out = tmp_path / "out"
    result = script(*COMMON, "--torch-index", "none", "--python", sys._base_executable,
                    "--output", str(out), "--only", "mgd_resnet18", "--",
                    *tiny_flags("1,1,1,1"), env=env, timeout=900)
    table = check_run(result, out, ["mgd_resnet18"], log)
    listed = subprocess.run([str(out / "venv" / "bin" / "python"), "-m", "pip", "list",
                             "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120)
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    pinned = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "constraints.txt"))
                  if line.startswith(("jax==", "flax==", "torch==")))
    for name, version in pinned.items():
        assert versions[name].split("+")[0] == version, (name, versions[name])
    assert not [n for n in versions if n.startswith(("nvidia-", "jax-cuda"))], versions
    assert table["mgd_resnet18"][0]["jax"] == pinned["jax"]
    installs = [line for line in result.stdout.splitlines() if line.startswith("total ")]
    print(installs[-1])  # the install's seconds (pip's cache warm on the project's machines)
