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

from mgd_jax import config_lib, main, network_dir, train
from mgd_jax.runtime import checkpoint, integrity, interrupts
from mgd_jax.runtime.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    ExportError,
    UserError,
)

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
    fields = dict(num_train_steps=STEPS, log_every=1, eval_every=STEPS, checkpoint_every=2)
    return make_tiny_config("supervised", synthetic_dir, **{**fields, **overrides})


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, synthetic_dir):
    folder = tmp_path_factory.mktemp("config")
    config = tiny_run_config(synthetic_dir)
    flat = config_lib.flatten(json.loads(config.to_json_best_effort()))
    base = config_lib.flatten(json.loads(config_lib.base_config().to_json_best_effort()))
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
    return jax.tree.leaves(network_dir.load_variables(os.path.join(workdir, "export"))[0])


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
    # One warning, matched on its start (the tmp path holds "damaged" too) and as a set (once an
    # earlier test configured the console, the same line can arrive through two loggers).
    (warning,) = {r.getMessage() for r in caplog.records
                  if r.getMessage().startswith("checkpoint of step 8 is damaged")}
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
    network_dir.load_network(str(network))
    flip_byte(largest_file(network / network_dir.VARIABLES_DIR))
    with pytest.raises(ExportError, match=f"{network}: damaged network directory: {network}"):
        network_dir.load_network(str(network))


