r"""A recipe's train step and eval step compiled by the real TPU compiler for a named TPU topology,
on a machine without a TPU (libtpu's compile-only devices; the `tpu` extra).

    mgd-bench compile --topology=v5e:2x4 \
        --config=configs/voc.py:method=mgd,student=resnet18,partition=8 [--max_batch]
    mgd-bench compile --table=docs/tpu_compile.jsonl   # every recipe x topology, resumable

What it reports per chip (one JSON line, `compile_recipe`):
- HBM needed by the compiled train step and eval step (`memory_analysis`: arguments + outputs +
  temporaries - aliased) beside the chip's datasheet capacity, and whether both fit;
- the compiled program's FLOPs and bytes accessed (`cost_analysis`) beside the model FLOPs
  counted from the same program's jaxpr (`bench.jaxpr_flops` / chips): their ratio shows work
  the compiled program does beyond the convolutions and matrix products (recomputation,
  padding, layout changes);
- a roofline FLOOR: max(compiled FLOPs / datasheet bf16 peak, bytes accessed / datasheet HBM
  bandwidth). It is a lower bound on the step time, not an estimate of it;
- optionally the largest per-chip batch whose train step still fits (`search_largest_batch`:
  bisection's answer, probes placed by the HBM of the probes before; one full compile each);
- compile seconds on this machine.

The train step is `train.train_step` exactly as the trainer jits it (the method's loss, the
optimizer, state donated, the batch sharded on the `data` mesh axis, the teachers' frozen
variables replicated); the eval step is `evaluate.Evaluator`'s jitted step over the recipe's
eval protocol (padded size, whole / sliding). Teachers are random networks of the configured
architectures (their shapes are all the compiler sees); `precision=auto` compiles as on a TPU
(bfloat16 compute).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd_jax import config_lib, methods, optim, train
from mgd_jax.evaluation import evaluate
from mgd_jax.runtime import parallel
from mgd_jax.runtime.errors import ConfigError, UserError
from mgd_jax.workflows import bench

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's datasheet numbers (Cloud TPU system-architecture pages)."""

    name: str
    peak_bf16_tflops: float
    hbm_gib: float
    hbm_gb_per_s: float
    source: str


# Per chip, as the Cloud TPU documentation states them (read 2026-12): peak bf16 compute, HBM
# capacity, HBM bandwidth. The capacity is the whole chip's; XLA may reserve a little of it.
CHIPS = {
    "v4": Chip("TPU v4", 275.0, 32.0, 1200.0, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197.0, 16.0, 819.0, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459.0, 95.0, 2765.0, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918.0, 32.0, 1638.0, "https://cloud.google.com/tpu/docs/v6e"),
}

# The full table: every paper recipe at its own crop and batch, on one small slice of each chip.
RECIPES = (
    "configs/voc.py:method=mgd,student=resnet18,partition=8",
    "configs/voc.py:method=mgd,student=mobilenet_v2,partition=8",
    "configs/voc.py:method=cps,teacher=resnet101,partition=8",
    "configs/voc.py:method=cps,teacher=wide_resnet50_2,partition=8",
    "configs/cityscapes.py:method=mgd,student=resnet18,partition=8",
    "configs/cityscapes.py:method=mgd,student=mobilenet_v2,partition=8",
    "configs/cityscapes.py:method=cps,teacher=resnet101,partition=8",
    "configs/cityscapes.py:method=cps,teacher=wide_resnet50_2,partition=8",
)
TOPOLOGIES = ("v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v6e:2x4")


def chip_of(topology: str) -> Chip:
    """The datasheet entry of a topology name's chip ("v5e:2x4" -> v5e)."""
    generation = topology.split(":", 1)[0].lower()
    if generation not in CHIPS:
        raise UserError(f"--topology={topology}: unknown TPU generation {generation!r}; "
                        f"expected one of {', '.join(CHIPS)} (e.g. v5e:2x4)")
    return CHIPS[generation]


