"""Train-step benchmark: compile time, ms/step, images/s, FLOPs, MFU and memory of a method's step,
optionally beside the reference step and a PyTorch port of the official step on the same device.

    mgd-bench step --config=configs/voc.py:method=mgd [--steps=20] \
        [--compare=reference,torch] [--json=OUT.json]
    # quick on a CPU: reduced networks and crop (any config field can be overridden)
    mgd-bench step --config=configs/voc.py:method=supervised \
        --steps=3 --config.model.width=0.25 --config.model.depths=1,1,1,1 --config.crop_size=64

It times the real jitted training step (`train.train_step` with the method's loss, the optimizer,
donation, the batch sharded on the `data` mesh axis) on random inputs: no dataset is read, and for
`method=mgd` the two teachers are random networks of `config.teacher_deep` / `config.teacher_wide`
(`frozen_variables(random=True)`). Only the device step is timed (one fixed batch on the devices).
It needs only jax, flax, optax, numpy, ml-collections and absl (no grain, tfds, OpenCV, clu or
orbax on this path), plus the `[torch]` extra for `--compare=torch`.

Reported (and printed as one JSON line per run):
- compile: seconds to lower + compile the step;
- ms/step: median of `steps` timed steps after `warmup` untimed ones (min / max too);
- images/s: labeled + unlabeled images per step (batch x 3 for cps / mgd) / median step time;
- FLOPs: counted from the step's program, 2 x multiply-adds of every convolution and matrix
  product in its jaxpr (forward and backward; `count_flops`), per device;
- MFU: those FLOPs / step time / a matmul rate measured on the device in the compute dtype
  (`matmul_tflops`; `peak_tflops` overrides it);
- memory: the device's peak bytes in use before the first step and after the timed steps (if the
  second is larger, the step set the peak), and XLA's static estimate of the step alone
  (arguments + outputs + temporaries - aliased).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgd_jax import methods, models, optim, train
from mgd_jax.data import cutmix
from mgd_jax.runtime import parallel
from mgd_jax.runtime.errors import ConfigError

COMPARE = ("reference", "torch")


def random_batch(config: ml_collections.ConfigDict, batch_size: int, with_unlabeled: bool,
                 seed: int = 0) -> dict[str, Any]:
    """A host batch in the pipeline's train layout (uint8 images and labels, CutMix masks)."""
    rng = np.random.default_rng(seed)
    size = int(config.crop_size)

    def part(labeled: bool) -> dict[str, np.ndarray]:
        out = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
               "valid": np.ones((batch_size, size, size), bool)}
        if labeled:
            label = rng.integers(0, config.num_classes, (batch_size, size, size))
            label[:, :, : size // 16] = 255  # a few ignored pixels, as on real data
            out["label"] = label.astype(np.uint8)
        return out

    batch = {"labeled": part(True)}
    if with_unlabeled:
        batch["unlabeled_0"] = part(False)
        batch["unlabeled_1"] = part(False)
        batch["mask"] = np.stack([cutmix.box_mask(rng, (size, size)) for _ in range(batch_size)])
    return batch


# ------------------------------------------------------------------------------------------------
# FLOPs from the program


def _subjaxprs(params: dict) -> list:
    out = []
    for value in params.values():
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):  # ClosedJaxpr
                out.append(item.jaxpr)
            elif hasattr(item, "eqns"):  # Jaxpr
                out.append(item)
    return out


def _conv_flops(eqn: Any) -> float:
    """2 x output elements x kernel taps x input channels per group; a transposed (input-
    gradient) convolution's zeros from lhs dilation are not counted."""
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    taps = math.prod(rhs[d] for d in spec[2:])
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out) * taps * rhs[spec[1]] / dilation


