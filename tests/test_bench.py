"""bench: the real train step runs and is timed on random inputs (tiny networks, 32 px, 1 step);
its FLOPs are counted from the program; the PyTorch step of the comparison runs beside it; rows
timed in separate processes make one table per configuration."""

import json
import os

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


# That the step bench runs without the data, checkpoint and OpenCV stacks: tests/test_gpu_bench.py
# (launch/gpu_bench.sh --offline with them unimportable, end to end).


def row(implementation, precision, ms, **fields):
    """A row as `mgd-bench step --implementation=... --json` writes one (the fields tables read)."""
    base = {"implementation": implementation, "precision": precision, "ms_per_step": ms,
            "ms_min": ms - 1, "peak_memory_bytes": 3 * 2**30, "method": "mgd",
            "student": "resnet18", "crop_size": 512, "global_batch": 8, "images_per_step": 24,
            "steps": 10, "card": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
            "cuda": "13.0", "cudnn": "9.10.2", "python": "3.12.3"}
    if implementation == "torch":
        base.update(label="PyTorch port of the official step", torch="2.11.0+cu130")
    else:
        base.update(step="reference" if implementation == "mgd_jax" else implementation,
                    devices="1 x NVIDIA H100 80GB HBM3", jax="0.11.2", jaxlib="0.11.2")
    return {**base, **fields}


def test_table_gathers_the_rows_of_separate_processes(tmp_path, capsys):
    from mgd_jax.tools import bench as tool

    mgd, cps = tmp_path / "rows" / "mgd_resnet18", tmp_path / "rows" / "cps_resnet101"
    mgd.mkdir(parents=True)
    cps.mkdir()
    files = {mgd / "torch_bf16.json": {"implementation": "torch", "precision": "bf16",
                                       "failed": "exit status 1 after 9 s; log x.log"},
             mgd / "torch_fp32.json": row("torch", "fp32", 300.0),
             mgd / "mgd_jax.json": row("mgd_jax", "bfloat16", 100.0),
             mgd / "fused.json": [row("fused", "float32", 150.0)],
             cps / "mgd_jax.json": {"implementation": "mgd_jax", "step": "configured",
                                    "failed": "exit status 137 after 80 s; log y.log"}}
    for path, content in files.items():
        path.write_text(json.dumps(content))
    (cps / "torch_fp32.json").write_text("{")  # cut short
    assert tool.main(["mgd-bench", "table", f"--rows={tmp_path / 'rows'}",
                      f"--json={tmp_path / 'all.json'}"]) == 0
    out = capsys.readouterr().out
    gathered = json.loads((tmp_path / "all.json").read_text())
    assert list(gathered) == ["cps_resnet101", "mgd_resnet18"]
    assert [r["implementation"] for r in gathered["mgd_resnet18"]] == [
        "mgd_jax", "fused", "torch", "torch"]
    cps_table, mgd_table = out.strip().split("\n\n")
    lines = mgd_table.splitlines()
    assert lines[0].startswith("mgd_resnet18: mgd step, student resnet18, 1 x NVIDIA H100")
    assert lines[1] == ("  mgd_jax: NVIDIA H100 80GB HBM3, driver 580.159.04, jax 0.11.2, "
                        "jaxlib 0.11.2, CUDA 13.0, cuDNN 9.10.2, Python 3.12.3")
    assert lines[2].startswith("  torch: NVIDIA H100 80GB HBM3, driver 580.159.04, "
                               "torch 2.11.0+cu130")
    # bf16 has no PyTorch time to compare with; float32 has
    assert lines[4].startswith("mgd_jax (reference step)") and not lines[4].rstrip().endswith("x")
    assert lines[5].startswith("mgd_jax (fused step)") and lines[5].endswith("2.00x")
    assert lines[6].startswith("PyTorch port of the official step  fp32")
    assert lines[7].startswith("PyTorch port of the official step  bf16")
    assert lines[7].endswith("failed: exit status 1 after 9 s; log x.log")
    assert cps_table.splitlines()[0] == "cps_resnet101: no row measured"
    assert "mgd_jax (configured step)" in cps_table and "exit status 137" in cps_table
    assert "failed: unreadable" in cps_table


@pytest.mark.parametrize("args, message", [
    (["table"], "table needs --rows"),
    (["table", "--rows=/nonexistent"], "--rows=/nonexistent: no such directory"),
    (["step", f"--config={ROOT}/configs/voc.py", "--implementation=torch", "--compare=torch"],
     "--implementation times one implementation: not with --compare"),
])
def test_bench_user_errors(capsys, args, message):
    from mgd_jax.tools import bench as tool

    assert tool.main(["mgd-bench", *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_machine_fields():
    assert bench.cudnn_text(91002) == "9.10.2" and bench.cudnn_text(8907) == "8.9.7"
    assert bench.cudnn_text(None) is None
    env = bench.jax_environment()
    assert env["jax"] == jax.__version__ and env["python"]
    if jax.default_backend() == "cpu":
        assert env["card"] == "cpu" and env["cudnn"] == env["driver"] == "n/a (cpu)"


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
    lines = table.strip().splitlines()
    assert lines[1].startswith("  mgd_jax: cpu, driver n/a (cpu), jax ")
    assert lines[2].startswith("  torch: cpu, driver n/a (cpu), torch ")
    jax_row, torch_row = lines[4:6]
    ratio = rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    assert jax_row.startswith(f"mgd_jax ({rows[0]['step']} step, {rows[0]['resize']})")
    assert jax_row.endswith(f"{ratio:.2f}x")
    assert torch_row.startswith("PyTorch port of the official step")
    assert rows[1]["label"] == "PyTorch port of the official step"
