"""Device mesh, shardings and host-local -> global arrays (big_vision style: jit over a Mesh).

One 1-D `data` axis spans every device of every host. Batches are sharded on it, so BatchNorm
statistics computed under jit are over the global batch: the recipe's SyncBN, with no extra code.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd_jax.runtime.errors import ConfigError, UserError

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


def initialize_distributed(environ: Mapping[str, str] | None = None) -> None:
    """Joins the multi-process runtime where asked for; a single process (Colab, one GPU, CPU)
    needs nothing.

    - MGD_JAX_COORDINATOR_ADDRESS=host:port with MGD_JAX_NUM_PROCESSES and MGD_JAX_PROCESS_ID:
      explicit (local multi-process tests, clusters jax cannot detect);
    - else MGD_JAX_DISTRIBUTED=1: `jax.distributed.initialize()` detects the cluster (Cloud TPU
      VMs, Slurm, Open MPI); a Slurm task is given its one GPU (`slurm_arguments`).
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
        jax.distributed.initialize(**slurm_arguments(env))
        _check_slurm_devices(env)


# What jax's Slurm detection (jax/_src/clusters/slurm_cluster.py) recognises a task by.
SLURM_TASK_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                  "SLURM_LOCALID")
SLURM_HINT = ("start one task per GPU (srun --ntasks-per-node=<GPUs per node>, as "
              "launch/slurm.sbatch does)")


def _slurm_gpus(env: Mapping[str, str]) -> int:
    """The GPUs Slurm gave this task's node (0: not a Slurm task, or no GPUs)."""
    if not all(name in env for name in SLURM_TASK_ENV):
        return 0
    try:
        return int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    except ValueError:
        return 0


def _tasks_on_node(env: Mapping[str, str]) -> int | None:
    """This node's task count, from Slurm's per-node list ("4(x2)", "2,1", ...)."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def slurm_arguments(env: Mapping[str, str]) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments for a Slurm task on a GPU node: its one local
    device. Jax's Slurm detection gives each task one device, the GPU numbered SLURM_LOCALID, so
    a node needs one task per GPU; anything else would leave GPUs idle without a word and is
    refused. A task Slurm bound to one GPU (`--gpus-per-task=1`: one CUDA_VISIBLE_DEVICES entry)
    sees it as device 0. Not a Slurm GPU task: no arguments (jax detects the rest)."""
    gpus = _slurm_gpus(env)
    if not gpus:
        return {}
    node, local = env.get("SLURM_NODEID", "0"), int(env["SLURM_LOCALID"])
    tasks = _tasks_on_node(env)
    if tasks is not None and tasks != gpus:
        raise UserError(f"Slurm: node {node} runs {tasks} task(s) for its {gpus} GPUs "
                        f"(SLURM_GPUS_ON_NODE); each task trains on one GPU, so "
                        f"{'some would sit idle' if tasks < gpus else 'tasks would share one'}: "
                        f"{SLURM_HINT}")
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(visible) == 1:
        return {"local_device_ids": [0]}
    if visible and local >= len(visible):
        raise UserError(f"Slurm: task {local} of node {node} sees CUDA_VISIBLE_DEVICES="
                        f"{','.join(visible)}, no GPU numbered {local}: {SLURM_HINT}")
    return {"local_device_ids": [local]}


def _check_slurm_devices(env: Mapping[str, str]) -> None:
    """After start-up: one device per Slurm task in all, or a refusal (not a silent part of the
    job's GPUs)."""
    if not _slurm_gpus(env):
        return
    tasks = int(env["SLURM_NTASKS"])
    if jax.device_count() != tasks or jax.local_device_count() != 1:
        raise UserError(f"Slurm: {tasks} tasks see {jax.device_count()} devices in all "
                        f"({jax.local_device_count()} here), expected one GPU each: {SLURM_HINT}")


def runtime_summary() -> str:
    """One line saying what this process runs on."""
    return (f"JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.device_count()} devices ({jax.default_backend()})")
