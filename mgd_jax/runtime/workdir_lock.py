"""One run per workdir: `acquire(workdir)` takes `<workdir>/run.lock` or refuses at once with a
`WorkdirInUseError` naming the holder (host, pid, start time).

Two runs on one workdir would append every metrics row twice, write each other's checkpoints and
exports, and one would lose its `export_best`. The lock records who holds it as JSON:

- **Local folders** (and network file systems that lock): `fcntl.flock` on the file. The kernel
  drops the lock when its holder dies, however it dies (SIGKILL, OOM), so a killed run never
  blocks the next one. A file system that cannot lock (some FUSE mounts) gets a warning and no
  lock.
- **gs:// workdirs**: object-generation preconditions (`GcsLock`). The lock object is created only
  if absent (`if_generation_match=0`); its holder renews it every `lease / 4` seconds, each renewal
  conditional on the generation it wrote last. A lock not renewed for `lease` seconds (its holder
  was killed) is taken over by a rewrite conditional on the generation read, so of two runs that
  find it stale at once exactly one wins. A holder whose renewal finds another generation has lost
  the lock: `check()` stops its run.

A multi-process run is one program on one workdir: its process 0 takes the lock (train.py).
The demo holds its workdir while each stage holds its own sub-workdir.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from mgd_jax.runtime import paths
from mgd_jax.runtime.errors import UserError, WorkdirInUseError

LOCK_FILE = "run.lock"
LEASE_SECONDS = 120.0  # gs://: a lock not renewed for this long is stale (its holder is gone)


def holder_record(lease_seconds: float | None = None, *, now: float | None = None
                  ) -> dict[str, Any]:
    """Who takes the lock: this host and process, and when."""
    now = time.time() if now is None else now
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                              "started": _iso(now)}
    if lease_seconds is not None:
        record.update(renewed=now, lease_seconds=lease_seconds)
    return record


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def in_use_message(workdir: str, lock: str, holder: dict[str, Any] | None,
                   extra: str = "") -> str:
    """The refusal: the workdir, its holder and what to do."""
    if holder:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
               f"{holder.get('started', '?')}")
    else:
        who = "its details not written yet"
    return (f"--workdir={workdir}: in use by another run ({who}{extra}; lock {lock}); wait for "
            "it to end, stop it, or use another --workdir")


def acquire(workdir: str | os.PathLike, *, lease_seconds: float = LEASE_SECONDS,
            client: Any = None) -> LocalLock | GcsLock | None:
    """Takes `<workdir>/run.lock` (the workdir must exist) or raises `WorkdirInUseError`.
    None: a workdir this cannot lock (another URL scheme), with a warning. `client`: a
    google-cloud-storage client for gs:// (tests pass a fake)."""
    where = os.fspath(workdir)
    if where.startswith("gs://"):
        return GcsLock(where, lease_seconds=lease_seconds, client=client)
    if paths.is_remote(where):
        logging.warning("%s: runs on this storage are not locked against each other; start one "
                        "run per workdir", where)
        return None
    return LocalLock(where)


