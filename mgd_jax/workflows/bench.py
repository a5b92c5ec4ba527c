"""Train-step benchmark: compile time, ms/step, images/s, FLOPs, MFU and memory of a method's step,
optionally beside the reference step and a PyTorch port of the official step on the same device.

    mgd-bench step --config=configs/voc.py:method=mgd [--steps=20] \
        [--compare=fused,torch] [--json=OUT.json]
    # quick on a CPU: reduced networks and crop (any config field can be overridden)
    mgd-bench step --config=configs/voc.py:method=supervised \
        --steps=3 --config.model.width=0.25 --config.model.depths=1,1,1,1 --config.crop_size=64

It times the real jitted training step (`train.train_step` with the method's loss, the optimizer,
donation, the batch sharded on the `data` mesh axis) on random inputs: no dataset is read, and for
`method=mgd` the two teachers are random networks of `config.teacher_deep` / `config.teacher_wide`
(`frozen_variables(random=True)`). Only the device step is timed (one fixed batch on the devices).
It needs only jax, flax, optax, numpy, ml-collections and absl (no grain, tfds, OpenCV, clu or
orbax on this path), plus the `[torch]` extra for `--compare=torch`.

`run_one` times one implementation per process (`mgd-bench step --implementation=...`, what
launch/gpu_bench.sh runs: one out-of-memory error loses one row), `gather` / `format_groups` put
the rows of such runs back into one table per configuration (`mgd-bench table`).

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
  (arguments + outputs + temporaries - aliased);
- the machine: card, NVIDIA driver, CUDA and cuDNN versions as the framework sees them, jax /
  jaxlib or torch, Python ("n/a (...)" where there is none, e.g. on a CPU); whether the step's
  program came from the persistent compilation cache (then compile is a load time).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
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

# The step kinds by name (`config.fused_step`), and what `compare` / `run_one` time: "mgd_jax" is
# the configured step (unset: the backend's default, methods.base.FUSED_STEP_DEFAULT).
STEP_KINDS = ("fused", "reference")
COMPARE = (*STEP_KINDS, "torch")
IMPLEMENTATIONS = ("mgd_jax", *STEP_KINDS, "torch")


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
# The machine a row was measured on


def nvidia_driver() -> str:
    """The NVIDIA driver's version (the kernel module's, else nvidia-smi's), else why not."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+([0-9][0-9.]*)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "n/a (no NVIDIA driver found)"


def cudnn_text(version: int | None) -> str | None:
    """cuDNN's integer version as major.minor.patch (9.x: M*10000 + m*100 + p; 8.x: M*1000...)."""
    if not version:
        return None
    base = 10000 if version >= 90000 else 1000
    return f"{version // base}.{version % base // 100}.{version % 100}"


def _cuda_text(version: int | None) -> str | None:
    return f"{version // 1000}.{version % 1000 // 10}" if version else None


