"""Reporter: metrics.jsonl lines, TensorBoard event files (tensorboardX), progress / ETA math."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.runtime import reporting


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
    tags = {v.tag for v in _summary_values(workdir)}
    assert {"loss", "lr"} <= tags and any(t.startswith("config") for t in tags)


def _summary_values(workdir):
    """Every summary value of a run's event files, read back with tensorboardX's own protobufs
    (no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    values = []
    for file in _event_files(workdir):
        with open(file, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = np.frombuffer(data[pos : pos + 8], "<u8")
            ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + int(length)])
            values += list(ev.summary.value)
            pos += 12 + int(length) + 4
    return values


def test_images_go_to_png_and_tensorboard(tmp_path):
    import io

    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with reporting.Reporter(str(tmp_path), total_steps=10) as rep:
        path = rep.image("panels", image, step=7)
    assert path == str(tmp_path / "panels" / "panels_0000007.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    (value,) = [v for v in _summary_values(str(tmp_path)) if v.tag == "panels"]
    stored = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    np.testing.assert_array_equal(stored, image)
    assert reporting.Reporter(str(tmp_path / "x"), total_steps=1, is_main=False).image(
        "panels", image, 1) is None


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


def test_progress_lines_of_a_long_loop():
    clock = FakeClock()
    progress = reporting.Progress("eval", 40, every=30.0, clock=clock)
    clock.t += 10.0
    assert progress.update(5) is None  # not due yet
    clock.t += 20.0
    assert progress.update(10) == "eval: 10/40 batches (25%), 0:00:30, ETA 0:01:30"
    clock.t += 5.0
    assert progress.update(12) is None
    assert reporting.Progress("x", None, every=0, clock=clock).update(3) == "x: 3 batches, 0:00:00"
    assert reporting.Progress("x", 9, every=-1, clock=clock).update(3) is None  # off
