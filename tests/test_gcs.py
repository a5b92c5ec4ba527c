"""Workdirs on Google Cloud Storage, against a local GCS emulator (`gcp-storage-emulator` on
loopback; no network). Every writer of a workdir reaches it: etils.epath through gcsfs (config,
network and final-metrics JSON, parameters.txt, metrics.jsonl, log.txt, panels, the grain iterator
state) with STORAGE_EMULATOR_HOST, orbax's arrays through tensorstore with
TENSORSTORE_GCS_HTTP_URL, TensorBoard event files through google-cloud-storage with
STORAGE_EMULATOR_HOST."""

import gc
import json
import os

import pytest

import multiprocess
from conftest import need

BUCKET = "mgd-test-bucket"


@pytest.fixture(scope="module")
def gcs():
    """A running emulator; yields the bucket's URL (`gs://...`)."""
    need("gcp_storage_emulator", "gcsfs", "google.cloud.storage")
    from gcp_storage_emulator.server import create_server

    port = multiprocess.free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", url)
        patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        patch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        try:
            yield f"gs://{BUCKET}"
        finally:
            gc.collect()  # tensorboardX's writers upload once more when collected
            server.stop()


def _objects(prefix: str) -> list[str]:
    """Object names under `prefix`, listed by the storage client (not through epath)."""
    from google.cloud import storage

    client = storage.Client(project="test")
    return [b.name for b in client.list_blobs(BUCKET, prefix=prefix)]


def test_metrics_file_keeps_one_row_per_step_across_restarts(gcs, tmp_path):
    from mgd_jax.runtime import reporting

    for where in (str(tmp_path / "metrics.jsonl"), f"{gcs}/metrics_test/metrics.jsonl"):
        first = reporting.MetricsFile(where, sync_seconds=1e9)  # remote: written on close only
        for step in (1, 2, 3):
            first.write({"step": step, "train/loss": float(step)})
        first.write({"step": 2, "eval/miou": 0.5})
        first.close()
        # the run restarts from its checkpoint at step 2: step 3 is trained and logged again
        again = reporting.MetricsFile(where)
        again.restart_at(2)
        again.write({"step": 2, "eval/miou": 0.5})  # e.g. an evaluation repeated at resume
        for step in (3, 4):
            again.write({"step": step, "train/loss": 10.0 * step})
        again.close()
        from etils import epath

        rows = [json.loads(line) for line in epath.Path(where).read_text().splitlines()]
        assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
                        {"step": 2, "eval/miou": 0.5}, {"step": 3, "train/loss": 30.0},
                        {"step": 4, "train/loss": 40.0}], where
    assert _objects("metrics_test/") == ["metrics_test/metrics.jsonl"]


def test_workdir_writers_reach_the_bucket(gcs, tmp_path, monkeypatch):
    """The writers of a training workdir, each on gs:// (train.train_and_evaluate passes them
    `<workdir>/...` unchanged). Not here: orbax's writers (train-state checkpoints, exported
    networks): their OCDBT manifest updates get "Malformed StorageGeneration" from this emulator
    (its object generations), a limitation of the stand-in; on GCS orbax writes gs:// natively."""
    import logging

    import numpy as np
    from etils import epath

    from mgd_jax.runtime import logs, paths, reporting

    monkeypatch.chdir(tmp_path)  # a gs:// path turned into a local folder would land here
    workdir = f"{gcs}/runs/writers"
    assert str(paths.resolve(workdir)) == workdir
    with logs.log_file(workdir):
        reporter = reporting.Reporter(workdir, total_steps=4)
        reporter.scalars(2, {"train/loss": 1.5})
        reporter.text("config", "a: 1")
        panel = reporter.image("panels", np.zeros((8, 8, 3), np.uint8), 2)
        reporter.close()
        logging.getLogger("mgd_jax.test").info("a line for the log file")
    # tensorboardX keeps the closed writer alive (an atexit closure) and its GCS record writer
    # uploads once more when collected at exit: on GCS a harmless repeat, here (the emulator gone
    # by then) two minutes of retries. For the rest of this test process (the writer is
    # collected at exit, after any monkeypatch is undone).
    from tensorboardX import record_writer
    record_writer.GCSRecordWriter.__del__ = lambda self: None
    assert os.listdir(tmp_path) == []

    files = {n[len("runs/writers/"):] for n in _objects("runs/writers/")}
    for expected in ("metrics.jsonl", "log.txt", "panels/panels_0000002.png"):
        assert expected in files, sorted(files)
    assert panel == f"{workdir}/panels/panels_0000002.png"
    assert any(f.startswith("events.out.tfevents.") for f in files), sorted(files)
    root = epath.Path(workdir)
    assert "a line for the log file" in (root / "log.txt").read_text()
    assert json.loads((root / "metrics.jsonl").read_text()) == {"step": 2, "train/loss": 1.5}
