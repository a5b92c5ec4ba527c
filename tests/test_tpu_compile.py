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
    proc = subprocess.run([sys.executable, "-m", "mgd_jax.tools.bench", "compile", *TINY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    row = json.loads(lines[0])
    assert (row["topology"], row["chips"], row["devices"]) == ("v5e:2x2", 4, 4)
    # what a TPU runs, not this CPU host: bfloat16, and TPU's default step kind
    assert row["precision"] == "bfloat16" and row["step"] == "reference"
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
