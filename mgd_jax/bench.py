"""Train-step benchmark: compile time, ms/step, images/s, MFU and peak memory of a method.

    python -m mgd_jax.bench_main --config=configs/voc.py:method=mgd [--steps=10] [--warmup=2] \
        [--batch=16] [--json=OUT.json]
    # quick on a CPU: reduced networks and crop (any config field can be overridden)
    python -m mgd_jax.bench_main --config=configs/voc.py:method=supervised --steps=3 \
        --config.model.width=0.25 --config.model.depths=1,1,1,1 --config.crop_size=64

It times the real jitted training step (`train.train_step` with the method's loss, the optimizer,
donation, the batch sharded on the `data` mesh axis) on random inputs: no dataset is read, and for
`method=mgd` the two teachers are random networks built from `config.teacher_deep` /
`config.teacher_wide` (backbone, width, depths; `frozen_variables(random=True)`), so no checkpoint
is needed. Only the device step
is timed (one fixed batch, already on the devices), not the input pipeline.

Reported:
- compile: seconds to lower + compile the step (no persistent cache);
- ms/step: median of `--steps` timed steps after `--warmup` untimed ones (min / max too);
- images/s: global labeled + unlabeled images per step (batch x 3 for cps / mgd, x 1 for
  supervised), divided by the median step time;
- MFU: XLA's FLOP count of the compiled step (`compiled.cost_analysis()["flops"]`, per device
  for the SPMD-partitioned program) / step time / the device's peak dense bf16 FLOP/s
  (table below, or `--peak_tflops`); "n/a" on CPU or an unknown device;
- memory: the devices' peak bytes in use (`device.memory_stats()`, GPU / TPU) and XLA's static
  estimate for the step (arguments + outputs + temporaries - aliased).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgd_jax import methods, models, optim, parallel, train
from mgd_jax.data import cutmix
from mgd_jax.errors import ConfigError

# Peak dense bf16 FLOP/s per device, matched against `device.device_kind` (lower case, first
# match wins: specific names before generic ones).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v4", 275e12),
)


def peak_flops(device: Any) -> float | None:
    """Peak bf16 FLOP/s of one device, or None (CPU, unknown kind)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def random_batch(config: ml_collections.ConfigDict, batch_size: int, with_unlabeled: bool,
                 seed: int = 0) -> dict[str, Any]:
    """A host batch in the pipeline's train layout (uint8 images, CutMix box masks)."""
    rng = np.random.default_rng(seed)
    size = int(config.crop_size)

    def part(labeled: bool) -> dict[str, np.ndarray]:
        out = {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
               "valid": np.ones((batch_size, size, size), bool)}
        if labeled:
            label = rng.integers(0, config.num_classes, (batch_size, size, size))
            label[:, :, : size // 16] = 255  # a few ignored pixels, as on real data
            out["label"] = label.astype(np.int32)
        return out

    batch = {"labeled": part(True)}
    if with_unlabeled:
        batch["unlabeled_0"] = part(False)
        batch["unlabeled_1"] = part(False)
        batch["mask"] = np.stack([cutmix.box_mask(rng, (size, size)) for _ in range(batch_size)])
    return batch


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_bench(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
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
    variables = method.init_variables(jax.random.key(config.seed, impl="rbg"))
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(config.seed),
    )
    state = parallel.replicate(state, mesh)
    frozen = parallel.replicate(method.frozen_variables(random=True), mesh)
    local = random_batch(config, local_batch,
                         method.uses_unlabeled, seed=config.seed + jax.process_index())
    batch_arrays = parallel.global_batch(local, mesh)
    setup_s = time.perf_counter() - t0

    step_fn = jax.jit(functools.partial(train.train_step, method=method, tx=tx,
                                        schedule=schedule), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    try:
        mem = compiled.memory_analysis()
        static_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        static_bytes = None

    for _ in range(warmup):
        state, metrics = compiled(state, frozen, batch_arrays)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch_arrays)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    loss = float(jax.device_get(metrics["loss"]))

    device = jax.local_devices()[0]
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device)
    mfu = flops / step_s / peak if peak and np.isfinite(flops) else None
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use")]
    images = config.batch_size * (3 if method.uses_unlabeled else 1)
    dtype = jnp.dtype(models.compute_dtype(config.precision)).name
    result = {
        "method": config.method,
        "student": method.export_meta["backbone"],
        "devices": f"{n_dev} x {device.device_kind}",
        "compute_dtype": dtype,
        "global_batch": int(config.batch_size),
        "images_per_step": images,
        "crop_size": int(config.crop_size),
        "setup_s": setup_s,
        "compile_s": compile_s,
        "ms_per_step": 1e3 * step_s,
        "ms_min": 1e3 * min(times),
        "ms_max": 1e3 * max(times),
        "images_per_s": images / step_s,
        "flops_per_step_per_device": flops,
        "tflops_per_s_per_device": flops / step_s / 1e12 if np.isfinite(flops) else None,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": mfu,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "xla_step_memory_bytes": static_bytes,
        "loss": loss,
        "steps": steps,
        "warmup": warmup,
    }
    say(f"bench {config.method} ({result['student']}), {result['devices']}, {dtype} compute, "
        f"global batch {config.batch_size} ({images} images/step), crop {config.crop_size}")
    say(f"  setup      {setup_s:8.1f} s (networks, state, random batch)")
    say(f"  compile    {compile_s:8.1f} s")
    say(f"  step       {result['ms_per_step']:8.1f} ms median of {steps} "
        f"(min {result['ms_min']:.1f}, max {result['ms_max']:.1f}; {warmup} warm-up)")
    say(f"  throughput {result['images_per_s']:8.1f} images/s")
    tf = result["tflops_per_s_per_device"]
    say(f"  FLOPs      {flops / 1e9:8.4g} GFLOP/step/device (XLA), "
        + ("n/a" if tf is None else f"{tf:.4g} TFLOP/s/device"))
    if mfu is not None:
        note = " (float32 compute: bf16 peak is not its ceiling)" if dtype == "float32" else ""
        say(f"  MFU        {100 * mfu:8.1f} % of {peak / 1e12:.0f} TFLOP/s bf16 peak{note}")
    elif device.platform == "cpu":
        say("  MFU             n/a (CPU)")
    else:
        say(f"  MFU             n/a (no peak for {device.device_kind!r}: pass --peak_tflops)")
    say(f"  memory     peak {_fmt_bytes(result['peak_memory_bytes'])} in use; "
        f"XLA step estimate {_fmt_bytes(static_bytes)}")
    if not np.isfinite(loss):
        say(f"  warning: the loss is {loss} on random data")
    return result
