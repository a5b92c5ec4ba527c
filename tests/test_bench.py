"""bench: the real train step runs and is timed on random inputs (tiny networks, 32 px, 1 step);
its FLOPs are counted from the program; it runs without the data / checkpoint stacks; the
PyTorch step of the comparison runs beside it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import config_lib, methods
from mgd_jax.workflows import bench

from conftest import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NETS = ("model", "teacher_deep", "teacher_wide")


def tiny(method):
    c = config_lib.base_config()
    c.method = method
    c.dataset = "synthetic"
    c.num_classes = 5
    c.crop_size = 32
    for name in TINY_NETS:
        c[name].width = 0.125
        c[name].depths = "1,1,1,1"
    return c


def test_flops_are_counted_from_convolutions_and_matmuls():
    n, h, w, cin, cout, k = 2, 16, 12, 3, 8, 3
    x = jnp.ones((n, h, w, cin))
    kernel = jnp.ones((k, k, cin, cout))

    def conv(x, kernel, stride):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = 2 * n * (h // 2) * (w // 2) * cout * k * k * cin
    assert bench.count_flops(lambda a, b: conv(a, b, 2), x, kernel) == forward
    # the forward, then the input gradient (a transposed conv: its inserted zeros not counted)
    # and the kernel gradient, one forward's worth each
    grad = jax.grad(lambda a, b: jnp.sum(conv(a, b, 2)), argnums=(0, 1))
    assert bench.count_flops(grad, x, kernel) == 3 * forward
    matmul = bench.count_flops(jnp.matmul, jnp.ones((5, 7)), jnp.ones((7, 3)))
    assert matmul == 2 * 5 * 7 * 3
    # XLA's own count of the same stride-1 conv (CPU cost analysis) agrees
    cost = jax.jit(lambda a, b: conv(a, b, 1)).lower(x, kernel).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    ours = bench.count_flops(lambda a, b: conv(a, b, 1), x, kernel)
    assert ours == 2 * n * h * w * cout * k * k * cin
    assert abs(cost["flops"] - ours) / ours < 0.2


@pytest.mark.slow
def test_bench_supervised_smoke(capsys):
    result = bench.run_bench(tiny("supervised"), steps=1, warmup=0, batch=jax.device_count())
    assert result["ms_per_step"] > 0 and result["images_per_step"] == jax.device_count()
    assert result["flops_per_step_per_device"] > 0 and 0 < result["mfu"]
    assert result["peak_tflops_per_device"] > 0 and "matmul" in result["peak_source"]
    assert np.isfinite(result["loss"])
    out = capsys.readouterr().out
    assert "compile" in out and "images/s" in out and "MFU" in out
    assert json.loads(out.strip().splitlines()[-1])["ms_per_step"] == result["ms_per_step"]


def test_mgd_gets_random_teachers_without_checkpoints():
    c = tiny("mgd")
    for name in ("teacher_deep", "teacher_wide"):
        assert not c[name].checkpoint
    method = methods.get(c)
    frozen = method.frozen_variables(random=True)
    assert set(frozen) == {"teacher_deep", "teacher_wide"}
    wide = frozen["teacher_wide"]["params"]["backbone"]["layer1_0"]["conv2"]["kernel"]
    deep = frozen["teacher_deep"]["params"]["backbone"]["layer1_0"]["conv2"]["kernel"]
    assert wide.shape[-1] == 2 * deep.shape[-1]  # the wide teacher is wide


BLOCKER = """
import sys
BLOCKED = {"grain", "tensorflow_datasets", "tensorflow", "cv2", "clu", "orbax", "torch"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
from mgd_jax.tools import bench
status = bench.main(["mgd-bench", "step", "--config=configs/voc.py:method=mgd", "--steps=1",
                     "--warmup=0", "--batch_size=2"] + sys.argv[1:])
print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED))
sys.exit(status)
"""


@pytest.mark.slow
def test_step_bench_runs_without_the_data_and_checkpoint_stacks():
    """A bare accelerator machine has jax, flax, optax, numpy, ml-collections and absl only."""
    overrides = ["--config.num_classes=5", "--config.crop_size=32"] + [
        f"--config.{name}.{field}={value}" for name in TINY_NETS
        for field, value in (("width", 0.125), ("depths", "1,1,1,1"))
    ]
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout
    row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert row["method"] == "mgd" and row["step"] == "fused" and np.isfinite(row["loss"])


@pytest.mark.parametrize("method", ["supervised", "cps", "mgd"])
def test_torch_step_runs(method):
    need("torch", "torchvision", "timm")
    from mgd_jax.pytorch import step as torch_step

    row = torch_step.run(tiny(method), batch_size=2, steps=1, warmup=1, device="cpu")
    assert row["finite"] and row["ms_per_step"] > 0
    assert row["images_per_s"] > 0 and row["precision"] == "fp32"


@pytest.mark.slow
def test_compare_prints_one_table_with_the_ratio(capsys):
    need("torch", "torchvision", "timm")
    rows = bench.compare(tiny("mgd"), ["torch"], steps=1, warmup=0, batch=jax.device_count())
    assert [r["implementation"] for r in rows] == ["mgd_jax", "torch"]
    table = capsys.readouterr().out.split("mgd step, student resnet18")[-1]
    fused, torch_row = table.strip().splitlines()[2:4]
    ratio = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    assert fused.startswith("mgd_jax (fused step)") and fused.endswith(f"{ratio:.2f}x")
    assert torch_row.startswith("PyTorch port of the official step")
    assert rows[1]["label"] == "PyTorch port of the official step"