def test_sigint_stops_in_process_and_a_changed_config_is_refused(synthetic_dir, config_file,
                                                                 tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    original = interrupts.fault_point

    def ctrl_c_after_step_1(name, step):
        if name == "step" and step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        original(name, step)

    monkeypatch.setattr(interrupts, "fault_point", ctrl_c_after_step_1)
    before = signal.getsignal(signal.SIGINT)  # (a test worker process may ignore SIGINT)
    result = train.train_and_evaluate(tiny_run_config(synthetic_dir), workdir)
    assert result == {"stopped": True, "step": 1, "workdir": workdir}
    assert signal.getsignal(signal.SIGINT) is before  # the handler given back
    assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) == [1]
    assert integrity.damage(os.path.join(workdir, "checkpoints", "1")) is None
    monkeypatch.setattr(interrupts, "fault_point", original)

    # Resuming with fields that change the run is refused, naming them, config.json kept.
    recorded = open(os.path.join(workdir, "config.json")).read()
    capsys.readouterr()
    argv = ["main", f"--config={config_file}", f"--workdir={workdir}", "--config.lr=0.02",
            "--config.seed=1", "--config.log_every=5"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds --config.* overrides there
    code = main.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "lr: 0.01 -> 0.02; seed: 0 -> 1." in err[0] and "log_every" not in err[0]
    assert open(os.path.join(workdir, "config.json")).read() == recorded
    # Safe fields, and the explicit override.
    # (as the run compares it: with the backend's defaults resolved, as config.json has them)
    config = config_lib.resolve_backend_defaults(tiny_run_config(
        synthetic_dir, log_every=5, data_dir=str(tmp_path / "moved"), **{"eval.panels": 2}))
    train.check_resume_config(config, workdir, resuming=True)
    config.model.width = 0.25
    with pytest.raises(ConfigError, match=r"model.width: 0.125 -> 0.25\. Rerun"):
        train.check_resume_config(config, workdir, resuming=True)
    train.check_resume_config(config, workdir, resuming=False)
    config.allow_config_change = True
    train.check_resume_config(config, workdir, resuming=True)


def poison(monkeypatch, at):
    """From now on, the train step of (0-based) step `at` gets NaN gradients and a finite loss."""
    original = train.train_step

    class Poisoned:
        def __init__(self, method, step):
            self.method, self.step = method, step

        def __getattr__(self, name):
            return getattr(self.method, name)

        def loss(self, params, *args):
            loss, aux = self.method.loss(params, *args)
            away = 1 - (self.step == at).astype(jnp.float32)
            leaf = jax.tree.leaves(params)[0]  # sqrt at 0 (only at `at`): value 0, gradient NaN
            return loss + jnp.sqrt(jnp.abs(leaf.sum()) * 0 + away) - away, aux

    def poisoned(state, frozen, batch, *, method, tx, schedule):
        return original(state, frozen, batch, method=Poisoned(method, state.step), tx=tx,
                        schedule=schedule)

    monkeypatch.setattr(train, "train_step", poisoned)


def test_divergence_message_names_step_terms_and_checkpoint(tiny_config):
    record = {"step": 7, "count": 2, "metrics": {"loss": np.nan, "loss_sup": np.inf,
                                                  "grad_norm": np.nan, "nonfinite": 1.0}}
    message = train.diverged_message(record, tiny_config("supervised"), "step 6 in /w")
    assert message.startswith("non-finite loss at step 7 (2 such step(s) so far): loss=nan, "
                              "loss_sup=inf, grad_norm=nan; ")
    assert "last good checkpoint: step 6 in /w" in message and "now 0.01" in message


def test_nonfinite_step_stops_at_the_next_sync_or_is_skipped(synthetic_dir, tmp_path,
                                                               monkeypatch):
    """A NaN gradient at step 3: the run stops at the checkpoint step 4 without saving it; rerun
    with skip_nonfinite (a field a resume may change), it skips and counts that step."""
    workdir = str(tmp_path / "run")
    poison(monkeypatch, 2)
    config = tiny_run_config(synthetic_dir, num_train_steps=4, log_every=4)
    with pytest.raises(DivergedError) as stop:
        train.train_and_evaluate(config, workdir)
    message = str(stop.value)
    assert "non-finite gradient norm (the loss was finite) at step 3" in message
    assert "grad_norm=nan" in message and "loss=" in message
    assert f"last good checkpoint: step 2 in {workdir}/checkpoints" in message
    assert "--config.lr (now 0.01)" in message and "skip_nonfinite" in message
    assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) == [2]
    assert integrity.is_sealed(os.path.join(workdir, "checkpoints", "2"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(
        checkpoint.restore_raw(workdir)[1]))

    config.skip_nonfinite = True
    result = train.train_and_evaluate(config, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    (row,) = [r for r in rows if "train/loss" in r]
    assert row["step"] == 4 and row["train/skipped_steps"] == 1
    assert np.isfinite(row["train/loss"])
    assert all(np.isfinite(leaf).all() for leaf in variables_of(workdir))
    assert np.isfinite(result["miou"])


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_unwritable_workdir_fails_before_training(tmp_path, config_file, monkeypatch, capsys,
                                                  error):
    real_open = os.open

    def failing_open(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    code = main.main(["main", f"--config={config_file}", f"--workdir={tmp_path / 'run'}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line == (f"error: --workdir={tmp_path / 'run'}: cannot write there "
                    f"({os.strerror(error)}); free space or pick another folder")
    # A file where the workdir should be: the same, without any injection.
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write there"):
        train.check_workdir(str(tmp_path / "file" / "run"))


def test_failed_checkpoint_write_stops_at_once_keeping_the_earlier_ones(synthetic_dir, tmp_path,
                                                                        monkeypatch):
    from grain._src.python.checkpoint import handler

    real_save = handler.CheckpointHandler.save

    def disk_full_at_step_3(self, directory, *args, **kwargs):
        if "/3." in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(handler.CheckpointHandler, "save", disk_full_at_step_3)
    workdir = str(tmp_path / "run")
    config = tiny_run_config(synthetic_dir, num_train_steps=4, checkpoint_every=1)
    with pytest.raises(CheckpointError) as stop:
        train.train_and_evaluate(config, workdir)
    message = str(stop.value)
    assert "\n" not in message
    assert "step 3" in message and "No space left on device" in message
    assert "intact checkpoints: steps [1, 2]" in message
    assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) == [1, 2]
    for step in (1, 2):
        where = os.path.join(workdir, "checkpoints", str(step))
        assert integrity.is_sealed(where) and integrity.damage(where) is None


AGREE = '''
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from mgd_jax.runtime import interrupts
with interrupts.StopSignals() as signals:
    print("ready", flush=True)
    for step in range(1, 100000):
        time.sleep(0.01)  # a step
        if signals.stop_now(step):
            print(f"stop at {step}", flush=True)
            break
jax.distributed.shutdown()
'''


def test_two_processes_agree_on_the_stop_step():
    """SIGTERM to one of two processes (JAX's preemption service): both stop at the same step,
    as `train` asks `stop_now` after every step."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(i), address], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0]
    stops = [out.split("stop at ")[1].split()[0] for out in outputs]
    assert stops[0] == stops[1]


# `python -m mgd_jax.main` whose writes into regular files fail from step `argv[1]` on: a file
# size limit of 0 (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write that grows a file fail with
# EFBIG, as a full disk fails them with ENOSPC: the log line, the metrics row, the checkpoint.
# The checkpoint writes in flight finish first (which of them a real disk fills up first is
# chance).
FULL_FROM_STEP = '''
import resource, signal, sys
from mgd_jax import main
from mgd_jax.runtime import checkpoint, interrupts

at, original = int(sys.argv.pop(1)), interrupts.fault_point
made, init = [], checkpoint.Checkpointer.__init__
checkpoint.Checkpointer.__init__ = lambda self, *a, **k: made.append(self) or init(self, *a, **k)

def disk_full(name, step):
    if name == "step" and step == at:
        made[0].wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    original(name, step)

interrupts.fault_point = disk_full
sys.exit(main.run())
'''


def test_full_disk_ends_with_one_line_naming_the_step_and_resume_completes(config_file, reference,
                                                                            tmp_path):
    """Writes fail from step 5 on (checkpoints at 2 and 4): exit 2, one `error:` line naming
    step 5, no traceback; checkpoints 2 and 4 intact; the same command afterwards (space
    freed) ends bit-identical to the uninterrupted run."""
    workdir = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1")
    env.pop(interrupts.FAULT_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_FROM_STEP, "5", f"--config={config_file}",
         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "step 5" in errors[0] and "File too large" in errors[0], errors[0]
    assert "intact checkpoints: steps [2, 4]" in errors[0], errors[0]
    assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
    for step in (2, 4):
        assert integrity.damage(os.path.join(workdir, "checkpoints", str(step))) is None

    code, out = finish(start(config_file, workdir))
    assert code == 0, out[-3000:]
    assert "resumed from step 4" in out
    for a, b in zip(variables_of(reference), variables_of(workdir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_background_write_failure_names_its_own_step(tmp_path, monkeypatch):
    """A checkpoint write that fails in the background is found at the next save (or check): the
    error names the step whose write failed, not the step being saved."""
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    state = {"w": jnp.arange(3.0)}
    ckpt.save(1, state, Position())
    ckpt.wait()
    ckpt.save(2, state, Position())

    def failed_in_the_background():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt._latest, "wait_until_finished", failed_in_the_background)
    with pytest.raises(CheckpointError, match=(
            r"^writing the checkpoint of step 2 in .* failed: \[Errno 28\] No space left on "
            r"device; the run stops \(intact checkpoints: steps \[1\]\)$")):
        ckpt.save(3, state, Position())
    monkeypatch.undo()
    ckpt.close()


def test_a_second_run_on_a_workdir_in_use_is_refused_at_once(config_file, tmp_path, capsys,
                                                            monkeypatch):
    """The same command on a workdir another run holds: exit 2 at once, one `error:` line naming
    the holder, nothing written; once the holder is killed (SIGKILL), the workdir is free."""
    from test_workdir_lock import hold_in_child

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = hold_in_child(workdir)
    try:
        argv = ["main", f"--config={config_file}", f"--workdir={workdir}"]
        monkeypatch.setattr(sys, "argv", argv)
        assert main.main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --workdir={workdir}: in use by another run (host ")
        assert f"pid {holder.pid}, started " in line
        assert sorted(os.listdir(workdir)) == ["run.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from mgd_jax.runtime import workdir_lock

    workdir_lock.acquire(workdir).release()