def jax_environment() -> dict[str, Any]:
    """card, driver, CUDA / cuDNN (those jax's CUDA plugin was loaded with), jax, jaxlib, Python."""
    import jaxlib

    device = jax.local_devices()[0]
    env = {"card": device.device_kind if device.platform != "cpu" else "cpu",
           "platform": device.platform, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "python": platform.python_version()}
    if device.platform != "gpu":
        return {**env, "driver": f"n/a ({device.platform})", "cuda": f"n/a ({device.platform})",
                "cudnn": f"n/a ({device.platform})"}
    cuda = cudnn = None
    try:  # private: the versions module of the CUDA plugin jax loaded (absent on ROCm)
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            cuda = _cuda_text(cuda_versions.cuda_runtime_get_version())
            cudnn = cudnn_text(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - a jax without that private module: say so, don't fail
        pass
    return {**env, "driver": nvidia_driver(), "cuda": cuda or "n/a (not reported by jax)",
            "cudnn": cudnn or "n/a (not reported by jax)"}


def torch_environment(torch: Any, device: str) -> dict[str, Any]:
    """card, driver, CUDA / cuDNN (PyTorch's build), torch, Python, for a row on `device`."""
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if device != "cuda":
        return {**env, "card": "cpu", "driver": f"n/a ({device})", "cuda": f"n/a ({device})",
                "cudnn": f"n/a ({device})"}
    return {**env, "card": torch.cuda.get_device_name(0), "driver": nvidia_driver(),
            "cuda": torch.version.cuda or "n/a (not a CUDA build)",
            "cudnn": cudnn_text(torch.backends.cudnn.version()) or "n/a (no cuDNN)"}


_CACHE_HITS: list[int] = []  # programs loaded from the persistent compilation cache; [] = unwatched


def _count_cache_hits(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


def _cache_hits() -> int:
    """Cache hits in this process so far (the listener is registered on the first call)."""
    if not _CACHE_HITS:
        _CACHE_HITS.append(0)
        jax.monitoring.register_event_listener(_count_cache_hits)
    return _CACHE_HITS[0]


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
    # one trace serves the FLOP count and the compilation (a full step's trace takes seconds)
    hits = _cache_hits()
    t0 = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0,)).trace(state, frozen, batch_arrays)
    trace_s = time.perf_counter() - t0
    flops = jaxpr_flops(traced.jaxpr.jaxpr) / n_dev
    timed = _time_step(traced, state, frozen, batch_arrays, steps=steps, warmup=warmup)
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
        "step": step_kind(config),
        "resize": methods.base.resize_method(config),
        "method": config.method,
        "student": method.export_meta["backbone"],
        "devices": f"{n_dev} x {device.device_kind}",
        "precision": dtype,
        "global_batch": int(config.batch_size),
        "images_per_step": images,
        "crop_size": int(config.crop_size),
        "setup_s": setup_s,
        "compile_s": trace_s + timed["compile_s"],
        "compile_cache_hit": _cache_hits() > hits,
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
        **jax_environment(),
    }
    _say_result(result, say)
    return result


def _time_step(traced: Any, state: Any, frozen: Any, batch: Any, *, steps: int, warmup: int
               ) -> dict[str, Any]:
    """Compiles the traced step and times `steps` calls after `warmup` ones: the lowering +
    compile seconds, the per-step seconds, the last loss, peak memory before / after the steps,
    XLA's estimate."""
    t0 = time.perf_counter()
    compiled = traced.lower().compile()
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
    say(f"  compile    {result['compile_s']:8.1f} s"
        + (" (loaded from the persistent compilation cache)" if result["compile_cache_hit"]
           else ""))
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


def step_kind(config: ml_collections.ConfigDict) -> str:
    """The step kind (`STEP_KINDS`) `config` runs on this backend."""
    return "fused" if methods.base.fused(config) else "reference"


