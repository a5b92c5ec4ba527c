"""Reliability of a training run: stops on SIGTERM / SIGINT, kills at any moment (real processes),
damaged checkpoints and exports, config drift on resume, divergence, failed writes."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import checkpoint, config_lib, export, integrity, interrupts, main, train
from mgd_jax.errors import CheckpointError, ConfigError, DivergedError, ExportError, UserError

from conftest import make_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8

# A tiny supervised run for `python -m mgd_jax.main`: the config file rebuilds the tiny test config
# from `base_config()` and the fields that differ (`tiny.json` beside it).
CONFIG_FILE = '''
import json, os
from mgd_jax import config_lib

def get_config():
    c = config_lib.base_config()
    with open(os.path.join(os.path.dirname(__file__), "tiny.json")) as f:
        for key, value in json.load(f).items():
            *parents, leaf = key.split(".")
            target = c
            for p in parents:
                target = target[p]
            target[leaf] = tuple(value) if isinstance(target[leaf], tuple) else value
    return c
'''


def tiny_run_config(synthetic_dir, **overrides):
    return make_tiny_config("supervised", synthetic_dir, num_train_steps=STEPS, log_every=1,
                       eval_every=STEPS, checkpoint_every=2, **overrides)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, synthetic_dir):
    folder = tmp_path_factory.mktemp("config")
    config = tiny_run_config(synthetic_dir)
    flat = config_lib._flat(json.loads(config.to_json_best_effort()))
    base = config_lib._flat(json.loads(config_lib.base_config().to_json_best_effort()))
    (folder / "tiny.json").write_text(json.dumps({k: v for k, v in flat.items()
                                                  if base.get(k) != v}))
    (folder / "tiny.py").write_text(CONFIG_FILE)
    return str(folder / "tiny.py")


def start(config_file, workdir, fault=None):
    """`python -m mgd_jax.main` on one CPU device (one host-transfer program less to compile
    than on 8), its output merged into stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    env.pop(interrupts.FAULT_ENV, None)
    if fault:
        env[interrupts.FAULT_ENV] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "mgd_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def signal_after(proc, signum, pattern="step "):
    """Sends `signum` once a line starting with `pattern` (a finished step) was printed; returns
    (exit status, output, seconds from the signal to the exit)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(pattern):
            break
    proc.send_signal(signum)
    sent = time.monotonic()
    code, rest = finish(proc, timeout=60)
    return code, "".join(lines) + rest, time.monotonic() - sent


def variables_of(workdir):
    return jax.tree.leaves(export.load_variables(os.path.join(workdir, "export"))[0])


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """An uninterrupted run of the tiny config (a real process): its workdir."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    code, out = finish(start(config_file, workdir))
    assert code == 0, out[-3000:]
    return workdir


def test_stops_and_kills_at_any_moment_resume_bit_identical(config_file, reference, tmp_path):
    """SIGTERM, then kills before / during / after an asynchronous checkpoint write and a real
    SIGKILL, each followed by the same command: the end is bit-identical to `reference`."""
    workdir = str(tmp_path / "run")
    code, out, seconds = signal_after(start(config_file, workdir), signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert seconds < 25
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))[-1] == stopped
    assert integrity.is_sealed(os.path.join(workdir, "checkpoints", str(stopped)))
    assert not os.path.exists(os.path.join(workdir, "export"))
    assert f"resumed from step {stopped}" not in out

    for fault in ("save:before", "save:during", "save:committed"):
        code, out = finish(start(config_file, workdir, fault))
        assert code == interrupts.FAULT_EXIT, out[-3000:]
        assert f"fault injected: {fault}" in out
    code, out, _ = signal_after(start(config_file, workdir), signal.SIGKILL)
    assert code == -signal.SIGKILL

    code, out = finish(start(config_file, workdir))
    assert code == 0, out[-3000:]
    assert "resumed from step" in out
    for a, b in zip(variables_of(reference), variables_of(workdir), strict=True):
        np.testing.assert_array_equal(a, b)
    final = json.loads(open(os.path.join(workdir, "final_metrics.json")).read())
    assert final["miou"] == json.loads(
        open(os.path.join(reference, "final_metrics.json")).read())["miou"]


class Position:
    """A data iterator as the checkpoint handler sees it (the trainer's `DevicePrefetch`)."""

    state = b""

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state

    def start_prefetch(self):
        pass


def largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs
             if f != integrity.MANIFEST]
    return max(files, key=os.path.getsize)


def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGES = {"flipped": flip_byte, "truncated": truncate, "missing": os.remove}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(reference, tmp_path, damage,
                                                                   caplog):
    steps = checkpoint.saved_steps(os.path.join(reference, "checkpoints"))
    assert steps == [4, 6, 8]
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(reference, "checkpoints"), workdir / "checkpoints")
    (workdir / "checkpoints" / "best").mkdir(exist_ok=True)
    latest = workdir / "checkpoints" / "8"
    DAMAGES[damage](largest_file(latest))
    _, raw = checkpoint.restore_raw(reference, 6)
    template = train.TrainState(**raw)

    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    position = Position()
    with caplog.at_level("WARNING"):
        state, resumed = ckpt.restore_or_init(template, position)
    assert resumed and int(state.step) == 6 and position.state
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(latest) in warning and str(workdir / "checkpoints" / "6") in warning
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(raw["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Set aside: step 8 can be written again, and the next resume needs no fallback.
    assert os.listdir(workdir / checkpoint.DAMAGED_DIR)
    ckpt.save(8, state, position)
    ckpt.close()
    assert checkpoint.saved_steps(str(workdir / "checkpoints")) == [4, 6, 8]
    assert integrity.damage(latest) is None


def test_unreadable_checkpoints_and_networks_are_refused_by_path(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(".jax_cache"))
    flip_byte(largest_file(workdir / "checkpoints" / "8"))
    with pytest.raises(ExportError, match=f"{workdir}.*step 8 is damaged.*"
                                          f"{workdir / 'checkpoints' / '8'}"):
        checkpoint.restore_raw(str(workdir))
    assert checkpoint.restore_raw(str(workdir), 6)[0] == 6
    # Every checkpoint damaged: nothing is moved, the error names the newest.
    for step in (4, 6):
        truncate(largest_file(workdir / "checkpoints" / str(step)))
    _, raw = checkpoint.restore_raw(reference, 6)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    with pytest.raises(CheckpointError, match="no checkpoint can be resumed from: step 8: .*/8/"):
        ckpt.restore_or_init(train.TrainState(**raw), Position())
    ckpt.close()
    assert checkpoint.saved_steps(str(workdir / "checkpoints")) == [4, 6, 8]
    # A network directory with a flipped byte is refused, naming the file.
    network = workdir / "export"
    export.load_network(str(network))
    flip_byte(largest_file(network / export.VARIABLES_DIR))
    with pytest.raises(ExportError, match=f"{network}: damaged network directory: {network}"):
        export.load_network(str(network))