def _dot_flops(eqn: Any) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of the convolutions and matrix products of a jaxpr, nested ones included (a scan
    body counts `length` times, a cond its most expensive branch)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        subs = [jaxpr_flops(sub) for sub in _subjaxprs(eqn.params)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
        else:
            total += sum(subs) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def count_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of one call of `fn(*args)` (all devices together): `jaxpr_flops` of its jaxpr."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_tflops(dtype: Any, *, n: int | None = None, reps: int = 10) -> tuple[float, int]:
    """(TFLOP/s, n) of the best of `reps` n x n x n matrix products in `dtype` on the default
    device (n: 8192 on an accelerator, 1024 on CPU): the measured ceiling MFU is quoted against."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype)
            for i in range(2))
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12, n


# ------------------------------------------------------------------------------------------------
# The JAX step


def _peak_bytes() -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p]
    return max(peaks) if peaks else None


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_bench(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 2,
              batch: int | None = None, peak_tflops: float | None = None,
              verbose: bool = True) -> dict[str, Any]:
    """Compiles and times the method's train step; returns the numbers it prints."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    if batch:
        config.batch_size = int(batch)
    n_dev = jax.device_count()
    local_batch = parallel.process_share(config.batch_size, "batch_size")
    if config.batch_size % config.replica_batch:
        raise ConfigError(f"batch {config.batch_size} is not a multiple of "
                          f"config.replica_batch={config.replica_batch}")
    say = print if (verbose and jax.process_index() == 0) else (lambda *a, **k: None)

    t0 = time.perf_counter()
    method = methods.get(config)
    mesh = parallel.make_mesh()
    schedule = optim.poly_schedule(config.lr, 10_000, power=config.lr_power)
    tx = optim.make_optimizer(schedule, config.weight_decay, momentum=config.momentum)
    state = parallel.replicate(train.create_train_state(method, tx, config.seed), mesh)
    frozen = parallel.replicate(method.frozen_variables(random=True), mesh)
    local = random_batch(config, local_batch,
                         method.uses_unlabeled, seed=config.seed + jax.process_index())
    batch_arrays = parallel.global_batch(local, mesh)
    setup_s = time.perf_counter() - t0

    step = functools.partial(train.train_step, method=method, tx=tx, schedule=schedule)
    flops = count_flops(step, state, frozen, batch_arrays) / n_dev
    timed = _time_step(step, state, frozen, batch_arrays, steps=steps, warmup=warmup)
    times = timed.pop("times")
    step_s = statistics.median(times)

    device = jax.local_devices()[0]
    dtype = jnp.dtype(models.compute_dtype(config.precision)).name
    if peak_tflops:
        peak, matmul = peak_tflops * 1e12, f"--peak_tflops={peak_tflops:g}"
    else:
        rate, n = matmul_tflops(dtype)
        peak, matmul = rate * 1e12, f"measured {dtype} {n}x{n}x{n} matmul"
    images = method.images_per_step(config.batch_size)
    result = {
        "implementation": "mgd_jax",
        "step": "fused" if methods.base.fused(config) else "reference",
        "method": config.method,
        "student": method.export_meta["backbone"],
        "devices": f"{n_dev} x {device.device_kind}",
        "precision": dtype,
        "global_batch": int(config.batch_size),
        "images_per_step": images,
        "crop_size": int(config.crop_size),
        "setup_s": setup_s,
        "compile_s": timed["compile_s"],
        "ms_per_step": 1e3 * step_s,
        "ms_min": 1e3 * min(times),
        "ms_max": 1e3 * max(times),
        "images_per_s": images / step_s,
        "flops_per_step_per_device": flops,
        "tflops_per_s_per_device": flops / step_s / 1e12,
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": matmul,
        "mfu": flops / step_s / peak,
        "peak_memory_before_steps_bytes": timed["peak_before"],
        "peak_memory_bytes": timed["peak_after"],
        "xla_step_memory_bytes": timed["static_bytes"],
        "loss": timed["loss"],
        "steps": steps,
        "warmup": warmup,
        "jax": jax.__version__,
    }
    _say_result(result, say)
    return result


def _time_step(step: Callable, state: Any, frozen: Any, batch: Any, *, steps: int, warmup: int
               ) -> dict[str, Any]:
    """Compiles `step` and times `steps` calls after `warmup` ones: the compile seconds, the
    per-step seconds, the last loss, peak memory before / after the steps, XLA's estimate."""
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        static_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        static_bytes = None

    peak_before = _peak_bytes()
    for _ in range(warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "times": times, "loss": float(jax.device_get(metrics["loss"])),
            "peak_before": peak_before, "peak_after": _peak_bytes(),
            "static_bytes": static_bytes}


def _say_result(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The benchmark's lines, then `result` as one JSON line."""
    say(f"bench {result['method']} ({result['student']}, {result['step']} step), "
        f"{result['devices']}, {result['precision']} compute, global batch "
        f"{result['global_batch']} ({result['images_per_step']} images/step), "
        f"crop {result['crop_size']}")
    say(f"  setup      {result['setup_s']:8.1f} s (networks, state, random batch)")
    say(f"  compile    {result['compile_s']:8.1f} s")
    say(f"  step       {result['ms_per_step']:8.1f} ms median of {result['steps']} "
        f"(min {result['ms_min']:.1f}, max {result['ms_max']:.1f}; {result['warmup']} warm-up)")
    say(f"  throughput {result['images_per_s']:8.1f} images/s")
    say(f"  FLOPs      {result['flops_per_step_per_device'] / 1e12:8.4g} TFLOP/step/device "
        f"(convolutions and matmuls of the program), {result['tflops_per_s_per_device']:.4g} "
        "TFLOP/s/device")
    say(f"  MFU        {100 * result['mfu']:8.1f} % of {result['peak_tflops_per_device']:.4g} "
        f"TFLOP/s ({result['peak_source']})")
    peak_before, peak_after = result["peak_memory_before_steps_bytes"], result["peak_memory_bytes"]
    stepped = peak_after is not None and peak_before is not None and peak_after > peak_before
    say(f"  memory     peak {_fmt_bytes(peak_after)} in use"
        + ("" if peak_after is None or stepped else " (set before the steps)")
        + f"; XLA step estimate {_fmt_bytes(result['xla_step_memory_bytes'])}")
    if not np.isfinite(result["loss"]):
        say(f"  warning: the loss is {result['loss']} on random data")
    say(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# Side by side


def torch_precisions() -> tuple[str, ...]:
    """bf16 autocast is the fast setting on GPUs; on a CPU only fp32 is timed by default."""
    return ("fp32",) if jax.default_backend() == "cpu" else ("fp32", "bf16")


def compare(config: ml_collections.ConfigDict, what: Sequence[str], *, steps: int = 20,
            warmup: int = 2, batch: int | None = None, peak_tflops: float | None = None,
            precisions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The configured step, then each of `what` ("reference": `config.fused_step=False`;
    "torch": a PyTorch port of the official step, `pytorch/step.py`, in `precisions`) on the
    same device;
    prints one table with each row's speed-up over the PyTorch step of the same precision."""
    unknown = set(what) - set(COMPARE)
    if unknown:
        raise ConfigError(f"--compare: {sorted(unknown)} not in {COMPARE}")
    rows = [run_bench(config, steps=steps, warmup=warmup, batch=batch, peak_tflops=peak_tflops)]
    if "reference" in what:
        reference = ml_collections.ConfigDict(config.to_dict())
        reference.fused_step = not methods.base.fused(config)
        rows.append(run_bench(reference, steps=steps, warmup=warmup, batch=batch,
                              peak_tflops=peak_tflops))
    if "torch" in what:
        from mgd_jax.pytorch import step as torch_step  # local: the [torch] extra

        for precision in precisions or torch_precisions():
            row = torch_step.run(config, batch_size=rows[0]["global_batch"],
                                 precision=precision, steps=steps, warmup=warmup)
            print(json.dumps(row))
            rows.append(row)
    print(format_table(rows))
    return rows


def _torch_ms(rows: list[dict[str, Any]], precision: str) -> float | None:
    family = "bf16" if precision.startswith("bf") else "fp32"
    for row in rows:
        if row["implementation"] == "torch" and row["precision"].startswith(family):
            return row["ms_per_step"]
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of `compare` as a table; "vs torch" = PyTorch ms / this row's ms at the same
    precision family (float32 vs fp32, bfloat16 vs bf16 autocast)."""
    first = rows[0]
    lines = [
        f"{first['method']} step, student {first['student']}, {first['devices']}, crop "
        f"{first['crop_size']}, global batch {first['global_batch']} "
        f"({first['images_per_step']} images/step), median of {first['steps']} steps",
        f"{'implementation':<34} {'precision':<30} {'ms/step':>9} {'min':>9} {'peak mem':>10} "
        f"{'vs torch':>9}",
    ]
    for row in rows:
        name = (f"mgd_jax ({row['step']} step)" if row["implementation"] == "mgd_jax"
                else row.get("label", "PyTorch port of the official step"))
        torch_ms = _torch_ms(rows, row["precision"])
        ratio = (f"{torch_ms / row['ms_per_step']:.2f}x"
                 if torch_ms and row["implementation"] != "torch" else "")
        lines.append(f"{name:<34} {row['precision']:<30} {row['ms_per_step']:>9.1f} "
                     f"{row['ms_min']:>9.1f} {_fmt_bytes(row.get('peak_memory_bytes')):>10} "
                     f"{ratio:>9}")
    return "\n".join(lines)
