"""bench: the real train step runs and is timed on random inputs (tiny network, 32 px, 1 step)."""

import jax
import numpy as np
import pytest

from mgd_jax import bench, config_lib, methods


def test_peak_table():
    class Dev:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind

    assert bench.peak_flops(Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989e12
    assert bench.peak_flops(Dev("gpu", "NVIDIA H200")) == 989e12
    assert bench.peak_flops(Dev("gpu", "NVIDIA A100-SXM4-40GB")) == 312e12
    assert bench.peak_flops(Dev("tpu", "TPU v5 lite")) == 197e12
    assert bench.peak_flops(Dev("tpu", "TPU v5p")) == 459e12
    assert bench.peak_flops(Dev("tpu", "TPU v4")) == 275e12
    assert bench.peak_flops(Dev("cpu", "cpu")) is None


@pytest.mark.slow
def test_bench_supervised_smoke(capsys):
    c = config_lib.base_config()
    c.method = "supervised"
    c.dataset = "synthetic"
    c.num_classes = 5
    c.crop_size = 32
    c.model.width = 0.125
    c.model.depths = "1,1,1,1"
    result = bench.run_bench(c, steps=1, warmup=0, batch=jax.device_count())
    assert result["ms_per_step"] > 0 and result["images_per_step"] == jax.device_count()
    assert result["flops_per_step_per_device"] > 0 and result["mfu"] is None  # CPU
    assert np.isfinite(result["loss"])
    out = capsys.readouterr().out
    assert "compile" in out and "images/s" in out and "n/a (CPU)" in out


def test_mgd_gets_random_teachers_without_checkpoints():
    c = config_lib.base_config()
    c.method = "mgd"
    c.num_classes = 5
    for name in ("teacher_deep", "teacher_wide"):
        c[name].width = 0.125
        c[name].depths = "1,1,1,1"
        assert not c[name].checkpoint
    method = methods.get(c)
    frozen = method.frozen_variables(random=True)
    assert set(frozen) == {"teacher_deep", "teacher_wide"}
    wide = frozen["teacher_wide"]["params"]["backbone"]["layer1_0"]["conv2"]["kernel"]
    deep = frozen["teacher_deep"]["params"]["backbone"]["layer1_0"]["conv2"]["kernel"]
    assert wide.shape[-1] == 2 * deep.shape[-1]  # the wide teacher is wide
