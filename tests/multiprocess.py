"""Runs one function in N local JAX processes joined by `jax.distributed` on loopback, each with
its own CPU devices: how multi-host code (a TPU pod slice, a GPU cluster) is tested on one machine.

    results = multiprocess.launch("test_module:function", {"arg": 1}, num_processes=2,
                                  devices_per_process=2)

Each process joins the runtime through the trainer's own start-up (`parallel.
initialize_distributed`, from MGD_JAX_COORDINATOR_ADDRESS / MGD_JAX_NUM_PROCESSES /
MGD_JAX_PROCESS_ID), then calls `function(**kwargs)`; its JSON-able return value comes back in
`Result.value`. A process that dies (or kills itself) has `value` None and its exit status in
`returncode`. The function is imported by "module:name" with tests/ and the repository root on
sys.path. Run as a script, this file is the worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@dataclasses.dataclass
class Result:
    process_id: int
    returncode: int | None  # None: still running at the timeout (then killed)
    value: Any  # what the function returned (None if it did not return)
    output: str  # stdout and stderr together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target: str, kwargs: dict[str, Any] | None = None, *, num_processes: int,
           devices_per_process: int, timeout: float = 300.0, workdir: str | None = None,
           env: dict[str, str] | None = None) -> list[Result]:
    """Starts the processes, waits for all (killing every one still alive at `timeout`), and
    returns their results in process order. `workdir` holds the per-process result and output
    files (default: a temporary folder)."""
    import tempfile

    scratch = workdir or tempfile.mkdtemp(prefix="mgd_jax_multiprocess_")
    os.makedirs(scratch, exist_ok=True)
    base = dict(os.environ, **(env or {}))
    base.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([ROOT, TESTS, base.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    for name in ("MGD_JAX_COORDINATOR_ADDRESS", "MGD_JAX_NUM_PROCESSES", "MGD_JAX_PROCESS_ID",
                 "MGD_JAX_DISTRIBUTED"):
        base.pop(name, None)
    if num_processes > 1:
        base.update(MGD_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                    MGD_JAX_NUM_PROCESSES=str(num_processes))
    args = json.dumps(kwargs or {})
    procs = []
    for i in range(num_processes):
        result_file = os.path.join(scratch, f"result_{i}.json")
        output_file = os.path.join(scratch, f"output_{i}.txt")
        for stale in (result_file, output_file):
            if os.path.exists(stale):
                os.remove(stale)
        process_env = dict(base, MGD_JAX_PROCESS_ID=str(i)) if num_processes > 1 else base
        with open(output_file, "w") as out:  # a file, not a pipe: no deadlock on long output
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), target, args, result_file],
                cwd=ROOT, env=process_env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    try:
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:  # also when the caller is interrupted: no orphans
        for proc in procs:  # e.g. a process waiting forever for a peer that died
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for i, code in enumerate(codes):
        result_file = os.path.join(scratch, f"result_{i}.json")
        value = None
        if code == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                value = json.load(f)
        with open(os.path.join(scratch, f"output_{i}.txt")) as f:
            results.append(Result(i, code, value, f.read()))
    return results


def describe(results: list[Result], tail: int = 3000) -> str:
    """The exit status and the end of the output of every process (for assertion messages)."""
    return "\n".join(f"--- process {r.process_id}: exit {r.returncode}\n{r.output[-tail:]}"
                     for r in results)


def _worker(target: str, args: str, result_file: str) -> None:
    import importlib

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain / orbax read absl flags
    from mgd_jax.runtime import parallel

    parallel.initialize_distributed()
    module, _, name = target.partition(":")
    value = getattr(importlib.import_module(module), name)(**json.loads(args))
    with open(result_file, "w") as f:
        json.dump(value, f)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
