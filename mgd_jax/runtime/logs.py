"""Where a run's lines go.

- The console shows the run's own lines (`say`: stages, progress with ETA, tables) and everyone's
  warnings. `say` prints to stdout, so the lines appear wherever the run is (terminal, notebook).
- A run's log file, `<workdir>/log.txt` (`log_file`), holds everything from INFO up: the run's
  lines, the lines kept out of the console (the full config), and the libraries' INFO chatter
  (orbax, absl, tfds), which the console never shows.

The tools call `configure_console()` once (`cli.run`). A training run attaches its log file for
its duration (`train.train_and_evaluate`, and the demo for its top-level workdir); only the
primary process writes one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from etils import epath

LOG_FILE = "log.txt"
RUN_LOGGER = "mgd_jax.run"  # the records of `say`
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"

log = logging.getLogger(RUN_LOGGER)


def say(text: str, *, console: bool = True, primary: bool = True) -> None:
    """One of the run's own lines: printed (if `console`) and logged at INFO for the log file.

    `primary=False` (a non-primary process) keeps it at DEBUG and off the console.
    """
    if not primary:
        log.debug(text)
        return
    if console:
        print(text, flush=True)
    log.info(text)


class _Console(logging.StreamHandler):
    """Warnings and errors to the current stderr (notebooks swap the streams per cell)."""

    def __init__(self):
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        # One line per record: a library's traceback or multi-line message goes to the log file
        # only (an orbax write failure would otherwise print dozens of lines before our error).
        lines = record.getMessage().splitlines() or [""]
        more = " (more in the run's log.txt)" if record.exc_info or len(lines) > 1 else ""
        return f"{record.levelname} {record.name}: {lines[0]}{more}"

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        del value


def configure_console() -> None:
    """The console of a tool or notebook: warnings and errors of every library on stderr, no INFO
    chatter (the run's own lines come from `say`). Lets INFO records reach a run's log file.

    Replaces the root logger's other console handlers: absl installs Python's default one
    (`logging.basicConfig()`, every record on stderr) at the first absl log call, e.g. while
    orbax is imported. Idempotent."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if not isinstance(h, LogFile)]:
        root.removeHandler(handler)
    root.addHandler(_Console())
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings: on the console and in the log file


class LogFile(logging.Handler):
    """Every record (INFO and up) as a line of a text file.

    A local path is appended to and flushed line by line. A remote one (`scheme://...`, e.g. a
    `gs://` workdir) cannot be appended to: the lines go to a local copy (seeded with the remote
    file's lines, so a resumed run keeps them) and the whole file is written through `epath`
    every `sync_seconds` and on close.

    A failed write (a full disk, lost storage) neither raises into the code that logged nor
    prints a traceback: the first one is kept, `check()` raises it (the training loop asks after
    every step, so the error names the step) and `close()` never raises.
    """

    def __init__(self, path: str, *, remote: bool | None = None, sync_seconds: float = 30.0):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.path = path
        self.remote = "://" in path if remote is None else remote
        self.sync_seconds = sync_seconds
        self._synced = time.monotonic()
        self._owner = threading.get_ident()
        self.failure: OSError | None = None  # the first failed write
        if self.remote:
            fd, self._local = tempfile.mkstemp(prefix="mgd_jax_log_", suffix=".txt")
            os.close(fd)
            target = epath.Path(path)
            if target.exists():
                with open(self._local, "w") as f:
                    f.write(target.read_text())
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._local = path
        self._file = open(self._local, "a")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    def handle(self, record: logging.LogRecord) -> bool:
        emitted = super().handle(record)
        # The upload runs outside the handler's lock and only on the thread that opened the file:
        # the storage client logs from its own I/O thread while it uploads, and that record
        # needs the lock (inside it, or on that thread, the upload would wait for itself).
        if (self.remote and threading.get_ident() == self._owner
                and time.monotonic() - self._synced >= self.sync_seconds):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - logging must never break the run
                self.handleError(record)
        return emitted

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = sys.exc_info()[1]
        if self.failure is None:
            self.failure = OSError(getattr(error, "errno", None) or 0,
                                   getattr(error, "strerror", None) or str(error), self.path)

    def check(self) -> None:
        """Raises the first failed write as an OSError naming the log file."""
        if self.failure is not None:
            raise self.failure

    def sync(self) -> None:
        """Writes the remote file whole (nothing to do for a local one)."""
        if self.remote and not self._file.closed:
            with self.lock:  # a consistent copy; the upload itself outside the lock (`handle`)
                self._file.flush()
                with open(self._local) as f:
                    text = f.read()
            epath.Path(self.path).write_text(text)
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.sync()
                self._file.close()
            except OSError:  # the last lines are lost; an error of the run itself comes first
                self.handleError(None)  # type: ignore[arg-type]
                with contextlib.suppress(OSError):
                    self._file.close()  # the buffer is dropped: the close cannot fail twice
            if self.remote:
                with contextlib.suppress(OSError):
                    os.remove(self._local)
        super().close()


@contextlib.contextmanager
def log_file(directory: str, *, enabled: bool = True) -> Iterator[LogFile | None]:
    """`<directory>/log.txt` receives every log record while the block runs (`enabled=False`:
    nothing, e.g. on non-primary processes)."""
    if not enabled:
        yield None
        return
    handler = LogFile(os.path.join(directory, LOG_FILE) if "://" not in directory
                      else f"{directory.rstrip('/')}/{LOG_FILE}")
    root = logging.getLogger()
    level = root.level
    if level == logging.NOTSET or level > logging.INFO:
        root.setLevel(logging.INFO)
    # Without a console of its own (a notebook, a script), the warnings would now reach only the
    # file (Python's last-resort stderr output applies only to a logger with no handler at all).
    console = None if any(not isinstance(h, LogFile) for h in root.handlers) else _Console()
    for added in (handler, console):
        if added is not None:
            root.addHandler(added)
    try:
        yield handler
    finally:
        for added in (handler, console):
            if added is not None:
                root.removeHandler(added)
        root.setLevel(level)
        handler.close()
