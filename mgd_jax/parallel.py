"""Device mesh, shardings and host-local -> global arrays (big_vision style: jit over a Mesh).

One 1-D `data` axis spans every device of every host. Batches are sharded on it, so BatchNorm
statistics computed under jit are over the global batch: the recipe's SyncBN, with no extra code.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles per-host numpy batches into global arrays sharded on `data`.

    Each host passes its own slice (global batch / process count examples); the result is one
    logical global array per leaf.
    """
    sharding = data_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host-identical pytree on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def process_share(global_size: int, field: str = "batch_size", *,
                  device_count: int | None = None, process_count: int | None = None) -> int:
    """This process's share of a global batch `config.<field>`; it must split evenly over the
    devices (and so over the processes). The one home of that check."""
    devices = jax.device_count() if device_count is None else device_count
    processes = jax.process_count() if process_count is None else process_count
    if global_size <= 0 or global_size % devices or global_size % processes:
        raise ConfigError(
            f"config.{field}={global_size} must be a positive multiple of the {devices} devices"
            + (f" and {processes} processes" if processes > 1 else "")
        )
    return global_size // processes


def initialize_distributed() -> None:
    """Multi-process start-up (TPU pods, multi-node GPU) where asked for with
    MGD_JAX_DISTRIBUTED=1; a single process (Colab, one GPU, CPU) needs nothing."""
    if os.environ.get("MGD_JAX_DISTRIBUTED", "0") == "1":
        jax.distributed.initialize()


def runtime_summary() -> str:
    """One line saying what this process runs on."""
    return (f"JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.device_count()} devices ({jax.default_backend()})")
