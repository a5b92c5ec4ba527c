"""One run per workdir (runtime/workdir_lock.py): a local lock refuses a second holder at once
naming it and is freed by the kernel when its holder is SIGKILLed; the gs:// lock, against an
in-memory stand-in of the storage client that ENFORCES generation preconditions (the local GCS
emulator ignores them): a second holder refused, a stale lease taken over, a takeover race with
one winner, a holder that lost its lock told so. A training run's use of it:
tests/test_reliability.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import test_gcs

from mgd_jax.runtime import workdir_lock
from mgd_jax.runtime.errors import WorkdirInUseError

from conftest import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gcs = test_gcs.gcs  # the local GCS emulator (a fixture)

HOLD = '''
import sys, time
from mgd_jax.runtime import workdir_lock
lock = workdir_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
'''


def hold_in_child(workdir):
    """A process holding `workdir`'s lock (once it printed "held")."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_local_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path):
    proc = hold_in_child(tmp_path)
    try:
        with pytest.raises(WorkdirInUseError) as refused:
            workdir_lock.acquire(tmp_path)
        message = str(refused.value)
        assert message.startswith(f"--workdir={tmp_path}: in use by another run (host "
                                  f"{socket.gethostname()}, pid {proc.pid}, started ")
        assert f"lock {tmp_path / workdir_lock.LOCK_FILE}" in message
        assert "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # SIGKILL: no clean-up ran, its record is still there, and the lock is free at once.
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == proc.pid
    with workdir_lock.acquire(tmp_path) as lock:
        assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.check()
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""  # released: no holder named
    workdir_lock.acquire(tmp_path).release()


# ----------------------------------------------------------------------------------------------
# gs://


