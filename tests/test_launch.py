"""launch/: the Cloud TPU VM scripts, run against a fake `gcloud` (and a fake `uv`) on PATH that
run the worker commands locally, each fake worker with its own home folder; the Slurm script
against a fake `srun` that records each task's environment."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import SHELLCHECK, need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
WORKERS = 2
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))

FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env python3
    # gcloud stand-in: tpu-vm ssh/scp act on local worker homes; every call is logged.
    import os, shutil, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write("gcloud " + " ".join(args) + "\\n")
    opt = {a.split("=")[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
    homes = sorted(os.path.join(os.environ["FAKE_WORKERS"], w)
                   for w in os.listdir(os.environ["FAKE_WORKERS"]))
    chosen = homes if opt.get("--worker") == "all" else [homes[int(opt.get("--worker", 0))]]
    status = 0
    if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        command = args[args.index("--command") + 1]
        for home in chosen:
            env = dict(os.environ, HOME=home)
            status |= subprocess.call(["bash", "-c", command], cwd=home, env=env)
    elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        source, target = args[4], args[5].split(":", 1)[1]
        for home in chosen:
            shutil.copy(source, os.path.join(home, target))
    sys.exit(status)
    """)

FAKE_UV = textwrap.dedent(f"""\
    #!/usr/bin/env bash
    # uv stand-in (no network): a venv whose python is the test's interpreter
    echo "uv $*" >> "$FAKE_LOG"
    if [[ "$1" == venv ]]; then
      mkdir -p "${{@: -1}}/bin"
      printf '#!/usr/bin/env bash\\nexec {sys.executable} "$@"\\n' > "${{@: -1}}/bin/python"
      chmod +x "${{@: -1}}/bin/python"
    fi
    """)


@pytest.fixture
def fake_cloud(tmp_path):
    """(environment for the scripts, log file, worker homes, runs dir)."""
    bin_dir, homes = tmp_path / "bin", tmp_path / "workers"
    bin_dir.mkdir()
    for i in range(WORKERS):
        (homes / f"worker{i}").mkdir(parents=True)
    for name, text in (("gcloud", FAKE_GCLOUD), ("uv", FAKE_UV)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env_file, log, runs = tmp_path / "env.sh", tmp_path / "calls.log", tmp_path / "runs"
    env_file.write_text(textwrap.dedent(f"""\
        export PROJECT=p ZONE=z TPU_NAME=mgd-v4-32 ACCELERATOR_TYPE=v4-32
        export RUNTIME_VERSION=tpu-ubuntu2204-base SPOT=1 QUEUED=0 PYTHON_VERSION=3.11
        export EXTRAS=tpu,gcs BUCKET=b RUNS_DIR={runs} MOUNT_BUCKET=0 DATA_DIR={tmp_path}/data
        export SPLIT_DIR= STOP_GRACE=3 REPO_REF=HEAD
        """))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               MGD_LAUNCH_ENV=str(env_file), FAKE_LOG=str(log), FAKE_WORKERS=str(homes))
    log.write_text("")
    return env, log, homes, runs


