"""`mgd-bench compile`: a recipe compiled by the real TPU compiler for a TPU topology, no TPU here
(workflows/tpu_compile.py); the full table in docs/ matches its JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgd_jax.workflows import tpu_compile

from conftest import need

ROOT = Path(__file__).resolve().parents[1]
TABLE_JSON = ROOT / "docs" / "tpu_compile.jsonl"
PERFORMANCE = ROOT / "docs" / "performance.md"

# Tiny supervised networks at 32 px on a 4-chip v5e slice: the whole tool path (topology, the
# trainer's step, the evaluator's step, costs, memory) in a short compile.
TINY = ["--topology=v5e:2x2", "--config=configs/voc.py:method=supervised",
        "--config.model.width=0.125", "--config.model.depths=1,1,1,1", "--config.crop_size=32",
        "--batch_size=4", "--config.eval.batch_size=4", "--config.eval.pad_to=(32, 32)",
        "--config.eval.crop=32"]


@pytest.mark.xdist_group("processes")
def test_a_tiny_recipe_compiles_for_a_tpu_topology():
    need("libtpu")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-m", "mgd_jax.tools.bench", "compile", *TINY,
                           "--max_batch"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    row = json.loads(lines[0])
    assert (row["topology"], row["chips"], row["devices"]) == ("v5e:2x2", 4, 4)
    # what a TPU runs, not this CPU host: bfloat16, and TPU's default step kind
    assert row["precision"] == "bfloat16" and row["step"] == "reference"
    assert row["resize"] == "matmul"  # TPU's upsampling, whatever this host's default
    capacity = row["hbm_capacity_bytes_per_chip"]
    assert capacity == 16 * 2**30
    for program in ("train", "eval"):
        numbers = row[program]
        assert 0 < numbers["hbm_bytes_per_chip"] < capacity, numbers
        assert numbers["compiled_flops_per_chip"] > 0 and numbers["model_flops_per_chip"] > 0
        assert math.isfinite(numbers["compiled_over_model_flops"])
        assert numbers["bytes_accessed_per_chip"] > 0
        floor = numbers["roofline_floor_ms_not_a_time"]
        assert floor == max(numbers["compute_floor_ms"], numbers["hbm_floor_ms"]) > 0
        assert numbers["fits"] is True
    assert row["fits"] is True
    assert row["libtpu"] and row["jax"]
    # a tiny network fits up to the search's limit: the recipe's batch (1 per chip), then the
    # limit itself, compiled for real
    assert row["max_batch_per_chip"] == row["max_batch_limit_per_chip"] == 64
    (b0, hbm0, fits0), (b1, hbm1, fits1) = row["max_batch_probes"]
    assert (b0, b1, fits0, fits1) == (1, 64, True, True)
    assert hbm0 == row["train"]["hbm_bytes_per_chip"] < hbm1 < capacity


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def test_unknown_topology_and_missing_libtpu_are_one_error_line(capsys, monkeypatch):
    from mgd_jax.tools import bench

    assert bench.main(["mgd-bench", "compile", "--topology=v9:2x2",
                       "--config=configs/voc.py:method=supervised"]) == 2
    err = _errors(capsys)
    assert err == ["error: --topology=v9:2x2: unknown TPU generation 'v9'; expected one of "
                   "v4, v5e, v5p, v6e (e.g. v5e:2x4)"]

    def no_libtpu(*args, **kwargs):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "make_pjrt_tpu_topology", no_libtpu)
    assert bench.main(["mgd-bench", "compile", "--topology=v5e:2x4",
                       "--config=configs/voc.py:method=supervised"]) == 2
    err = _errors(capsys)
    assert err == ["error: libtpu is not installed: install the tpu extra "
                   "(pip install -e '.[tpu]')"]


def test_the_out_of_memory_message_gives_the_bytes_needed():
    message = "Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
    assert tpu_compile._oom_bytes(message) == int(20.5 * 2**30)
    assert tpu_compile._oom_bytes("RESOURCE_EXHAUSTED: something else") is None


def test_libtpu_gets_compiler_thread_stacks_deep_enough_and_keeps_the_user_s_flags(monkeypatch):
    # libtpu reads them when it loads (the tiny compile above runs with them: libtpu accepts them)
    monkeypatch.setattr(os, "environ", {  # this process's environment stays as it was
        "LIBTPU_INIT_ARGS": "--xla_tpu_foo=1 --fibers_default_thread_stack_size=7"})
    tpu_compile.prepare_environment()
    args = os.environ["LIBTPU_INIT_ARGS"].split()
    assert args == ["--xla_tpu_foo=1", "--fibers_default_thread_stack_size=7",
                    f"--xla_internal_thread_stack_size_bytes={2**30}"]
    tpu_compile.prepare_environment()  # once only
    assert os.environ["LIBTPU_INIT_ARGS"].split() == args


def test_every_chip_of_the_table_has_its_datasheet():
    for topology in tpu_compile.TOPOLOGIES:
        chip = tpu_compile.chip_of(topology)
        assert chip.peak_bf16_tflops > 0 and chip.hbm_gib > 0 and chip.hbm_gb_per_s > 0
        assert chip.source.startswith("https://cloud.google.com/tpu/docs/")


def test_the_docs_table_is_the_json():
    """docs/performance.md's TPU table is `markdown_table` of docs/tpu_compile.jsonl, row for
    row, so the two cannot drift (the table may be partial: `mgd-bench compile --table` resumes)."""
    rows = tpu_compile.read_rows(TABLE_JSON)
    assert len({tpu_compile.row_key(r) for r in rows}) == len(rows), "a row is there twice"
    text = PERFORMANCE.read_text()
    assert tpu_compile.markdown_table(rows) in text, (
        "docs/performance.md's TPU table differs from docs/tpu_compile.jsonl; regenerate it: "
        "python -c 'from mgd_jax.workflows import tpu_compile as t; "
        "print(t.markdown_table(t.read_rows(\"docs/tpu_compile.jsonl\")))'")
    for row in rows:
        assert row["recipe"] in tpu_compile.RECIPES and row["topology"] in tpu_compile.TOPOLOGIES


def _brute_force_largest(hbm, unit: int, max_units: int, capacity: float) -> int:
    """The plain answer: every multiple of `unit` tried in order."""
    best = 0
    for k in range(1, max_units + 1):
        if hbm(k * unit) <= capacity:
            best = k * unit
    return best


@pytest.mark.parametrize("unit", [1, 2])
def test_the_largest_batch_search_gives_the_brute_force_answer(unit):
    """The search over per-device batches (one compile per probe in the tool; a stand-in HBM
    function here) finds what trying every batch finds, for HBM that is affine, curved, or has
    steps (monotone, as a compiler's choice of layouts can make it), with out-of-memory probes
    that report no bytes, a known first probe or none; and it compiles far fewer probes than
    the batches it rules out."""
    import numpy as np

    rng = np.random.default_rng(0)
    capacity = 16 * 2**30
    shapes = []
    for _ in range(60):
        fixed = rng.uniform(0.05, 0.9) * capacity
        per = rng.uniform(0.002, 0.5) * capacity
        curve = rng.uniform(0, 0.02) * capacity
        steps = rng.integers(1, 9)
        shapes.append(lambda b, f=fixed, p=per, c=curve, s=steps:
                      f + p * b + c * b * b / 8 + (b // s) * 0.01 * capacity)
        # a knee: affine up to near the capacity, then nearly flat (the compiler
        # rematerialising activations to fit) until it cannot
        knee = rng.uniform(0.85, 0.99) * capacity
        flat = rng.uniform(0.0005, 0.01) * capacity
        shapes.append(lambda b, f=fixed, p=per, k=knee, q=flat:
                      f + p * b if f + p * b < k else k + q * (f + p * b - k) / p)
    for hbm in shapes:
        for reports_oom_bytes in (True, False):
            for known_batch in (None, unit, 4 * unit):
                calls = []

                def fits(per_device, hbm=hbm, calls=calls, oom=reports_oom_bytes):
                    calls.append(per_device)
                    need = hbm(per_device)
                    ok = need <= capacity
                    return tpu_compile.Probe(per_device, int(need) if ok or oom else None, ok)

                known = None
                if known_batch is not None:
                    need = hbm(known_batch)
                    known = tpu_compile.Probe(known_batch, int(need), need <= capacity)
                found, probes = tpu_compile.search_largest_batch(
                    fits, unit=unit, max_units=32, capacity=capacity,
                    fixed_bytes=hbm(0), known=known)
                assert found == _brute_force_largest(hbm, unit, 32, capacity)
                assert len(set(calls)) == len(calls), "a batch compiled twice"
                assert all(c % unit == 0 and 0 < c <= 32 * unit for c in calls)
                assert len(calls) <= 12  # bisection over 33 candidates takes 6; never 2x more
                assert [p.per_device for p in probes] == ([known_batch] if known else []) + calls


def test_on_affine_hbm_the_largest_batch_takes_at_most_three_compiles():
    capacity = 16 * 2**30
    for fixed, per in ((1.2e9, 0.45e9), (3e9, 2.1e9), (0.4e9, 5.1e9), (8e9, 0.07e9)):
        calls = []

        def fits(b, fixed=fixed, per=per, calls=calls):
            calls.append(b)
            need = fixed + per * b
            return tpu_compile.Probe(b, int(need), need <= capacity)

        known = tpu_compile.Probe(1, int(fixed + per), fixed + per <= capacity)
        found, _ = tpu_compile.search_largest_batch(fits, unit=1, max_units=64,
                                                    capacity=capacity, fixed_bytes=fixed * 0.9,
                                                    known=known)
        assert found == min(64, int((capacity - fixed) // per)), (fixed, per)
        assert len(calls) <= 3, calls


def test_the_docs_table_shows_the_largest_batch_where_found():
    row = json.loads(TABLE_JSON.read_text().splitlines()[0])
    assert "| — |" in tpu_compile.markdown_row({k: v for k, v in row.items()
                                                if k != "max_batch_per_chip"})
    assert "| yes | 12 |" in tpu_compile.markdown_row({**row, "max_batch_per_chip": 12})


# A conv-BN-ReLU block compiled for v5e: S streams in one call with per-stream BatchNorm
# statistics (the fused step's `layers.BatchNorm.streams`) against S separate calls (the
# reference step) and against the merged batch normalised as one. Bytes accessed per chip.
_BN_STREAMS_PROBE = r"""
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mgd_jax.models import layers
from mgd_jax.workflows import tpu_compile

devices = tpu_compile.topology_devices("v5e:2x2")
mesh = Mesh(np.asarray(devices), ("data",))
data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
S, B, H, C = 4, 4, 32, 128

class Block(nn.Module):
    streams: int = 1

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.Conv(C, (3, 3), padding=1, use_bias=False, dtype=jnp.bfloat16)(x)
            x = jax.nn.relu(layers.BatchNorm(streams=self.streams, dtype=jnp.bfloat16)(x, True))
        return x

shapes = jax.eval_shape(lambda: Block().init(jax.random.key(0), jnp.zeros((2, 8, 8, C))))
variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
                         shapes)
