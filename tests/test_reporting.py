"""Reporter: metrics.jsonl lines, TensorBoard event files (tensorboardX), progress / ETA math."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import reporting


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _event_files(workdir):
    return glob.glob(os.path.join(workdir, "events.out.tfevents.*"))


def _read_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_scalars_write_jsonl_tensorboard_and_stdout(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    with reporting.Reporter(workdir, total_steps=10) as rep:
        rep.scalars(1, {"loss": jnp.float32(0.5), "lr": np.float64(0.01)})
        rep.scalars(2, {"loss": 0.25, "bad": float("nan")})
        rep.text("config", "a: 1\nb: 2")
    lines = _read_jsonl(workdir)
    assert lines == [
        {"step": 1, "loss": 0.5, "lr": pytest.approx(0.01)},
        {"step": 2, "loss": 0.25, "bad": None},
    ]
    out = capsys.readouterr().out
    assert "step 1/10: loss=0.5, lr=0.01" in out and "== config ==" in out
    files = _event_files(workdir)
    assert files and os.path.getsize(files[0]) > 0
    # read the event file back with tensorboardX's own protobufs (no TensorFlow)
    from tensorboardX.proto import event_pb2

    tags = set()
    with open(files[0], "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = np.frombuffer(data[pos : pos + 8], "<u8")
        ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + int(length)])
        tags.update(v.tag for v in ev.summary.value)
        pos += 12 + int(length) + 4
    assert {"loss", "lr"} <= tags and any(t.startswith("config") for t in tags)


def test_progress_eta_math(tmp_path, capsys):
    clock = FakeClock()
    rep = reporting.Reporter(str(tmp_path), total_steps=1000, clock=clock)
    assert rep.progress(10, images_per_step=8) == {}  # first call starts the clock
    clock.t += 20.0
    values = rep.progress(50, images_per_step=8)  # 40 steps in 20 s
    assert values["perf/steps_per_sec"] == pytest.approx(2.0)
    assert values["perf/images_per_sec"] == pytest.approx(16.0)
    assert values["perf/eta_seconds"] == pytest.approx(950 / 2.0)
    rep.close()
    rep.close()  # idempotent
    out = capsys.readouterr().out
    assert "ETA 0:07:55" in out and "images/s" in out and "(5.0%)" in out
    assert _read_jsonl(str(tmp_path))[-1]["perf/eta_seconds"] == pytest.approx(475.0)
    assert reporting.format_eta(3725) == "1:02:05" and reporting.format_eta(float("inf")) == "?"


def test_non_main_writes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "other")
    rep = reporting.Reporter(workdir, total_steps=5, is_main=False)
    rep.scalars(1, {"loss": 1.0})
    rep.text("t", "x")
    rep.progress(1, 2)
    rep.close()
    assert not os.path.exists(workdir)
    assert capsys.readouterr().out == ""
