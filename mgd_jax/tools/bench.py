r"""Benchmarks: the training step, the input pipeline, and the networks' sizes.

    mgd-bench step --config=configs/voc.py:method=mgd [--steps=20] [--json=OUT] \
        [--compare=fused,torch | --implementation=mgd_jax|fused|reference|torch]
    mgd-bench table --rows=DIR [--json=OUT]
    mgd-bench data [--dataset=voc --data_dir=DIR] [--num_workers=0,2,4]
    mgd-bench models [--size=512] [--num_classes=21]
    mgd-bench compile --topology=v5e:2x4 --config=configs/voc.py:method=mgd [--max_batch]
    mgd-bench compile --table=docs/tpu_compile.jsonl [--topology=...] [--table_steps=reference]

`step` times the jitted train step on random inputs (`bench.run_bench`), with `--compare` also the
other step kind and a PyTorch port of the official step (`bench.compare`), with `--implementation`
one of them alone (`bench.run_one`: one process per row, as launch/gpu_bench.sh runs them; a torch
run leaves JAX off the devices); `table` prints the rows such runs wrote to
DIR/<configuration>/<implementation>.json as one table per configuration (`bench.gather`); `data`
measures the grain pipeline's augmented examples per second, on a prepared split or on in-memory
VOC-sized JPEGs (`data.bench`); `models` prints parameters and FLOPs per backbone
(`models.summary`); `compile` compiles a recipe's train step and eval step with the real TPU
compiler for a named TPU topology, no TPU needed (the `tpu` extra: libtpu), and prints per-chip
HBM, FLOPs and the roofline floor as one JSON line per topology (`tpu_compile.compile_recipe`);
with --table every paper recipe for every --topology, appended to a JSON-lines file and resumable
(`tpu_compile.compile_table`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

from absl import flags
from ml_collections import config_flags

from mgd_jax.runtime.errors import UserError
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
# step
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "step / data: config file with ':key=value,...' arguments.",
    flag_values=FLAGS, lock_config=True,
)
_STEPS = flags.DEFINE_integer("steps", 20, "step: timed steps (median reported).",
                              flag_values=FLAGS)
_COMPARE = flags.DEFINE_list("compare", [], "step: also time these on the same device: "
                             "fused / reference (config.fused_step=True / False, unless it is "
                             "the configured step), torch (a PyTorch port of the official step; "
                             "the [torch] extra).", flag_values=FLAGS)
_TORCH_PRECISIONS = flags.DEFINE_list("torch_precisions", None, "step: PyTorch precisions for "
                                      "--compare=torch (fp32, bf16; default: fp32 on CPU, both "
                                      "on an accelerator).", flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "step: untimed steps after compilation.",
                               flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Labeled batch (step: global, default "
                                   "config.batch_size; data: per host, default 8).",
                                   flag_values=FLAGS)
_PEAK = flags.DEFINE_float("peak_tflops", None, "step: TFLOP/s per device MFU is quoted "
                           "against (default: a matmul rate measured on the device).",
                           flag_values=FLAGS)
_IMPLEMENTATION = flags.DEFINE_enum("implementation", None,
                                     ["mgd_jax", "fused", "reference", "torch"],
                                     "step: time this one alone: mgd_jax (the configured step), "
                                     "fused / reference (that step kind), torch (the PyTorch "
                                     "port, in --torch_precisions); not with --compare.",
                                     flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)
# table
_ROWS = flags.DEFINE_string("rows", None, "table: the folder of <configuration>/<implementation>"
                            ".json rows (launch/gpu_bench.sh's OUT/rows).", flag_values=FLAGS)
# data
_DATASET = flags.DEFINE_string("dataset", "", "data: a prepared dataset (default: the config's, "
                               "else fake VOC-sized JPEGs).", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "data: prepared datasets.",
                                flag_values=FLAGS)
_SPLIT = flags.DEFINE_string("split", "train", "data: the split both streams read.",
                             flag_values=FLAGS)
_CROP_SIZE = flags.DEFINE_integer("crop_size", None, "data: square training crop (default: "
                                  "config.crop_size, else 512).", flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_list("num_workers", ["0", "1", "2"], "data: grain worker counts "
                                 "to measure.", flag_values=FLAGS)
_SECONDS = flags.DEFINE_float("seconds", 15.0, "data: seconds per worker count.",
                              flag_values=FLAGS)
_READ_THREADS = flags.DEFINE_integer("read_threads", 1, "data: grain read threads per process.",
                                     flag_values=FLAGS)
_LABELED_ONLY = flags.DEFINE_bool("labeled_only", False, "data: the labeled stream only.",
                                  flag_values=FLAGS)
_FAKE_SIZE = flags.DEFINE_string("fake_size", "375x500", "data: HxW of the fake images.",
                                 flag_values=FLAGS)
_FAKE_COUNT = flags.DEFINE_integer("fake_count", 256, "data: distinct fake examples.",
                                   flag_values=FLAGS)
# models
_SIZE = flags.DEFINE_integer("size", 512, "models: square input size.", flag_values=FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 21, "models: classes.", flag_values=FLAGS)
# compile
_TOPOLOGY = flags.DEFINE_list("topology", [], "compile: TPU topologies, e.g. v5e:2x4,v4:2x2x1 "
                              "(default with --table: v4:2x2x1,v5e:2x4,v5p:2x2x1,v6e:2x4).",
                              flag_values=FLAGS)
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "compile: also find the largest per-chip "
                               "batch whose train step fits (one full compile per probe); with "
                               "--table, also for the rows that lack it.",
                               flag_values=FLAGS)
_TABLE = flags.DEFINE_string("table", None, "compile: compile every paper recipe for every "
                             "--topology, appending one JSON line per (recipe, topology, step) "
                             "to this file; rows already in it are skipped.", flag_values=FLAGS)
_TABLE_STEPS = flags.DEFINE_list("table_steps", ["reference"], "compile --table: the steps "
                                 "(reference: config.fused_step=False, fused), in this order.",
                                 flag_values=FLAGS)


def _step() -> dict | list:
    from mgd_jax.workflows import bench

    if _CONFIG.value is None:
        raise UserError("step needs --config")
    options = dict(steps=_STEPS.value, warmup=_WARMUP.value, batch=_BATCH_SIZE.value,
                   peak_tflops=_PEAK.value)
    if _IMPLEMENTATION.value:
        if _COMPARE.value:
            raise UserError("--implementation times one implementation: not with --compare")
        rows = bench.run_one(_CONFIG.value, _IMPLEMENTATION.value,
                             precisions=_TORCH_PRECISIONS.value, **options)
        return rows[0] if len(rows) == 1 else rows
    if not _COMPARE.value:
        return bench.run_bench(_CONFIG.value, **options)
    return bench.compare(_CONFIG.value, _COMPARE.value, precisions=_TORCH_PRECISIONS.value,
                         **options)


def _data() -> list:
    from mgd_jax.data import augment, bench
    from mgd_jax.data.sources import open_split

    config = _CONFIG.value
    dataset = _DATASET.value or (config.dataset if config else "")
    data_dir = _DATA_DIR.value if _DATA_DIR.present or not config else config.data_dir
    crop = _CROP_SIZE.value or (config.crop_size if config else 512)
    scales = tuple(config.scales) if config else augment.TRAIN_SCALES
    if dataset:
        source = open_split(dataset, _SPLIT.value, os.path.expanduser(data_dir))
        what = f"{dataset}:{_SPLIT.value} ({len(source)} examples) from {data_dir}"
    else:
        h, w = (int(v) for v in _FAKE_SIZE.value.lower().split("x"))
        source = bench.FakeJpegSource(_FAKE_COUNT.value, (h, w), seed=0)
        what = f"fake {h}x{w} JPEG/PNG decoded per access ({len(source)} distinct)"
    return bench.run(source, workers=[int(k) for k in _NUM_WORKERS.value],
                     batch_size=_BATCH_SIZE.value or 8, crop_size=crop, scales=scales,
                     seconds=_SECONDS.value, read_threads=_READ_THREADS.value,
                     labeled_only=_LABELED_ONLY.value, seed=config.seed if config else 0,
                     description=what)


def _table() -> dict:
    from mgd_jax.workflows import bench

    if not _ROWS.value:
        raise UserError("table needs --rows")
    groups = bench.gather(_ROWS.value)
    if not groups:
        raise UserError(f"--rows={_ROWS.value}: no <configuration>/<implementation>.json rows")
    print(bench.format_groups(groups))
    return groups


def _models() -> list:
    from mgd_jax.models import summary

    return summary.print_summary(_SIZE.value, _NUM_CLASSES.value)


def _compile() -> list:
    from mgd_jax import config_lib
    from mgd_jax.workflows import tpu_compile

    if _TABLE.value:
        unknown = set(_TABLE_STEPS.value) - {"reference", "fused"}
        if unknown:
            raise UserError(f"--table_steps: {sorted(unknown)} not in reference, fused")
        return tpu_compile.compile_table(_TABLE.value,
                                         topologies=_TOPOLOGY.value or tpu_compile.TOPOLOGIES,
                                         steps=_TABLE_STEPS.value,
                                         max_batch=_MAX_BATCH.value)
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise UserError("compile needs --config and --topology (or --table)")
    config = _CONFIG.value
    if _BATCH_SIZE.value:
        config = tpu_compile.resolve_for_tpu(config)
        config.batch_size = _BATCH_SIZE.value
    overrides = config_lib.flatten(config_flags.get_override_values(FLAGS["config"]))
    recipe = " ".join([config_flags.get_config_filename(FLAGS["config"]),
                       *(f"--config.{k}={v}" for k, v in sorted(overrides.items()))])
    rows = []
    for topology in _TOPOLOGY.value:
        row = tpu_compile.compile_recipe(config, topology, recipe=recipe,
                                         max_batch=_MAX_BATCH.value)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _bench(measure: Callable[[], dict | list]) -> Callable[[], None]:
    """The subcommand that runs `measure` and writes its results to --json too."""

    def body() -> None:
        result = measure()
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(result, f, indent=2)

    return body


def main(argv: Sequence[str]) -> int:
    commands = {"step": _bench(_step), "data": _bench(_data), "models": _bench(_models),
                "compile": _bench(_compile), "table": _bench(_table)}
    # compile runs no step on this machine's devices: no multi-process start-up; a topology's
    # devices come from libtpu whatever platforms jax initialises
    compiling = any(arg == "compile" for arg in argv[1:] if not arg.startswith("-"))
    if compiling:
        from mgd_jax.workflows import tpu_compile

        tpu_compile.prepare_environment()  # before anything can load libtpu
    return cli.run(FLAGS, argv, commands,
                   distributed=not (compiling or _without_jax_devices(argv[1:])))


def _without_jax_devices(args: Sequence[str]) -> bool:
    """`table`, and `step --implementation=torch`, whose process leaves the devices to PyTorch."""
    if "table" in args:
        return True
    for i, arg in enumerate(args):
        if arg == "--implementation" and i + 1 < len(args):
            return args[i + 1] == "torch"
        if arg.startswith("--implementation="):
            return arg.split("=", 1)[1] == "torch"
    return False


run = cli.entry(main)

if __name__ == "__main__":  # required: grain workers are spawned and re-import the main module
    sys.exit(run())