def images(n):
    return jax.ShapeDtypeStruct((n, H, H, C), jnp.bfloat16, sharding=data)
programs = {
    "streams": (lambda v, x: Block(streams=S).apply(v, x, mutable=["batch_stats"])[0],
                images(B * S)),
    "separate": (lambda v, xs: [Block().apply(v, x, mutable=["batch_stats"])[0] for x in xs],
                 [images(B)] * S),
    "one_batch": (lambda v, x: Block().apply(v, x, mutable=["batch_stats"])[0], images(B * S)),
}
out = {}
for name, (fn, x) in programs.items():
    compiled = jax.jit(fn).lower(variables, x).compile()
    out[name] = tpu_compile._cost(compiled)["bytes accessed"]
print(json.dumps(out))
"""


@pytest.mark.xdist_group("processes")
def test_the_tpu_compiler_does_not_fuse_per_stream_batchnorm_statistics():
    """Why TPU's default is the reference step (`methods.base.FUSED_STEP_DEFAULT`,
    docs/performance.md): the TPU compiler fuses a BatchNorm's whole-batch statistics into the
    convolution before it, but not per-stream ones, so S streams in one call move far more bytes
    than S separate calls. If this fails, the compiler has learnt to: compile the fused step's
    rows again (`mgd-bench compile --table=... --table_steps=fused`) and reconsider the default."""
    need("libtpu")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", _BN_STREAMS_PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert moved["one_batch"] < 1.1 * moved["separate"], moved
    assert moved["streams"] > 1.8 * moved["separate"], moved