def _script(name, *args, env):
    return subprocess.run(["bash", os.path.join(LAUNCH, name), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_scripts_are_shellcheck_clean():
    need("shellcheck")
    result = subprocess.run([SHELLCHECK, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_prints_the_commands_and_runs_nothing(fake_cloud):
    env, log, homes, _ = fake_cloud
    for name, args in (("create_tpu.sh", []), ("sync.sh", []), ("setup_worker.sh", []),
                       ("run.sh", ["configs/voc.py", "r1"]), ("stop.sh", []), ("tail.sh", []),
                       ("prepare_data.sh", ["voc", "/manual"]), ("delete_tpu.sh", []),
                       ("tensorboard.sh", ["r1"])):
        result = _script(name, "--dry-run", *args, env=env)
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith("+ "), (name, result.stdout)
    assert log.read_text() == ""
    assert all(not os.listdir(homes / w) for w in os.listdir(homes))
    create = _script("create_tpu.sh", "--dry-run", env=env).stdout
    assert "tpu-vm create mgd-v4-32" in create and "--accelerator-type=v4-32" in create
    assert "--spot" in create
    queued_env = Path(env["MGD_LAUNCH_ENV"]).with_name("queued.sh")
    queued_env.write_text(Path(env["MGD_LAUNCH_ENV"]).read_text().replace("QUEUED=0", "QUEUED=1"))
    queued = _script("create_tpu.sh", "--dry-run", env=dict(env, MGD_LAUNCH_ENV=str(queued_env))
                     ).stdout
    assert "queued-resources create mgd-v4-32 --node-id=mgd-v4-32" in queued


def test_setup_and_sync_twice_then_the_run_finds_its_environment(fake_cloud):
    env, log, homes, runs = fake_cloud
    for name in ("sync.sh", "setup_worker.sh", "sync.sh", "setup_worker.sh", "sync.sh"):
        result = _script(name, env=env)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
    calls = log.read_text()
    uv_calls = [line for line in calls.splitlines() if line.startswith("uv ")]
    # one environment per worker, created once: kept by the second setup and by every sync
    assert sum(c.startswith("uv venv") for c in uv_calls) == WORKERS, calls
    installs = [c for c in uv_calls if c.startswith("uv pip install")]
    assert len(installs) == 2 * WORKERS and all("/mgd_jax[tpu,gcs]" in c and "~" not in c
                                                for c in installs), installs
    for worker in os.listdir(homes):
        home = homes / worker
        assert (home / "mgd_jax_env/bin/python").exists()
        assert (home / "mgd_jax/mgd_jax/train.py").exists()
        assert not (home / "mgd_jax.new").exists()

    # the training entry point starts on every worker from the environment and the synced code;
    # a config error (here: MGD without teachers) ends it with the one-line error; the console
    # is copied into the workdir (no cluster here: MGD_JAX_DISTRIBUTED=0)
    result = _script("run.sh", "configs/voc.py", "r1", "--config.batch_size=7",
                     env=dict(env, MGD_JAX_DISTRIBUTED="0"))
    assert result.returncode == 0, result.stderr
    console = runs / "r1" / "console"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(
            "exit status" in (home / "mgd_jax_run/console.txt").read_text()
            if (home / "mgd_jax_run/console.txt").exists() else False
            for home in map(homes.joinpath, os.listdir(homes))):
        time.sleep(1)
    for worker in os.listdir(homes):
        text = (homes / worker / "mgd_jax_run/console.txt").read_text()
        assert "JAX " in text and "error: config." in text and "exit status 2" in text, text
    time.sleep(1)
    copies = os.listdir(console)
    assert copies and "exit status 2" in (console / copies[0]).read_text()


FAKE_TRAINER = textwrap.dedent("""\
    # A trainer honouring the contract: on SIGTERM it finishes its step, writes its checkpoint
    # and exits 0 ("stubborn": ignores SIGTERM).
    import os, signal, sys, time
    home = os.environ["HOME"]
    def stop(*_):
        time.sleep(0.5)  # the step in flight
        open(os.path.join(home, "checkpoint"), "w").write("saved")
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "stubborn" else stop)
    os.makedirs(os.path.join(home, "mgd_jax_run"), exist_ok=True)
    open(os.path.join(home, "mgd_jax_run", "train.pid"), "w").write(str(os.getpid()))
    while True:
        time.sleep(0.1)
    """)


def test_stop_waits_for_the_checkpoint_and_kills_what_is_left(fake_cloud, tmp_path):
    env, _, homes, _ = fake_cloud
    assert _script("sync.sh", env=env).returncode == 0
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    workers = sorted(os.listdir(homes))
    # each under a shell that reaps it, as worker_run.sh does (an unreaped exit stays "alive")
    procs = [subprocess.Popen(["bash", "-c", f'{sys.executable} {trainer} {kind}; exit $?'],
                              env=dict(env, HOME=str(homes / w)))
             for w, kind in zip(workers, ("honest", "stubborn"), strict=True)]
    try:
        for w in workers:
            pid_file = homes / w / "mgd_jax_run/train.pid"
            while not pid_file.exists():
                time.sleep(0.1)
        started = time.monotonic()
        result = _script("stop.sh", env=env)
        assert result.returncode == 0, result.stderr
        assert procs[0].wait(timeout=10) == 0
        assert (homes / workers[0] / "checkpoint").read_text() == "saved"
        assert procs[1].wait(timeout=10) == 128 + signal.SIGKILL
        assert "stopped after its checkpoint" in result.stdout
        assert "killed after 3s" in result.stdout
        assert time.monotonic() - started >= 3
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


# srun stand-in: lays the job's tasks out as Slurm does (nodes x --ntasks-per-node; each task
# sees its node's GPUs, or the one bound to it with --gpus-per-task=1) and records each task's
# environment and command in $FAKE_TASKS instead of running it.
FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env python3
    import json, os, sys
    args, opts = sys.argv[1:], {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
    env = os.environ
    nodes = int(env["SLURM_JOB_NUM_NODES"])
    per_node = int(opts.get("ntasks-per-node") or env["SLURM_NTASKS_PER_NODE"])
    gpus = int(env["SLURM_GPUS_ON_NODE"])
    with open(env["FAKE_TASKS"], "a") as f:
        for rank in range(nodes * per_node):
            node, local = divmod(rank, per_node)
            bound = opts.get("gpus-per-task") == "1"
            task = {k: v for k, v in env.items() if k.startswith(("SLURM_", "MGD_JAX_"))}
            task.update(
                SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_NUM_NODES=str(nodes),
                SLURM_STEP_NODELIST=env["SLURM_JOB_NODELIST"],
                SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})",
                CUDA_VISIBLE_DEVICES=str(local) if bound else ",".join(map(str, range(gpus))))
            f.write(json.dumps({"env": task, "command": args}) + "\\n")
    """)


def slurm_tasks(tmp_path, script="slurm.sbatch"):
    """The tasks `sbatch <script>` starts: its #SBATCH lines become the job's environment (as
    sbatch sets it), then the script runs with the fake srun on PATH."""
    directives = dict(line.split()[1][2:].split("=", 1) for line in
                      Path(LAUNCH, script).read_text().splitlines()
                      if line.startswith("#SBATCH --") and "=" in line.split()[1])
    nodes, gpus = int(directives["nodes"]), int(directives["gpus-per-node"])
    per_node = int(directives["ntasks-per-node"])
    bin_dir, home, tasks = tmp_path / "bin", tmp_path / "home", tmp_path / "tasks.jsonl"
    bin_dir.mkdir()
    (home / "mgd_jax").mkdir(parents=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": str(gpus),
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NTASKS": str(nodes * per_node),
           "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    env = dict(os.environ, **job, HOME=str(home), FAKE_TASKS=str(tasks),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", os.path.join(LAUNCH, script)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in tasks.read_text().splitlines()]


def jax_detection(monkeypatch, env, local_device_ids):
    """What `jax.distributed.initialize(local_device_ids=...)` would detect in the task `env`:
    jax's own cluster detection (coordinator, process count, process id, local device ids)."""
    from jax._src import clusters  # the detection `jax.distributed.initialize` runs

    with monkeypatch.context() as m:
        m.setattr(os, "environ", dict(env))
        return clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, local_device_ids, None, None)


def test_slurm_script_starts_one_process_per_gpu(monkeypatch, tmp_path):
    """2 nodes x 4 GPUs: 8 processes, one coordinator, process ids 0-7, each process its own GPU
    (8 distinct node/GPU pairs), 8 devices in all for the one global mesh."""
    from mgd_jax.runtime import parallel

    tasks = slurm_tasks(tmp_path)
    assert len(tasks) == 8
    detected, gpus = [], set()
    for task in tasks:
        env = task["env"]
        assert task["command"][0].endswith("mgd_jax_env/bin/python")
        assert task["command"][1:3] == ["-m", "mgd_jax.main"]
        assert env["MGD_JAX_DISTRIBUTED"] == "1"
        arguments = parallel.slurm_arguments(env)
        address, count, index, local_ids = jax_detection(
            monkeypatch, env, arguments["local_device_ids"])
        assert len(local_ids) == 1
        detected.append((address, count, index))
        gpus.add((env["SLURM_NODEID"], env["CUDA_VISIBLE_DEVICES"].split(",")[local_ids[0]]))
    assert {address for address, _, _ in detected} == {"gpu01:" + str(4242 % 4096 + 61440)}
    assert {count for _, count, _ in detected} == {8}
    assert sorted(index for _, _, index in detected) == list(range(8))
    assert gpus == {(str(n), str(g)) for n in range(2) for g in range(4)}


def test_slurm_startup_passes_the_gpu_and_refuses_idle_ones(monkeypatch):
    import jax

    from mgd_jax.runtime import parallel
    from mgd_jax.runtime.errors import UserError

    task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8",
            "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
            "SLURM_GPUS_ON_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3", "MGD_JAX_DISTRIBUTED": "1"}
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    parallel.initialize_distributed(task)
    assert calls == [{"local_device_ids": [2]}]
    # a task Slurm bound to one GPU sees it as its device 0
    assert parallel.slurm_arguments({**task, "CUDA_VISIBLE_DEVICES": "2"}) == {
        "local_device_ids": [0]}
    # not Slurm, or no GPUs: jax's own defaults
    assert parallel.slurm_arguments({"MGD_JAX_DISTRIBUTED": "1"}) == {}
    assert parallel.slurm_arguments({**task, "SLURM_GPUS_ON_NODE": "0"}) == {}
    # one task per node: 2 of the 8 GPUs would train
    calls.clear()
    with pytest.raises(UserError) as error:
        parallel.initialize_distributed({**task, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                                         "SLURM_LOCALID": "0",
                                         "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
    assert str(error.value) == (
        "Slurm: node 1 runs 1 task(s) for its 4 GPUs (SLURM_GPUS_ON_NODE); each task trains on "
        "one GPU, so some would sit idle: start one task per GPU (srun "
        "--ntasks-per-node=<GPUs per node>, as launch/slurm.sbatch does)")
    assert calls == []
    # a start-up that sees other than one device per task
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    with pytest.raises(UserError, match="^Slurm: 8 tasks see 2 devices in all \\(1 here\\), "
                                        "expected one GPU each"):
        parallel.initialize_distributed(task)
