"""Training reports: console lines (`logs.say`, so also in the run's log file),
<workdir>/metrics.jsonl (`MetricsFile`), prediction panels as PNG files and TensorBoard event files
(scalars, texts, images).

TensorBoard files are written with tensorboardX (no TensorFlow; on `gs://` through
google-cloud-storage, the whole event file rewritten at each flush). Only the main process
(process 0) writes files; other processes log their lines at debug level. Values may be Python or
JAX/numpy scalars.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from mgd_jax.runtime import logs, paths

PANELS_DIR = "panels"
METRICS_FILE = "metrics.jsonl"


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
        self.failure: OSError | None = None  # the first failed write of the event files
        if is_main:
            paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
            self._jsonl = MetricsFile(str(paths.resolve(workdir) / METRICS_FILE))
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(paths.resolve(workdir)))
            _record_event_file_failures(self._tb, self._failed)

    def _failed(self, error: OSError) -> None:
        if self.failure is None:
            self.failure = error

    def check(self) -> None:
        """Raises the first failed write of the TensorBoard event files (written on a thread of
        their own); the other files' writes raise where they happen."""
        if self.failure is not None:
            raise self.failure

    def _emit(self, line: str, console: bool = True) -> None:
        logs.say(line, console=console, primary=self.is_main)

    def line(self, text: str) -> None:
        """One line of the run's own output (console and log file)."""
        self._emit(text)

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
        self._jsonl.write(record)
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

    def text(self, name: str, text: str, step: int = 0, *, console: bool = True) -> None:
        """Log a block of text (IoU table, data description...): console (unless `console` is
        False: the log file only, e.g. the full config), log file and TensorBoard."""
        self._emit(f"== {name} ==\n{text}", console)
        if self.is_main:
            # Indented = preformatted in TensorBoard's markdown rendering.
            self._tb.add_text(name, "\n".join("    " + s for s in text.splitlines()), step)
            self._tb.flush()

    def image(self, name: str, image: np.ndarray, step: int) -> str | None:
        """Writes a uint8 (H, W, 3) image as `<workdir>/panels/<name>_<step>.png` and as the
        TensorBoard image `name`; returns the file (None on other processes)."""
        if not self.is_main:
            return None
        from PIL import Image

        step = int(step)
        path = epath.Path(self.workdir) / PANELS_DIR / f"{name.replace('/', '_')}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", optimize=True)
        path.write_bytes(buffer.getvalue())
        self._tb.add_image(name, np.asarray(image, np.uint8), global_step=step, dataformats="HWC")
        self._tb.flush()
        return str(path)

    def restart_at(self, step: int) -> None:
        """The run (re)starts at `step` (its checkpoint): see `MetricsFile.restart_at`."""
        if self._jsonl is not None:
            self._jsonl.restart_at(step)

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


class MetricsFile:
    """`metrics.jsonl`: one JSON object per line, each with its "step".

    One row per (step, names): a run restarted from a checkpoint repeats the steps after it, and
    their rows replace the earlier ones (`restart_at` drops the rows after the checkpoint; a row
    written again with the same step and names replaces its twin) instead of appearing twice.
    A local file is appended to line by line (rewritten only when rows are dropped or replaced);
    a remote one (`gs://...`, objects cannot be appended to) is rewritten whole every
    `sync_seconds` and on close.
    """

    def __init__(self, path: str, *, sync_seconds: float = 30.0):
        self.path = paths.resolve(path)
        self.remote = paths.is_remote(path)
        self.sync_seconds = sync_seconds
        self._rows: dict[tuple, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._rows[_row_key(row)] = row
        self._dirty = False
        self._synced = time.monotonic()
        self._file = None if self.remote else open(self.path, "a")

    def write(self, row: Mapping[str, Any]) -> None:
        with _naming(self.path):
            self._write(row)

    def _write(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        key = _row_key(row)
        replaced = key in self._rows
        if replaced:
            del self._rows[key]  # re-inserted last: rows stay in the order they were written
        self._rows[key] = row
        if self.remote:
            self._dirty = True
            if time.monotonic() - self._synced >= self.sync_seconds:
                self.sync()
        elif replaced:
            self._rewrite()
        else:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def restart_at(self, step: int) -> None:
        """Drops the rows of the steps after `step` (the restarted run logs them again)."""
        kept = {k: r for k, r in self._rows.items() if r["step"] <= step}
        if len(kept) != len(self._rows):
            self._rows = kept
            self._rewrite()

    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def sync(self) -> None:
        """Writes a remote file whole (a local one is always up to date)."""
        if self.remote and self._dirty:
            self._rewrite()

    def _rewrite(self) -> None:
        with _naming(self.path):
            self._rewrite_file()

    def _rewrite_file(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self._rows.values())
        if self.remote:
            self.path.write_text(text)
            self._dirty, self._synced = False, time.monotonic()
        else:
            self._file.close()
            with open(self.path, "w") as f:
                f.write(text)
            self._file = open(self.path, "a")

    def close(self) -> None:
        if self.remote:
            self.sync()
        elif self._file is not None and not self._file.closed:
            self._file.close()


def _record_event_file_failures(tb: Any, record: Callable[[OSError], None]) -> None:
    """tensorboardX writes its event files on a thread of its own, where a failed write (a full
    disk) prints a traceback, ends the thread and fails again at exit: their writes hand their
    failure to `record` instead (`Reporter.check` raises the first)."""

    def recording(write: Callable[..., Any], where: str) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return write(*args, **kwargs)
            except OSError as e:
                record(OSError(e.errno, e.strerror or str(e), where))
                return None

        return guarded

    for file_writer in (getattr(tb, "all_writers", None) or {}).values():
        events = getattr(file_writer.event_writer, "_ev_writer", None)  # its EventsWriter
        if events is None:  # another tensorboardX: its own behaviour
            continue
        where = getattr(events, "_file_name", None) or f"the event file in {tb.logdir}"
        for name in ("write_event", "flush", "close"):
            setattr(events, name, recording(getattr(events, name), str(where)))


@contextlib.contextmanager
def _naming(path: Any) -> Iterator[None]:
    """A failed write of `path` as an OSError naming it (a file object's errors name none)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def _row_key(row: Mapping[str, Any]) -> tuple:
    return (row["step"], *sorted(k for k in row if k != "step"))


class Progress:
    """Progress lines of a loop of known length (e.g. a long evaluation): `update(done)` returns
    "<label>: done/total, elapsed, ETA" at most once every `every` seconds (None otherwise)."""

    def __init__(self, label: str, total: int | None, *, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.every = label, total, every
        self._clock = clock
        self._start = self._last = clock()

    def update(self, done: int) -> str | None:
        now = self._clock()
        if self.every < 0 or now - self._last < self.every:
            return None
        self._last = now
        elapsed = now - self._start
        if not self.total:
            return f"{self.label}: {done} batches, {format_eta(elapsed)}"
        eta = elapsed / max(done, 1) * max(self.total - done, 0)
        return (f"{self.label}: {done}/{self.total} batches ({100 * done / self.total:.0f}%), "
                f"{format_eta(elapsed)}, ETA {format_eta(eta)}")


def _fmt(v: float) -> str:
    return f"{v:.5g}"
