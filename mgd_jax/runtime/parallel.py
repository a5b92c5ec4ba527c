"""Device mesh, shardings and host-local -> global arrays (big_vision style: jit over a Mesh).

One 1-D `data` axis spans every device of every host. Batches are sharded on it, so BatchNorm
statistics computed under jit are over the global batch: the recipe's SyncBN, with no extra code.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd_jax.runtime.errors import ConfigError

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


class DevicePrefetch:
    """Host batches of `iterator` as global device arrays (`global_batch`), `size` batches ahead:
    the next batches' host work and transfers overlap the running step.

    Checkpointable like the iterator it wraps (`get_state` / `set_state` / `start_prefetch`, as
    grain's checkpoint handler calls them): the saved position is that of the next batch *this*
    object yields, i.e. the next batch the step consumes, not the iterator's position after the
    batches already in flight; restoring drops those and reads them again, so resume stays exact.
    """

    def __init__(self, iterator: Iterator, mesh: Mesh, size: int = 2):
        if size < 1:
            raise ConfigError(f"config.prefetch={size}: must be >= 1 (1 = no batch ahead)")
        self._iterator, self._mesh, self._size = iterator, mesh, size
        self._queue: collections.deque = collections.deque()  # (position before, batch)

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        while len(self._queue) < self._size:
            position = self._iterator.get_state()
            self._queue.append((position, global_batch(next(self._iterator), self._mesh)))
        return self._queue.popleft()[1]

    def get_state(self) -> bytes:
        position = self._queue[0][0] if self._queue else self._iterator.get_state()
        return json.dumps(position).encode()

    def set_state(self, state: bytes) -> None:
        self._queue.clear()
        self._iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        if hasattr(self._iterator, "start_prefetch"):
            self._iterator.start_prefetch()

    def close(self) -> None:
        self._queue.clear()
        if hasattr(self._iterator, "close"):
            self._iterator.close()


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


COORDINATOR_ENV = "MGD_JAX_COORDINATOR_ADDRESS"  # host:port of process 0's coordinator
NUM_PROCESSES_ENV = "MGD_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "MGD_JAX_PROCESS_ID"


def initialize_distributed(environ: dict[str, str] | None = None) -> None:
    """Joins the multi-process runtime where asked for; a single process (Colab, one GPU, CPU)
    needs nothing.

    - MGD_JAX_COORDINATOR_ADDRESS=host:port with MGD_JAX_NUM_PROCESSES and MGD_JAX_PROCESS_ID:
      explicit (local multi-process tests, clusters jax cannot detect);
    - else MGD_JAX_DISTRIBUTED=1: `jax.distributed.initialize()` detects the cluster (Cloud TPU
      VMs, Slurm, Open MPI).
    """
    env = os.environ if environ is None else environ
    address = env.get(COORDINATOR_ENV, "")
    if address:
        try:
            count, index = int(env[NUM_PROCESSES_ENV]), int(env[PROCESS_ID_ENV])
        except (KeyError, ValueError):
            raise ConfigError(
                f"{COORDINATOR_ENV}={address} needs {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} "
                "(integers: the number of processes and this one's index)") from None
        if not 0 <= index < count:
            raise ConfigError(f"{PROCESS_ID_ENV}={index} must be in [0, {NUM_PROCESSES_ENV}="
                              f"{count})")
        jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                   process_id=index)
    elif env.get("MGD_JAX_DISTRIBUTED", "0") == "1":
        jax.distributed.initialize()


def runtime_summary() -> str:
    """One line saying what this process runs on."""
    return (f"JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.device_count()} devices ({jax.default_backend()})")