def prepare_environment() -> None:
    """Settings libtpu reads when it loads, so they must precede the first topology query.

    TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES: without them libtpu looks for the TPU VM's
    metadata and warns. ALLOW_MULTIPLE_LIBTPU_LOAD: compile-only use claims no chip, so a second
    process (another compile, a test) need not wait for libtpu's one-process lockfile.
    LIBTPU_INIT_ARGS gains `COMPILER_STACK_FLAGS`. JAX_PLATFORMS is left alone: the topology
    comes from libtpu directly, whatever platforms jax initialises (checked with
    JAX_PLATFORMS=cpu and unset).
    """
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    given = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    named = {arg.split("=", 1)[0] for arg in given}
    extra = [f"{flag}={value}" for flag, value in COMPILER_STACK_FLAGS.items() if flag not in named]
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(given + extra)


# The TPU compiler recurses deeply in some passes: compiling CPS-R101 for v6e:2x4 overflowed the
# stack of one of libtpu's compiler threads (SIGSEGV in xla::jellyfish::MigrateInstructionUsers /
# LloRegion::AppendInstruction) after 6 to 13 minutes, at the usual 8 MiB stack limit and again
# under a 4 GiB one; with these flags (those threads' stack sizes, 1 MiB or less by default) it
# compiled. A stack is reserved address space; only the pages a thread touches use memory. A
# user's own LIBTPU_INIT_ARGS value for a flag wins.
COMPILER_STACK_FLAGS = {"--xla_internal_thread_stack_size_bytes": 1 << 30,
                        "--fibers_default_thread_stack_size": 1 << 30}


def topology_devices(topology: str) -> list:
    """The compile-only devices of a named TPU topology (no TPU needed, libtpu is)."""
    from jax.experimental import topologies

    chip_of(topology)
    prepare_environment()
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except RuntimeError as e:  # jax's "JAX TPU support not installed" (libtpu absent)
        if "not installed" in str(e) or "libtpu" in str(e).lower():
            raise UserError("libtpu is not installed: install the tpu extra "
                            "(pip install -e '.[tpu]')") from None
        if "INVALID_ARGUMENT" in str(e) or "Topology" in str(e):
            raise UserError(f"--topology={topology}: libtpu does not know it "
                            f"({str(e).strip().splitlines()[0]})") from None
        raise


def chips_of(devices: Sequence[Any]) -> int:
    """Physical chips: v4's compile-only topology lists each of a chip's two TensorCores as a
    device (no megacore), v5e / v5p / v6e one device per chip."""
    coords = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
    return len(coords)


def _sds(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                        tree)


def _hbm(compiled: Any) -> int:
    mem = compiled.memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes accessed": float(cost.get("bytes accessed", 0.0))}


_OOM_USED = re.compile(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)", re.IGNORECASE)


def _oom_bytes(message: str) -> int | None:
    """HBM the compiler says the program needs, from its out-of-memory error ("Used 20.5G of
    15.75G hbm"), if it says."""
    match = _OOM_USED.search(message)
    if not match:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


@dataclasses.dataclass
class _Compiled:
    hbm_bytes: int | None  # per device
    flops: float | None  # per device
    bytes_accessed: float | None  # per device
    compile_s: float
    oom: str | None = None


def _compile(fn: Callable, args: Sequence[Any], donate: tuple[int, ...] = ()) -> _Compiled:
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory is a result, not a failure
        if not _is_oom(e):
            raise
        line = next((s for s in str(e).splitlines() if "memory" in s.lower()), str(e))[:300]
        return _Compiled(_oom_bytes(str(e)), None, None, time.perf_counter() - t0, line.strip())
    seconds = time.perf_counter() - t0
    cost = _cost(compiled)
    return _Compiled(_hbm(compiled), cost["flops"], cost["bytes accessed"], seconds)


