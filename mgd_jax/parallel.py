"""Device mesh, shardings and host-local -> global arrays (big_vision style: jit over a Mesh).

One 1-D `data` axis spans every device of every host. Batches are sharded on it, so BatchNorm
statistics computed under jit are over the global batch: the recipe's SyncBN, with no extra code.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def local_batch_size(global_size: int, what: str = "batch_size") -> int:
    """Per-process share of a global batch; it must divide evenly over processes and devices."""
    if global_size % jax.device_count():
        raise ValueError(
            f"config.{what}={global_size} is not divisible by the {jax.device_count()} devices"
        )
    return global_size // jax.process_count()
