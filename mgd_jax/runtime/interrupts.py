"""Stopping a run cleanly on SIGTERM / SIGINT, and the fault-injection points of the kill tests.

`StopSignals` turns SIGTERM (what schedulers send before a preemption) and SIGINT (Ctrl-C) into a
flag; the training loop asks `stop_now(step)` at each step boundary, then checkpoints that step and
exits 0. With several processes, JAX's preemption service (started by `jax.distributed`) catches
SIGTERM and makes every process agree on the step to stop at; a SIGINT there is forwarded to it
as a SIGTERM. A second signal while stopping aborts at once.

`fault_point(name, step)` ends the process abruptly (`os._exit`, no clean-up, like a SIGKILL)
when `MGD_JAX_FAULT` names that point: `name` (its first hit) or `name@step`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import jax

FAULT_ENV = "MGD_JAX_FAULT"
FAULT_EXIT = 86  # the exit status of an injected fault (any non-zero would do)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager: within it SIGTERM / SIGINT request a stop instead of ending the
    process (only in the main thread, where Python can handle signals)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        multi = jax.process_count() > 1
        for sig in _SIGNALS:
            if multi and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier handles it (see `stop_now`)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.received is not None:  # a second signal: stop waiting for the step
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logging.warning("%s received: the run stops after this step, with a checkpoint",
                        signal_name(signum))
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def stop_now(self, step: int) -> bool:
        """Whether to stop after `step` (the number of completed steps). Every process gets the
        same answer for the same step: call it at every step."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def fault_point(name: str, step: int) -> None:
    """Ends the process here when `MGD_JAX_FAULT` asks for `name` (or `name@<step>`)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, at = wanted.partition("@")
    if point == name and (not at or int(at) == step):
        print(f"fault injected: {name} at step {step}", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT)