class FakeStorage:
    """The objects of one bucket, with google-cloud-storage's generation preconditions enforced:
    a write or delete with `if_generation_match=g` happens only if the object's generation is g
    (0: the object is absent), else PreconditionFailed (NotFound for a missing object)."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 1000
        self.lock = threading.Lock()
        self.before_read = lambda: None  # a seam for the race test

    def bucket(self, name):
        return FakeBucket(self)

    def check(self, name, match):
        from google.api_core import exceptions

        current = self.objects.get(name, (b"", 0))[1]
        if match is not None and current != match:
            if current == 0 and match != 0:
                raise exceptions.NotFound(f"{name}: no such object")
            raise exceptions.PreconditionFailed(f"{name}: generation {current}, not {match}")


class FakeBucket:
    def __init__(self, storage):
        self.storage = storage

    def blob(self, name):
        return FakeBlob(self.storage, name)

    def get_blob(self, name):
        self.storage.before_read()
        with self.storage.lock:
            if name not in self.storage.objects:
                return None
            return FakeBlob(self.storage, name, self.storage.objects[name][1])


class FakeBlob:
    def __init__(self, storage, name, generation=None):
        self.storage, self.name, self.generation = storage, name, generation

    def upload_from_string(self, data, content_type=None, if_generation_match=None):
        with self.storage.lock:
            self.storage.check(self.name, if_generation_match)
            self.storage.generation += 1
            self.generation = self.storage.generation
            self.storage.objects[self.name] = (bytes(data), self.generation)

    def download_as_bytes(self, if_generation_match=None):
        with self.storage.lock:
            self.storage.check(self.name, if_generation_match)
            return self.storage.objects[self.name][0]

    def delete(self, if_generation_match=None):
        with self.storage.lock:
            self.storage.check(self.name, if_generation_match)
            del self.storage.objects[self.name]


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


URL = "gs://bucket/runs/r1"
NAME = f"runs/r1/{workdir_lock.LOCK_FILE}"


def gcs_lock(storage, clock, lease=60.0):
    return workdir_lock.GcsLock(URL, lease_seconds=lease, client=storage, clock=clock,
                                renew=False)


def test_gcs_lock_refuses_a_second_holder_and_takes_over_a_stale_one():
    need("google.cloud.storage")
    storage, clock = FakeStorage(), Clock()
    first = gcs_lock(storage, clock)
    assert json.loads(storage.objects[NAME][0])["renewed"] == clock.now
    clock.now += 30
    with pytest.raises(WorkdirInUseError, match=(
            rf"^--workdir={URL}: in use by another run \(host {socket.gethostname()}, pid "
            rf"{os.getpid()}, started .* UTC, renewed 30 s ago; if it was killed, its lock "
            rf"expires in 30 s; lock gs://bucket/{NAME}\)")):
        gcs_lock(storage, clock)
    first.renew()  # the holder's heartbeat: conditional on its own generation
    clock.now += 59
    with pytest.raises(WorkdirInUseError):
        gcs_lock(storage, clock)

    # The holder is killed (no more renewals): a lease later its lock is taken over ...
    clock.now += 2
    second = gcs_lock(storage, clock)
    assert storage.objects[NAME][1] == second._generation
    # ... and the old holder, should it come back, finds it lost and stops.
    first.renew()
    with pytest.raises(WorkdirInUseError, match="took the lock over from this run"):
        first.check()
    first.release()  # deletes nothing that is not its own
    assert NAME in storage.objects
    second.check()
    second.release()
    assert NAME not in storage.objects
    gcs_lock(storage, clock).release()


def test_gcs_takeover_race_has_one_winner():
    """Two runs find the same stale lock; both rewrite it conditional on the generation they read:
    exactly one succeeds, the other is refused naming the winner."""
    need("google.cloud.storage")
    storage, clock = FakeStorage(), Clock()
    gcs_lock(storage, clock)  # its holder dies
    clock.now += 3600
    both_read = threading.Barrier(2, timeout=10)
    reads = []

    def read_together():
        reads.append(1)
        if len(reads) <= 2:  # the first read of each contender: both see the stale generation
            both_read.wait()

    storage.before_read = read_together
    results = []

    def contend(index):
        try:
            results.append(("won", index, gcs_lock(storage, Clock(clock.now + index))))
        except WorkdirInUseError as e:
            results.append(("refused", index, str(e)))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(r[0] for r in results) == ["refused", "won"], results
    (won,) = [r for r in results if r[0] == "won"]
    (refused,) = [r for r in results if r[0] == "refused"]
    assert storage.objects[NAME][1] == won[2]._generation
    assert refused[2].startswith(f"--workdir={URL}: in use by another run (host "), refused[2]


def test_gcs_lock_renews_on_its_own_thread():
    need("google.cloud.storage")
    storage = FakeStorage()
    lock = workdir_lock.GcsLock(URL, lease_seconds=0.2, client=storage)
    generation = storage.objects[NAME][1]
    for _ in range(200):
        if storage.objects[NAME][1] != generation:
            break
        threading.Event().wait(0.01)
    assert storage.objects[NAME][1] > generation  # renewed (every lease / 4)
    lock.release()
    assert NAME not in storage.objects


def test_gcs_lock_through_the_storage_client(gcs):
    """The calls the lock makes, through google-cloud-storage against the local emulator (which
    ignores preconditions: only the holder's own path is checked here)."""
    from google.cloud import storage

    lock = workdir_lock.acquire(f"{gcs}/runs/locked")
    bucket = storage.Client(project="test").bucket(gcs.removeprefix("gs://"))
    blob = bucket.get_blob(f"runs/locked/{workdir_lock.LOCK_FILE}")
    record = json.loads(blob.download_as_bytes())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    lock.renew()
    lock.check()
    lock.release()
    assert bucket.get_blob(f"runs/locked/{workdir_lock.LOCK_FILE}") is None


def test_the_demo_holds_its_workdir(tmp_path):
    """A demo on a workdir in use is refused before it writes anything (its stages hold their
    own sub-workdirs: the stage runs are `train.train_and_evaluate` runs)."""
    from test_demo import demo_config

    from mgd_jax.workflows import demo

    holder = hold_in_child(tmp_path)
    try:
        with pytest.raises(WorkdirInUseError, match=f"pid {holder.pid}, started "):
            demo.run(demo_config(None), str(tmp_path))
        assert os.listdir(tmp_path) == [workdir_lock.LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


TWO_PROCESSES = '''
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from mgd_jax.runtime import workdir_lock
from mgd_jax.runtime.errors import WorkdirInUseError
try:
    with workdir_lock.hold(sys.argv[3], primary=jax.process_index() == 0) as lock:
        print("held" if lock is not None else "joined", flush=True)
except WorkdirInUseError as e:
    print(f"refused: {e}", flush=True)
jax.distributed.shutdown()
'''


def test_a_multi_process_run_is_one_holder(tmp_path):
    """Process 0 takes the lock for the run; when it is refused, every process stops."""
    import multiprocess

    def run_two():
        address = f"localhost:{multiprocess.free_port()}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(i), address,
                                   str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for i in range(2)]
        # (the last line: the collectives library may print its own before it)
        return [proc.communicate(timeout=120)[0].strip().splitlines()[-1] for proc in procs]

    assert run_two() == ["held", "joined"]
    holder = hold_in_child(tmp_path)
    try:
        first, second = run_two()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert first.startswith(f"refused: --workdir={tmp_path}: in use by another run (host ")
    assert f"pid {holder.pid}, started " in first
    assert second == (f"refused: --workdir={tmp_path}: in use by another run, or its lock cannot "
                      "be taken (process 0 says which)")
