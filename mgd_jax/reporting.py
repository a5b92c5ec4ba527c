"""Training reports: one stdout line, <workdir>/metrics.jsonl and TensorBoard event files.

TensorBoard files are written with tensorboardX (no TensorFlow). Only the main process (process 0)
writes files; other processes log their lines at debug level. Values may be Python or JAX/numpy
scalars.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS ("?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Reporter:
    """Writes scalars and texts of a run.

    Args:
      workdir: directory for metrics.jsonl and the TensorBoard event files (created if needed).
      total_steps: number of training steps, for the progress percentage and ETA.
      is_main: False on non-main processes: nothing is written, lines go to the debug log.
      clock: time source in seconds (tests inject a fake one).
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        is_main: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.workdir = workdir
        self.total_steps = int(total_steps)
        self.is_main = is_main
        self._clock = clock
        self._last: tuple[int, float] | None = None  # (step, time) of the previous progress call
        self._jsonl = None
        self._tb = None
        if is_main:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=workdir)

    def _emit(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)
        else:
            log.debug(line)

    def scalars(self, step: int, values: Mapping[str, Any], *, line: str | None = None) -> None:
        """Log `values` at `step`: a stdout line, one JSON object in metrics.jsonl, TB scalars.

        `line` replaces the default stdout text ("step S/T: k=v, ...").
        """
        step = int(step)
        floats = {k: _to_float(v) for k, v in values.items()}
        if line is None:
            body = ", ".join(f"{k}={_fmt(v)}" for k, v in floats.items())
            line = f"step {step}/{self.total_steps}: {body}"
        self._emit(line)
        if not self.is_main:
            return
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in floats.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in floats.items():
            self._tb.add_scalar(k, v, global_step=step)
        self._tb.flush()

    def progress(self, step: int, images_per_step: int) -> dict[str, float]:
        """Throughput since the previous call: steps/s, images/s and the ETA to `total_steps`.

        The first call only starts the clock (call it after the first, compiling, step) and returns
        {}. Later calls log "perf/steps_per_sec", "perf/images_per_sec", "perf/eta_seconds" like
        `scalars`, with a readable stdout line, and return them.
        """
        step = int(step)
        now = self._clock()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        steps_per_sec = (step - last[0]) / (now - last[1])
        eta = max(self.total_steps - step, 0) / steps_per_sec
        values = {
            "perf/steps_per_sec": steps_per_sec,
            "perf/images_per_sec": steps_per_sec * images_per_step,
            "perf/eta_seconds": eta,
        }
        pct = 100.0 * step / max(self.total_steps, 1)
        line = (
            f"step {step}/{self.total_steps} ({pct:.1f}%): {steps_per_sec:.3g} steps/s, "
            f"{steps_per_sec * images_per_step:.4g} images/s, ETA {format_eta(eta)}"
        )
        self.scalars(step, values, line=line)
        return values

    def text(self, name: str, text: str, step: int = 0) -> None:
        """Log a block of text (resolved config, parameter overview, IoU table): stdout + TB."""
        self._emit(f"== {name} ==\n{text}")
        if self.is_main:
            # Indented = preformatted in TensorBoard's markdown rendering.
            self._tb.add_text(name, "\n".join("    " + s for s in text.splitlines()), step)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(v: float) -> str:
    return f"{v:.5g}"