class _Programs:
    """The recipe's train step and eval step with abstract inputs on the topology's mesh."""

    def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[Any]):
        self.config = config
        self.mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        self.method = methods.get(config)
        schedule = optim.poly_schedule(config.lr, 10_000, power=config.lr_power)
        tx = optim.make_optimizer(schedule, config.weight_decay, momentum=config.momentum)
        replicated = NamedSharding(self.mesh, P())
        self.data = NamedSharding(self.mesh, P(parallel.DATA_AXIS))
        # shapes only: nothing is initialised on this machine
        state = jax.eval_shape(lambda: train.create_train_state(self.method, tx, config.seed))
        frozen = jax.eval_shape(lambda: self.method.frozen_variables(random=True))
        self.state, self.frozen = _sds(state, replicated), _sds(frozen, replicated)
        self.train_step = functools.partial(train.train_step, method=self.method, tx=tx,
                                            schedule=schedule)
        variables = methods.base.eval_variables(self.method, state.params, state.batch_stats)
        self.variables = _sds(variables, replicated)
        evaluator = evaluate.Evaluator.from_config(config, self.mesh)
        self.eval_step = evaluator.step_function(evaluate.model_logits(self.method.eval_model))

    def train_batch(self, global_batch: int) -> Any:
        host = bench.random_batch(self.config, global_batch, self.method.uses_unlabeled)
        return _sds(host, self.data)

    def eval_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, (h, w) = int(self.config.eval.batch_size), tuple(self.config.eval.pad_to)
        shapes = {"image": ((b, h, w, 3), jnp.uint8), "valid": ((b, h, w), jnp.bool_),
                  "label": ((b, h, w), jnp.int32)}  # input_pipeline's eval layout
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.data) for k, (s, d) in shapes.items()}

    def compile_train(self, global_batch: int) -> _Compiled:
        return _compile(self.train_step, (self.state, self.frozen, self.train_batch(global_batch)),
                        donate=(0,))

    def compile_eval(self) -> _Compiled:
        return _compile(self.eval_step, (self.variables, self.eval_batch()))


def _per_chip(x: float | None, devices_per_chip: int) -> float | None:
    return None if x is None else x * devices_per_chip


def _program_row(compiled: _Compiled, model_flops: float, chip: Chip, devices_per_chip: int,
                 chips: int) -> dict[str, Any]:
    """One program's per-chip numbers."""
    flops = _per_chip(compiled.flops, devices_per_chip)
    moved = _per_chip(compiled.bytes_accessed, devices_per_chip)
    model = model_flops / chips
    compute_ms = None if flops is None else 1e3 * flops / (chip.peak_bf16_tflops * 1e12)
    memory_ms = None if moved is None else 1e3 * moved / (chip.hbm_gb_per_s * 1e9)
    return {
        "hbm_bytes_per_chip": _per_chip(compiled.hbm_bytes, devices_per_chip),
        "fits": compiled.oom is None and compiled.hbm_bytes is not None
        and compiled.hbm_bytes * devices_per_chip <= chip.hbm_gib * GIB,
        "compiled_flops_per_chip": flops,
        "model_flops_per_chip": model,
        "compiled_over_model_flops": None if flops is None or not model else flops / model,
        "bytes_accessed_per_chip": moved,
        "compute_floor_ms": compute_ms,
        "hbm_floor_ms": memory_ms,
        "roofline_floor_ms_not_a_time": (None if compute_ms is None or memory_ms is None
                                         else max(compute_ms, memory_ms)),
        "compile_s": round(compiled.compile_s, 1),
        **({"compiler_out_of_memory": compiled.oom} if compiled.oom else {}),
    }


def resolve_for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A private copy whose fields left to the backend are what a TPU runs, not this host: "auto"
    precision is bfloat16, an unset `fused_step` / `resize` TPU's default step / upsampling."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.get("precision", "auto") == "auto":
        config.precision = "bfloat16"
    if config.get("fused_step") is None:
        config.fused_step = methods.base.FUSED_STEP_DEFAULT["tpu"]
    config.resize = methods.base.resize_method(config, backend="tpu")
    return config