class LocalLock:
    """`fcntl.flock` on `<workdir>/run.lock`, held while the file stays open in this process."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        # Not truncated on open: a refused run must leave the holder's record as it is.
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _parse(os.pread(self._fd, 4096, 0))
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirInUseError(in_use_message(workdir, self.path, holder)) from None
            logging.warning("%s: cannot lock (%s): a second run on this workdir would not be "
                            "refused", self.path, e.strerror or e)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder_record()).encode(), 0)

    def check(self) -> None:
        """Nothing can take a held flock away."""

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale record: the file says the workdir is free
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LocalLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class GcsLock:
    """The lock object `<workdir>/run.lock` on Google Cloud Storage (see the module doc).

    Uses four calls of google-cloud-storage: `bucket.get_blob`, `blob.upload_from_string`,
    `blob.download_as_bytes` and `blob.delete`, each with `if_generation_match`.
    """

    def __init__(self, workdir: str, *, lease_seconds: float = LEASE_SECONDS, client: Any = None,
                 clock: Any = time.time, renew: bool = True):
        try:
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError:
            raise UserError(f"--workdir={workdir}: gs:// workdirs need google-cloud-storage (pip "
                            "install 'mgd_jax[gcs]')") from None
        self._conflict = (exceptions.PreconditionFailed, exceptions.NotFound)
        if client is None:
            try:
                client = storage.Client()
            except Exception as e:  # no credentials or project: google.auth's errors
                raise UserError(f"--workdir={workdir}: cannot reach Google Cloud Storage to lock "
                                f"the workdir ({type(e).__name__}: {e})") from None
        bucket, _, prefix = workdir[len("gs://"):].partition("/")
        self.name = f"{prefix.strip('/')}/{LOCK_FILE}".lstrip("/")
        self.path = f"gs://{bucket}/{self.name}"
        self.workdir, self.lease, self._clock = workdir, float(lease_seconds), clock
        self._bucket = client.bucket(bucket)
        self._generation: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._take()
        self._thread = None
        if renew:
            self._thread = threading.Thread(target=self._renew_loop, name="mgd_jax_lock",
                                            daemon=True)
            self._thread.start()

    def _record(self) -> bytes:
        return json.dumps(holder_record(self.lease, now=self._clock())).encode()

    def _write(self, generation: int) -> int:
        """Writes this holder's record if the object is at `generation` (0: absent); returns
        the new generation (raises a precondition / not-found error otherwise)."""
        blob = self._bucket.blob(self.name)
        blob.upload_from_string(self._record(), content_type="application/json",
                                if_generation_match=generation)
        return int(blob.generation)

    def _read(self) -> tuple[dict[str, Any] | None, int] | None:
        """(holder, generation) of the lock object, None when there is none."""
        blob = self._bucket.get_blob(self.name)
        if blob is None:
            return None
        generation = int(blob.generation)
        try:
            data = blob.download_as_bytes(if_generation_match=generation)
        except self._conflict:
            return self._read()  # rewritten or deleted between the two calls
        return _parse(data), generation

    def _take(self) -> None:
        for _ in range(3):  # the object may vanish or change between the calls
            try:
                self._generation = self._write(0)
                return
            except self._conflict:
                pass
            current = self._read()
            if current is None:
                continue  # released meanwhile: try to create it again
            holder, generation = current
            age = self._clock() - float((holder or {}).get("renewed", 0.0))
            lease = float((holder or {}).get("lease_seconds", self.lease))
            if holder is not None and age < lease:
                raise WorkdirInUseError(in_use_message(
                    self.workdir, self.path, holder,
                    f", renewed {age:.0f} s ago; if it was killed, its lock expires in "
                    f"{lease - age:.0f} s"))
            try:  # stale: its holder stopped renewing it; only one rewrite of it can succeed
                self._generation = self._write(generation)
                logging.warning("%s: took over the lock of a run that stopped renewing it %.0f s "
                                "ago (%s)", self.path, age, holder)
                return
            except self._conflict:
                continue  # another run took it first: read who
        current = self._read()
        raise WorkdirInUseError(in_use_message(self.workdir, self.path,
                                               current[0] if current else None))

    def renew(self) -> None:
        """Rewrites the record if this holder still has it; else records the loss (`check`)."""
        try:
            self._generation = self._write(self._generation)
        except self._conflict:
            current = self._read()
            holder = current[0] if current else None
            self._lost = in_use_message(self.workdir, self.path, holder,
                                        ", which took the lock over from this run")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a transient storage error: retried next time
                logging.warning("%s: renewing the lock failed (%s); retrying", self.path, e)
            if self._lost:
                return

    def check(self) -> None:
        """Raises `WorkdirInUseError` once another run took the lock over."""
        if self._lost:
            raise WorkdirInUseError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._generation is not None and not self._lost:
            try:
                self._bucket.blob(self.name).delete(if_generation_match=self._generation)
            except self._conflict:
                pass
            except Exception as e:  # noqa: BLE001 - the lease expires anyway
                logging.warning("%s: releasing the lock failed (%s); it expires in %.0f s",
                                self.path, e, self.lease)
        self._generation = None

    def __enter__(self) -> GcsLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, primary: bool = True
         ) -> Iterator[LocalLock | GcsLock | None]:
    """The workdir's lock for the block. In a multi-process run only process 0 (`primary`) takes
    it (the processes share the workdir); the others learn whether it was refused, so every
    process stops at once."""
    lock, refusal = None, None
    if primary:
        try:
            lock = acquire(workdir)
        except UserError as e:  # in use, or its lock unreachable: every process stops
            refusal = e
    import jax

    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
        if refused and refusal is None:
            refusal = WorkdirInUseError(f"--workdir={workdir}: in use by another run, or its lock "
                                        "cannot be taken (process 0 says which)")
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