def with_step(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
    """A copy of `config` that runs the `kind` step (`STEP_KINDS`)."""
    other = ml_collections.ConfigDict(config.to_dict())
    other.fused_step = kind == "fused"
    return other


def run_torch(config: ml_collections.ConfigDict, *, precision: str, steps: int = 20,
              warmup: int = 2, batch: int | None = None) -> dict[str, Any]:
    """The PyTorch port of the official step (`pytorch/step.py`, the [torch] extra) timed on the
    first CUDA device, else the CPU: its row with the configuration's fields (method, student,
    crop, batch) and the machine's, so that it makes a table beside mgd_jax's rows."""
    from mgd_jax.pytorch import step as torch_step  # local: the [torch] extra

    batch_size = int(batch or config.batch_size)
    method = methods.get(config)
    context = {"method": config.method, "student": method.export_meta["backbone"],
               "global_batch": batch_size, "images_per_step": method.images_per_step(batch_size),
               "crop_size": int(config.crop_size)}
    row = torch_step.run(config, batch_size=batch_size, precision=precision, steps=steps,
                         warmup=warmup)
    device = "cuda" if torch_step.torch.cuda.is_available() else "cpu"
    row = {**context, **row, **torch_environment(torch_step.torch, device)}
    print(f"{row['label']}, {row['precision']}, {row['card']}: {row['ms_per_step']:.1f} ms/step "
          f"median of {steps} (min {row['ms_min']:.1f}, max {row['ms_max']:.1f}; {warmup} "
          f"warm-up), {row['images_per_s']:.1f} images/s, peak "
          f"{_fmt_bytes(row['peak_memory_bytes'])}")
    print(json.dumps(row))
    return row


def run_one(config: ml_collections.ConfigDict, implementation: str, *, steps: int = 20,
            warmup: int = 2, batch: int | None = None, peak_tflops: float | None = None,
            precisions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One implementation of `IMPLEMENTATIONS` on its own: "mgd_jax" (the configured step),
    "fused" or "reference" (that step kind), "torch" (`run_torch` in each of `precisions`;
    default fp32 and, with CUDA, bf16). A "torch" run never starts JAX on a device."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"--implementation={implementation} is not one of {IMPLEMENTATIONS}")
    if implementation != "torch":
        chosen = config if implementation == "mgd_jax" else with_step(config, implementation)
        return [run_bench(chosen, steps=steps, warmup=warmup, batch=batch,
                          peak_tflops=peak_tflops)]
    if not precisions:
        from mgd_jax.pytorch.nets import torch  # local: the [torch] extra

        precisions = ("fp32", "bf16") if torch.cuda.is_available() else ("fp32",)
    return [run_torch(config, precision=p, steps=steps, warmup=warmup, batch=batch)
            for p in precisions]


def compare(config: ml_collections.ConfigDict, what: Sequence[str], *, steps: int = 20,
            warmup: int = 2, batch: int | None = None, peak_tflops: float | None = None,
            precisions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The configured step, then each of `what` ("fused" / "reference": that step kind, unless
    it is the configured one; "torch": a PyTorch port of the official step, `pytorch/step.py`, in
    `precisions`) in this
    process on the same device; prints one table with each row's speed-up over the PyTorch step
    of the same precision."""
    unknown = set(what) - set(COMPARE)
    if unknown:
        raise ConfigError(f"--compare: {sorted(unknown)} not in {COMPARE}")
    rows = [run_bench(config, steps=steps, warmup=warmup, batch=batch, peak_tflops=peak_tflops)]
    for kind in STEP_KINDS:
        if kind in what and kind != step_kind(config):
            rows.append(run_bench(with_step(config, kind), steps=steps, warmup=warmup,
                                  batch=batch, peak_tflops=peak_tflops))
    if "torch" in what:
        for precision in precisions or torch_precisions():
            rows.append(run_torch(config, precision=precision, steps=steps, warmup=warmup,
                                  batch=rows[0]["global_batch"]))
    print(format_table(rows))
    return rows


# ------------------------------------------------------------------------------------------------
# Tables of rows measured in separate processes

# the row files of one configuration, in table order (launch/gpu_bench.sh names them so)
ROW_FILES = ("mgd_jax", *STEP_KINDS, "matmul", "torch_fp32", "torch_bf16")
LABEL_TORCH = "PyTorch port of the official step"  # pytorch/step.py's LABEL, torch not imported


def gather(rows_dir: str) -> dict[str, list[dict[str, Any]]]:
    """{configuration: rows} from `rows_dir/<configuration>/<implementation>.json` files, each
    one row (or a list of rows) as `mgd-bench step --json` writes it, or `{"failed": why, ...}`
    where a run wrote none (launch/gpu_bench.sh: an out-of-memory error, a crash)."""
    if not os.path.isdir(rows_dir):
        raise ConfigError(f"--rows={rows_dir}: no such directory")
    groups = {}
    for name in sorted(os.listdir(rows_dir)):
        folder = os.path.join(rows_dir, name)
        if not os.path.isdir(folder):
            continue
        files = sorted((f for f in os.listdir(folder) if f.endswith(".json")),
                       key=lambda f: (ROW_FILES.index(f[:-5]) if f[:-5] in ROW_FILES
                                      else len(ROW_FILES), f))
        rows = []
        for file in files:
            path = os.path.join(folder, file)
            try:
                with open(path) as f:
                    loaded = json.load(f)
            except (OSError, ValueError) as e:
                loaded = {"implementation": file[:-5], "failed": f"unreadable {path}: {e}"}
            rows += loaded if isinstance(loaded, list) else [loaded]
        if rows:
            groups[name] = rows
    return groups


def format_groups(groups: dict[str, list[dict[str, Any]]]) -> str:
    """One `format_table` per configuration of `gather`."""
    return "\n\n".join(format_table(rows, name=name) for name, rows in groups.items())


def _torch_ms(rows: list[dict[str, Any]], precision: str) -> float | None:
    family = "bf16" if precision.startswith("bf") else "fp32"
    for row in rows:
        if (row["implementation"] == "torch" and "ms_per_step" in row
                and row["precision"].startswith(family)):
            return row["ms_per_step"]
    return None


def _row_name(row: dict[str, Any]) -> str:
    if row["implementation"] == "torch":
        return row.get("label", LABEL_TORCH)
    step = f"{row.get('step', row['implementation'])} step"
    return f"mgd_jax ({step}, {row['resize']})" if "resize" in row else f"mgd_jax ({step})"


def _machine_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where each framework's rows ran: card, driver, versions (rows without them: none)."""
    lines = []
    for implementation, software in (("mgd_jax", "jax {jax}, jaxlib {jaxlib}"),
                                      ("torch", "torch {torch}")):
        row = next((r for r in rows if r["implementation"] == implementation and "card" in r),
                   None)
        if row is None and implementation == "mgd_jax":  # a run of a named step kind only
            row = next((r for r in rows if r["implementation"] in STEP_KINDS and "card" in r),
                       None)
        if row is not None:
            lines.append(f"  {implementation}: {row['card']}, driver {row['driver']}, "
                         + software.format(**row) + f", CUDA {row['cuda']}, cuDNN "
                         f"{row['cudnn']}, Python {row['python']}")
    return lines


def format_table(rows: list[dict[str, Any]], name: str | None = None) -> str:
    """Rows of one configuration as a table; "vs torch" = PyTorch ms / this row's ms at the same
    precision family (float32 vs fp32, bfloat16 vs bf16 autocast); a failed row says why."""
    measured = [r for r in rows if "ms_per_step" in r]
    if measured:
        first = measured[0]
        head = (f"{first['method']} step, student {first['student']}, "
                f"{first.get('devices', first.get('card', '?'))}, crop {first['crop_size']}, "
                f"global batch {first['global_batch']} ({first['images_per_step']} images/step), "
                f"median of {first['steps']} steps")
    else:
        head = "no row measured"
    lines = [f"{name}: {head}" if name else head, *_machine_lines(measured),
             f"{'implementation':<34} {'precision':<30} {'ms/step':>9} {'min':>9} {'peak mem':>10} "
             f"{'vs torch':>9}"]
    for row in rows:
        if "ms_per_step" not in row:
            lines.append(f"{_row_name(row):<34} {row.get('precision', ''):<30} failed: "
                         f"{row.get('failed', 'no time in its row')}")
            continue
        torch_ms = _torch_ms(rows, row["precision"])
        ratio = (f"{torch_ms / row['ms_per_step']:.2f}x"
                 if torch_ms and row["implementation"] != "torch" else "")
        lines.append(f"{_row_name(row):<34} {row['precision']:<30} {row['ms_per_step']:>9.1f} "
                     f"{row['ms_min']:>9.1f} {_fmt_bytes(row.get('peak_memory_bytes')):>10} "
                     f"{ratio:>9}")
    return "\n".join(lines)
