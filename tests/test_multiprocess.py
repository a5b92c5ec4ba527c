"""Multi-process training: two `jax.distributed` processes on loopback (2 CPU devices each),
killed together after a checkpoint and resumed by the same command, end where one process
holding the same 4 devices does: the same losses, parameters and mIoU, one set of checkpoints and
one metrics file."""

import json
import os
import signal

import numpy as np
import pytest

import multiprocess
from conftest import make_tiny_config

STEPS = 4


def train_run(workdir: str, data_dir: str, dataset: str, teachers: dict[str, str],
              kill_at: int = 0) -> dict:
    """A tiny MGD run in this process (the worker side); `kill_at` > 0: SIGKILL right after the
    checkpoint of that step is written (as a preemption without notice)."""
    import jax

    from mgd_jax import train
    from mgd_jax.runtime import checkpoint

    jax.config.update("jax_enable_x64", True)
    config = make_tiny_config("mgd", (data_dir, dataset), num_train_steps=STEPS, log_every=1,
                              eval_every=STEPS, precision="float64")
    for name, path in teachers.items():
        config[name].checkpoint = path
    if kill_at:
        original = checkpoint.Checkpointer.save

        def save_then_die(self, step, state, data_iter, force=False):
            original(self, step, state, data_iter, force=force)
            if step == kill_at:
                self.wait()
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpointer.save = save_then_die
    result = train.train_and_evaluate(config, workdir)
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "miou": result["miou"], "steps": result["steps"]}


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir) -> dict[str, np.ndarray]:
    import jax

    from mgd_jax import network_dir

    variables, _ = network_dir.load_variables(os.path.join(workdir, "export"))
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(variables)}


def _launch(tmp_path, name, processes, data, teachers, kill_at=0, workdir=None):
    workdir = workdir or str(tmp_path / name)
    results = multiprocess.launch(
        "test_multiprocess:train_run",
        dict(workdir=workdir, data_dir=data[0], dataset=data[1], teachers=teachers,
             kill_at=kill_at),
        num_processes=processes, devices_per_process=4 // processes, timeout=300,
        workdir=str(tmp_path / f"{name}_processes_{kill_at}"))
    return workdir, results


@pytest.mark.xdist_group("processes")  # see tests/conftest.py
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path, synthetic_dir,
                                                              tiny_teachers):
    one_dir, one = _launch(tmp_path, "one", 1, synthetic_dir, tiny_teachers)
    assert one[0].returncode == 0, multiprocess.describe(one)
    assert one[0].value["devices"] == 4
    # two processes, both killed right after the step-2 checkpoint; the same command resumes
    two_dir, killed = _launch(tmp_path, "two", 2, synthetic_dir, tiny_teachers, kill_at=2)
    assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, multiprocess.describe(killed)
    _, two = _launch(tmp_path, "two", 2, synthetic_dir, tiny_teachers, workdir=two_dir)
    assert [r.returncode for r in two] == [0, 0], multiprocess.describe(two)
    assert [(r.value["process"], r.value["processes"], r.value["devices"]) for r in two] == [
        (0, 2, 4), (1, 2, 4)]
    assert "resumed from step 2" in two[0].output

    # the same losses, parameters and mIoU. In float64: in float32 the two programs' reductions
    # (gloo between processes, in-process between devices) round differently, and this tiny run
    # amplifies that ~30x a step (grad norm 2e-6 relative apart after step 1, 1e-3 after step 3,
    # 0.13 at step 4); in float64 the four steps agree to the logged float32 rounding.
    losses_one, losses_two = _losses(one_dir), _losses(two_dir)
    assert sorted(losses_two) == list(range(1, STEPS + 1))  # one metrics file, each step once
    np.testing.assert_allclose([losses_two[s] for s in sorted(losses_two)],
                               [losses_one[s] for s in sorted(losses_one)], rtol=1e-6)
    params_one, params_two = _params(one_dir), _params(two_dir)
    assert params_one.keys() == params_two.keys()
    for key in params_one:
        np.testing.assert_allclose(params_two[key], params_one[key], rtol=1e-5, atol=1e-7,
                                   err_msg=key)
    assert two[0].value["miou"] == two[1].value["miou"]
    assert two[0].value["miou"] == pytest.approx(one[0].value["miou"], abs=1e-6)
    # one set of checkpoints (written together by both processes), not one per process
    steps = sorted(int(d) for d in os.listdir(os.path.join(two_dir, "checkpoints")) if d.isdigit())
    assert steps == [2, 4]
    def names(workdir):  # (a resumed run opens a TensorBoard event file of its own)
        return {"events" if n.startswith("events.out.") else n for n in os.listdir(workdir)}

    assert names(two_dir) == names(one_dir)