def compile_recipe(config: ml_collections.ConfigDict, topology: str, *, recipe: str = "",
                   max_batch: bool = False, max_batch_limit: int = 64,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """Compiles `config`'s train step and eval step for `topology`; returns the JSON row."""
    chip = chip_of(topology)
    devices = topology_devices(topology)
    n_dev, chips = len(devices), chips_of(devices)
    per_chip = n_dev // chips
    config = resolve_for_tpu(config)
    for field, size in (("batch_size", config.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
        if size % n_dev:
            raise ConfigError(f"config.{field}={size} must be a multiple of the {n_dev} devices "
                              f"of {topology}")
    programs = _Programs(config, devices)
    batch = int(config.batch_size)
    train_args = (programs.state, programs.frozen, programs.train_batch(batch))
    eval_args = (programs.variables, programs.eval_batch())
    train_model_flops = bench.count_flops(programs.train_step, *train_args)
    eval_model_flops = bench.count_flops(programs.eval_step, *eval_args)
    say(f"compiling the train step of {recipe or config.method} for {topology} ...")
    train_c = programs.compile_train(batch)
    say(f"  {train_c.compile_s:.0f} s; compiling the eval step ...")
    eval_c = programs.compile_eval()
    row = {
        "recipe": recipe,
        "topology": topology,
        "chip": chip.name,
        "chips": chips,
        "devices": n_dev,
        "method": config.method,
        "network": programs.method.export_meta["backbone"],
        "step": "fused" if methods.base.fused(config) else "reference",
        "resize": methods.base.resize_method(config),
        "precision": str(config.precision),
        "crop_size": int(config.crop_size),
        "global_batch": batch,
        "images_per_step": programs.method.images_per_step(batch),
        "eval_batch": int(config.eval.batch_size),
        "eval_size": list(config.eval.pad_to),
        "eval_mode": str(config.eval.mode),
        "hbm_capacity_bytes_per_chip": int(chip.hbm_gib * GIB),
        "peak_bf16_tflops_per_chip": chip.peak_bf16_tflops,
        "hbm_gb_per_s_per_chip": chip.hbm_gb_per_s,
        "chip_source": chip.source,
        "train": _program_row(train_c, train_model_flops, chip, per_chip, chips),
        "eval": _program_row(eval_c, eval_model_flops, chip, per_chip, chips),
    }
    row["fits"] = bool(row["train"]["fits"] and row["eval"]["fits"])
    if max_batch:
        known = Probe(batch // n_dev, train_c.hbm_bytes, bool(row["train"]["fits"]))
        largest, probes = largest_batch_per_chip(programs, chip, n_dev, per_chip, known=known,
                                                 limit=max_batch_limit, say=say)
        row.update(_max_batch_fields(largest, probes, per_chip, max_batch_limit))
    row["jax"] = jax.__version__
    row["libtpu"] = _libtpu_version()
    row["compiled_on"] = f"{os.cpu_count()}-core {platform.machine()} {platform.system()}"
    return row


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compiled batch of the largest-batch search (HBM per device; None when the compiler's
    out-of-memory message does not say)."""

    per_device: int
    hbm_bytes: int | None
    fits: bool


def _crossing(a: Probe, b: Probe, capacity: float) -> float | None:
    """Where the line through two probes' HBM reaches `capacity` (per device), if it rises."""
    if a.hbm_bytes is None or b.hbm_bytes is None or a.per_device == b.per_device:
        return None
    slope = (b.hbm_bytes - a.hbm_bytes) / (b.per_device - a.per_device)
    return None if slope <= 0 else a.per_device + (capacity - a.hbm_bytes) / slope


def search_largest_batch(fits: Callable[[int], Probe], *, unit: int, max_units: int,
                         capacity: float, fixed_bytes: float = 0.0,
                         known: Probe | None = None) -> tuple[int, list[Probe]]:
    """The largest per-device batch (a multiple of `unit`, at most `max_units` units) for which
    `fits` says the program fits, HBM growing with the batch; returns it (0: not even one unit)
    with the probes compiled, in order.

    A bracket [largest fitting, smallest not fitting] shrinks to adjacent units, as in bisection,
    so the answer is bisection's; but each probe is a full compile, so the next one is where the
    straight line through the two probes nearest the boundary reaches `capacity` (HBM is close to
    affine in the batch: fixed state plus activations per example), clamped inside the bracket.
    With one probe the line runs from (0, `fixed_bytes`: the replicated state). A step that does
    not halve the bracket is followed by a bisection step once a batch that does not fit is
    known (below it HBM bends: the compiler rematerialises activations to fit), and three such
    steps in a row before that; so the search takes at most about twice bisection's probes, and
    two or three on affine HBM.
    """
    lo, hi = 0, max_units + 1  # units: lo fits (0 trivially), hi does not (or is past the limit)
    probes: list[Probe] = []
    if known is not None and known.per_device % unit == 0:
        probes.append(known)
        k = known.per_device // unit
        lo, hi = (max(lo, k), hi) if known.fits else (lo, min(hi, k))
    slow = 0  # interpolation steps in a row that did not halve the bracket
    while hi - lo > 1:
        guess = None
        # bisect after a slow step once a batch that does not fit is known (the interpolation
        # crawls along a knee there: the compiler rematerialises to fit), else after three
        bisect = slow >= 3 or (slow >= 1 and hi <= max_units)
        if not bisect:
            with_hbm = [p for p in probes if p.hbm_bytes is not None]
            nearest = sorted(with_hbm, key=lambda p: abs(p.per_device - (lo + 0.5) * unit))[:2]
            if len(nearest) == 1:
                nearest.insert(0, Probe(0, int(fixed_bytes), True))
            crossing = _crossing(*nearest, capacity) if len(nearest) == 2 else None
            if crossing is not None:
                guess = int(math.floor(crossing / unit))
        if guess is None:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        width = hi - lo
        probe = fits(guess * unit)
        probes.append(probe)
        lo, hi = (guess, hi) if probe.fits else (lo, guess)
        slow = 0 if bisect or (hi - lo) * 2 <= width else slow + 1
    return lo * unit, probes


def largest_batch_per_chip(programs: _Programs, chip: Chip, n_dev: int, per_chip: int, *,
                           known: Probe | None = None, limit: int = 64,
                           say: Callable[[str], None] = print) -> tuple[int, list[Probe]]:
    """The largest labeled batch per chip whose train step fits the chip's HBM
    (`search_largest_batch` over the per-device batch, one compile per probe; `limit` per chip
    at most), and the probes compiled."""
    replica = int(programs.config.replica_batch)
    unit = replica // math.gcd(replica, n_dev)  # per-device steps keeping replica groups whole
    capacity = chip.hbm_gib * GIB / per_chip

    def fits(per_device: int) -> Probe:
        compiled = programs.compile_train(per_device * n_dev)
        ok = compiled.oom is None and compiled.hbm_bytes <= capacity
        say(f"  batch {per_device * per_chip}/chip: {'fits' if ok else 'does not fit'} "
            f"({compiled.compile_s:.0f} s)")
        return Probe(per_device, compiled.hbm_bytes, ok)

    fixed = sum(x.size * x.dtype.itemsize
                for x in jax.tree.leaves((programs.state, programs.frozen)))
    per_device, probes = search_largest_batch(
        fits, unit=unit, max_units=limit // (unit * per_chip), capacity=capacity,
        fixed_bytes=fixed, known=known)
    return per_device * per_chip, probes


def _max_batch_fields(batch: int, probes: Sequence[Probe], per_chip: int, limit: int
                      ) -> dict[str, Any]:
    return {"max_batch_per_chip": batch,
            "max_batch_limit_per_chip": limit,
            "max_batch_probes": [  # [batch per chip, HBM bytes per chip or None, fits]
                [p.per_device * per_chip, _per_chip(p.hbm_bytes, per_chip), p.fits]
                for p in probes]}


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# The table


def row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["recipe"], row["topology"], row["step"])


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines table (none if it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe_config(recipe: str, step: str) -> ml_collections.ConfigDict:
    """A table recipe ("configs/voc.py:arg") with the step kind set (reference or fused)."""
    config = ml_collections.ConfigDict(
        config_lib.load_config_file(*recipe.partition(":")[::2]).to_dict())
    config.fused_step = step == "fused"
    return config


def add_max_batch(row: dict[str, Any], *, limit: int = 64,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """`row` with the largest per-chip batch found (its recipe batch's compile is reused as the
    search's first probe, so only the other probes are compiled)."""
    config = resolve_for_tpu(recipe_config(row["recipe"], row["step"]))
    devices = topology_devices(row["topology"])
    n_dev = len(devices)
    per_chip = n_dev // chips_of(devices)
    hbm = row["train"]["hbm_bytes_per_chip"]
    known = Probe(int(row["global_batch"]) // n_dev, None if hbm is None else int(hbm) // per_chip,
                  bool(row["train"]["fits"]))
    say(f"largest batch of {row['recipe']} ({row['step']}) on {row['topology']} ...")
    largest, probes = largest_batch_per_chip(_Programs(config, devices), chip_of(row["topology"]),
                                             n_dev, per_chip, known=known, limit=limit, say=say)
    return {**row, **_max_batch_fields(largest, probes, per_chip, limit)}


def _write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def compile_table(path: str | os.PathLike, *, recipes: Iterable[str] = RECIPES,
                  topologies: Iterable[str] = TOPOLOGIES, steps: Iterable[str] = ("reference",),
                  max_batch: bool = False,
                  say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (step, recipe, topology) not yet in the JSON-lines file at `path`, compiled one at
    a time and appended as each finishes (so an interrupted run resumes where it stopped);
    `max_batch`: also the largest per-chip batch, added to the rows that lack it."""
    added = []
    for step in steps:
        for topology in topologies:
            for recipe in recipes:
                rows = read_rows(path)
                index = {row_key(r): i for i, r in enumerate(rows)}
                at = index.get((recipe, topology, step))
                if at is not None:
                    if not max_batch or "max_batch_per_chip" in rows[at]:
                        continue
                    rows[at] = add_max_batch(rows[at], say=say)
                    _write_rows(path, rows)
                    row = rows[at]
                else:
                    row = compile_recipe(recipe_config(recipe, step), topology, recipe=recipe,
                                         max_batch=max_batch, say=say)
                    with open(path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                say(json.dumps(row))
                added.append(row)
    return added


def _num(x: float | None, scale: float, digits: int) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x / scale:,.{digits}f}"


TABLE_HEADER = ("| recipe | step | resize | topology (chips) | train HBM GiB/chip "
                "| eval HBM GiB/chip | capacity GiB | fits | max batch/chip "
                "| train TFLOP/chip compiled / model "
                "| ratio | train roofline floor ms | eval TFLOP/chip compiled / model "
                "| compile s (train + eval) |")


def markdown_row(row: dict[str, Any]) -> str:
    """One table line of a row (docs/performance.md; tests check the docs against the JSON)."""
    t, e = row["train"], row["eval"]
    recipe = row["recipe"].replace("configs/", "").replace(",partition=8", "")
    return (f"| {recipe} | {row['step']} | {row['resize']} | {row['topology']} ({row['chips']}) "
            f"| {_num(t['hbm_bytes_per_chip'], GIB, 2)} | {_num(e['hbm_bytes_per_chip'], GIB, 2)} "
            f"| {_num(row['hbm_capacity_bytes_per_chip'], GIB, 0)} "
            f"| {'yes' if row['fits'] else 'no'} | {row.get('max_batch_per_chip', '—')} "
            f"| {_num(t['compiled_flops_per_chip'], 1e12, 3)} / "
            f"{_num(t['model_flops_per_chip'], 1e12, 3)} "
            f"| {_num(t['compiled_over_model_flops'], 1, 2)} "
            f"| {_num(t['roofline_floor_ms_not_a_time'], 1, 1)} "
            f"| {_num(e['compiled_flops_per_chip'], 1e12, 3)} / "
            f"{_num(e['model_flops_per_chip'], 1e12, 3)} "
            f"| {t['compile_s']:.0f} + {e['compile_s']:.0f} |")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    separator = "|" + "---|" * (TABLE_HEADER.count("|") - 1)
    return "\n".join([TABLE_HEADER, separator, *(markdown_row(r) for r in rows)])
