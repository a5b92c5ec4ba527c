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
        export EXTRAS=tpu,gcs BUCKET=b RUNS_DIR={runs} MOUNT_BUCKET=0 MOUNT={tmp_path}/mnt
        export DATA_DIR={tmp_path}/data
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
    # a bucket folder given relative: env.sh's mount, expanded here (not in the user's shell)
    prepare = _script("prepare_data.sh", "--dry-run", "voc", "raw/voc", env=env).stdout
    mount = Path(env["MGD_LAUNCH_ENV"]).with_name("mnt")
    assert f"--manual_dir={mount}/raw/voc " in prepare.replace("\\", ""), prepare


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


TRAINING = ["-m", "mgd_jax.main", "--config=configs/voc.py:method=mgd,student=resnet18",
            "--workdir=WORKDIR"]


def slurm_tasks(tmp_path, script="slurm.sbatch", args=tuple(TRAINING), finished=True):
    """The tasks `sbatch <script> ARGS` starts: its #SBATCH lines become the job's environment
    (as sbatch sets it), then the script runs with the fake srun (and a fake scontrol, logging
    to tasks.jsonl's sibling scontrol.log) on PATH. WORKDIR in `args` is a folder of tmp_path;
    `finished`: it holds final_metrics.json, as a training that reached its last step leaves."""
    directives = dict(line.split()[1][2:].split("=", 1) for line in
                      Path(LAUNCH, script).read_text().splitlines()
                      if line.startswith("#SBATCH --") and "=" in line.split()[1])
    nodes, gpus = int(directives["nodes"]), int(directives["gpus-per-node"])
    per_node = int(directives["ntasks-per-node"])
    bin_dir, home, tasks = tmp_path / "bin", tmp_path / "home", tmp_path / "tasks.jsonl"
    bin_dir.mkdir()
    (home / "mgd_jax").mkdir(parents=True)
    (home / "mgd_jax_env/bin").mkdir(parents=True)
    (home / "mgd_jax_env/bin/python").write_text(
        f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
    (home / "mgd_jax_env/bin/python").chmod(0o755)
    (tmp_path / "workdir").mkdir()
    if finished:
        (tmp_path / "workdir/final_metrics.json").write_text("{}")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol.log\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": str(gpus),
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NTASKS": str(nodes * per_node),
           "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_NODEID": "0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    env = dict(os.environ, **job, HOME=str(home), FAKE_TASKS=str(tasks),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = [a.replace("WORKDIR", str(tmp_path / "workdir")) for a in args]
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env,
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


def test_slurm_requeues_a_training_stopped_before_its_end(tmp_path):
    """A training that the time-limit signal stopped (exit 0, a checkpoint, no
    final_metrics.json) is requeued under its job id, so it continues and the jobs that wait for
    it (afterok) keep waiting; a finished one is not."""
    for name in ("stopped", "finished"):
        (tmp_path / name).mkdir()
    slurm_tasks(tmp_path / "stopped", finished=False)
    assert (tmp_path / "stopped/scontrol.log").read_text() == "requeue 4242\n"
    slurm_tasks(tmp_path / "finished", finished=True)
    assert not (tmp_path / "finished/scontrol.log").exists()


# ------------------------------------------------------------------------------------------------
# launch/recipe.sh: the paper's recipe on each platform, run with stand-ins for Python (below),
# gcloud (fake_cloud), sbatch and srun. The fake Python plays each tool by its contract: it logs
# its arguments, refuses (exit 3) to start a stage whose input is not there yet (an init or a
# teacher without its meta.json, a student without final_metrics.json), and leaves the files a
# finished stage leaves (written by worker 0 only, as process 0 writes them); FAKE_STOP=<stage
# folder> stops that training before its end (exit 0, no final_metrics.json).
FAKE_PYTHON = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys, time
    args = sys.argv[1:]
    if args[:1] == ["-"]:  # worker_run.sh's console copy
        sys.exit(0)
    if args[0] == "-c":
        if "local_device_count" in args[1]:
            print(os.environ.get("FAKE_DEVICES", "1"))
        sys.exit(0)
    worker = os.environ.get("TPU_WORKER_ID", "0")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({{"args": args, "worker": worker, "home": os.environ["HOME"],
                            "jax_platforms": os.environ.get("JAX_PLATFORMS", "")}}) + "\\n")
    module = args[1]
    opts = dict(a[2:].split("=", 1) for a in args[2:] if a.startswith("--") and "=" in a)

    def need(path):
        if not os.path.exists(path):
            print(f"fake python: {{path}} is not there yet")
            sys.exit(3)

    def leave(path):
        if worker == "0":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").write("{{}}")

    time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
    if module == "mgd_jax.tools.import_weights":
        need(opts["torch"])
        leave(opts["output"] + "/meta.json")
    elif module == "mgd_jax.main":
        for key in ("config.cps.init", "config.student_init", "config.teacher_deep.checkpoint",
                    "config.teacher_wide.checkpoint"):
            if key in opts:
                need(opts[key] + "/meta.json")
        if os.path.basename(opts["workdir"]) != os.environ.get("FAKE_STOP"):
            leave(opts["workdir"] + "/export/meta.json")
            leave(opts["workdir"] + "/final_metrics.json")
    elif module == "mgd_jax.tools.evaluate":
        need(opts["checkpoint"] + "/final_metrics.json")
        leave(opts["checkpoint"] + "/eval_val.json")
    elif module == "mgd_jax.tools.export":
        need(opts["checkpoint"] + "/final_metrics.json")
        leave(opts["output"] + "/deploy.json")
    """)

# sbatch stand-in: logs its arguments (JSON) and answers --parsable with the next job id
FAKE_SBATCH = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    log = os.environ["FAKE_LOG"]
    jobs = sum(1 for line in open(log) if line.startswith('{{"sbatch"'))
    with open(log, "a") as f:
        f.write(json.dumps({{"sbatch": sys.argv[1:]}}) + "\\n")
    print(f"{{100 + jobs}};cluster")
    """)

WEIGHT_FILES = ("resnet18-f37072fd.pth", "mobilenet_v2-b0353104.pth", "resnet101_v1c.pth",
                "wide_resnet50_2-95faca4d.pth", "teacher-voc8-resnet101.pth",
                "teacher-voc8-wideresnet34.pth")
STAGE_ORDER = ("import", "teacher_deep", "teacher_wide", "student", "eval", "export")


@pytest.fixture
def recipe(tmp_path):
    """run(platform, *args, **env) -> CompletedProcess of launch/recipe.sh with the fake Python
    (and sbatch) and a folder of (empty) downloads; .calls() -> the fake Python's calls so far."""
    bin_dir, weights, log = tmp_path / "rbin", tmp_path / "downloads", tmp_path / "python.log"
    bin_dir.mkdir()
    weights.mkdir()
    for name in WEIGHT_FILES:
        (weights / name).write_text("")
    for name, text in (("python", FAKE_PYTHON), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.write_text("")

    class Recipe:
        workdir = tmp_path / "work"
        base_env = dict({k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
                        FAKE_LOG=str(log),
                        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

        def run(self, platform, *args, **env):
            return subprocess.run(
                ["bash", os.path.join(LAUNCH, "recipe.sh"), f"--platform={platform}",
                 f"--weights={weights}", f"--workdir={self.workdir}",
                 f"--python={bin_dir / 'python'}", *args],
                env={**self.base_env, **env}, capture_output=True, text=True, timeout=120)

        def calls(self):
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Recipe()


def _stage(args):
    """The recipe stage a logged command is (by its module and workdir / output)."""
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    module = args[args.index("-m") + 1]
    if module == "mgd_jax.tools.import_weights":
        return "import" if "backbone_only" in " ".join(args) else os.path.basename(opts["output"])
    if module == "mgd_jax.main":
        return os.path.basename(opts["workdir"])
    return {"mgd_jax.tools.evaluate": "eval", "mgd_jax.tools.export": "export"}[module]


def _assert_inits(args):
    """A training command names its start: the init of its method (an imported backbone of the
    workdir, never empty or "none") and, for MGD, both teachers."""
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    method = "mgd" if "method=mgd" in opts["config"] else "cps"
    init = opts["config.student_init" if method == "mgd" else "config.cps.init"]
    assert init not in ("", "none") and "/imagenet/" in init, args
    if method == "mgd":
        assert opts["config.teacher_deep.checkpoint"] and opts["config.teacher_wide.checkpoint"]


def _printed(stdout):
    """The commands a --dry-run printed (`+ ` lines), split as bash would."""
    import shlex

    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("platform", ["gpu", "multi-gpu", "colab", "slurm"])
def test_recipe_dry_run_prints_every_stage_in_order_with_its_init(recipe, platform):
    result = recipe.run(platform, "--dry-run", "--", "--config.batch_size=16")
    assert result.returncode == 0, result.stderr
    assert recipe.calls() == []  # nothing ran
    commands = [c for c in _printed(result.stdout) if "-m" in c]
    stages = [_stage(c) for c in commands]
    assert [STAGE_ORDER.index(s) for s in stages] == sorted(map(STAGE_ORDER.index, stages))
    assert stages == ["import"] * 3 + ["teacher_deep", "teacher_wide", "student", "eval", "export"]
    for command in commands:
        if "mgd_jax.main" in command:
            _assert_inits(command)
            assert command[-1] == "--config.batch_size=16"
    if platform == "slurm":  # each job after the jobs of the stages it needs
        after = {_stage(c): next((a.split(":", 1)[1] for a in c if a.startswith(
            "--dependency=afterok:")), "") for c in commands}
        assert after["student"] == "JOB1:JOB4:JOB5"  # its backbone's import, both teachers
        assert (after["teacher_deep"], after["teacher_wide"]) == ("JOB2", "JOB3")
        assert after["eval"] == after["export"] == "JOB6"


def test_recipe_runs_each_stage_after_the_ones_it_needs_and_continues_after_a_stop(recipe):
    """One GPU: the stages in order (the fake Python refuses one whose input is missing); a
    training stopped before its end starts nothing after it; the same command then continues
    there, and once finished runs nothing again."""
    first = recipe.run("gpu", FAKE_STOP="teacher_wide")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "teacher_wide stopped before it finished" in first.stdout
    stages = [_stage(c["args"]) for c in recipe.calls()]
    assert stages == ["import"] * 3 + ["teacher_deep", "teacher_wide"]
    second = recipe.run("gpu")
    assert second.returncode == 0, second.stdout + second.stderr
    calls = recipe.calls()
    assert [_stage(c["args"]) for c in calls[5:]] == [
        "teacher_wide", "student", "eval", "export"]
    for call in calls:
        if "mgd_jax.main" in call["args"]:
            _assert_inits(call["args"])
    assert (recipe.workdir / "student_deploy/deploy.json").exists()
    third = recipe.run("gpu")
    assert third.returncode == 0 and len(recipe.calls()) == len(calls)
    assert third.stdout.count(": done (") == 8


def test_recipe_official_teachers_replace_the_teacher_trainings(recipe):
    result = recipe.run("gpu", "--teachers=official")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [c["args"] for c in recipe.calls()]
    assert [_stage(c) for c in calls] == ["import", "teacher_deep_official",
                                          "teacher_wide_official", "student", "eval", "export"]
    assert "--prefix=branch1" in calls[1] and "--num_classes=21" in calls[2]
    refused = recipe.run("gpu", "--teachers=official", "--partition=4")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: --teachers=official: the authors published 1/8 "
                                      "teachers only (--partition=8)")


def test_recipe_multi_gpu_refuses_a_single_device(recipe):
    one = recipe.run("multi-gpu", FAKE_DEVICES="1")
    assert one.returncode == 2 and one.stderr.startswith(
        "error: --platform=multi-gpu: jax sees 1 device(s)"), one.stderr
    assert recipe.calls() == []
    assert recipe.run("multi-gpu", FAKE_DEVICES="4").returncode == 0


def test_recipe_slurm_submits_each_stage_after_the_ones_it_needs(recipe):
    def jobs():
        submitted = [c["sbatch"] for c in map(json.loads, Path(
            recipe.base_env["FAKE_LOG"]).read_text().splitlines()) if "sbatch" in c]
        out = {}
        for number, args in enumerate(submitted, 100):
            command = args[args.index(os.path.join(LAUNCH, "slurm.sbatch")) + 1:]
            dependency = next((a for a in args if a.startswith("--dependency=")), "")
            out[_stage(command) if "--backbone_only" not in command
                else "import_" + command[command.index("--backbone_only") + 1][11:]] = (
                number, dependency, args, command)
        return out

    result = recipe.run("slurm", "--nodes=2", "--gpus_per_node=4")
    assert result.returncode == 0, result.stdout + result.stderr
    first = jobs()
    ids = {name: str(job[0]) for name, job in first.items()}
    assert first["teacher_deep"][1] == f"--dependency=afterok:{ids['import_resnet101']}"
    assert first["teacher_wide"][1] == f"--dependency=afterok:{ids['import_wide_resnet50_2']}"
    assert first["student"][1] == "--dependency=afterok:" + ":".join(
        ids[n] for n in ("import_resnet18", "teacher_deep", "teacher_wide"))
    assert first["eval"][1] == first["export"][1] == f"--dependency=afterok:{ids['student']}"
    for name in ("teacher_deep", "teacher_wide", "student"):
        _, _, args, command = first[name]
        assert {"--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4"} <= set(args)
        _assert_inits(command)
    assert {"--nodes=1", "--gpus-per-node=1", "--ntasks-per-node=1"} <= set(first["eval"][2])
    # the deep teacher (and the imports) finished meanwhile: resubmitting skips them
    for name in ("resnet101", "wide_resnet50_2", "resnet18"):
        (recipe.workdir / "imagenet" / name).mkdir(parents=True)
        (recipe.workdir / "imagenet" / name / "meta.json").write_text("{}")
    (recipe.workdir / "teacher_deep").mkdir()
    (recipe.workdir / "teacher_deep/final_metrics.json").write_text("{}")
    Path(recipe.base_env["FAKE_LOG"]).write_text("")
    assert recipe.run("slurm").returncode == 0
    second = jobs()
    assert set(second) == {"teacher_wide", "student", "eval", "export"}
    assert second["teacher_wide"][1] == ""
    assert second["student"][1] == f"--dependency=afterok:{second['teacher_wide'][0]}"


def test_recipe_on_tpu_recreates_deletes_first_honours_prefixes_and_expands_on_the_worker(
        fake_cloud):
    """From your machine (--dry-run: nothing reaches a VM): --recreate deletes the VM before it
    creates it; SPOT / QUEUED prefixes win over env.sh, which here exports them unconditionally
    (SPOT=1 QUEUED=0); the remote command carries env.sh's values, expanded here, and the
    workers' own paths ($HOME) unexpanded, for the worker's shell."""
    env, log, _, runs = fake_cloud
    recipe_args = ["--dry-run", "--recreate", "--", "--config.batch_size=16"]
    for prefix, delete, create in (
            ({}, "tpu-vm delete mgd-v4-32", "tpu-vm create mgd-v4-32"),
            ({"SPOT": "0"}, "tpu-vm delete mgd-v4-32", "tpu-vm create mgd-v4-32"),
            ({"QUEUED": "1"}, "queued-resources delete mgd-v4-32",
             "queued-resources create mgd-v4-32")):
        result = _script("recipe.sh", "--platform=tpu", "--weights=gs://b/weights", *recipe_args,
                         env=dict(env, **prefix))
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        deleted = next(i for i, line in enumerate(lines) if delete in line)
        created = next(i for i, line in enumerate(lines) if create in line)
        assert deleted < created, lines
        assert ("--spot" in lines[created]) == (prefix.get("SPOT", "1") == "1"), lines[created]
    assert log.read_text() == ""
    remote = _printed(lines[-2] + "\n")[0]
    command = remote[remote.index("--command") + 1]
    assert command.startswith("cd $HOME/mgd_jax && nohup bash launch/recipe.sh "
                              "--python=$HOME/mgd_jax_env/bin/python --platform=tpu-worker ")
    assert f"--workdir={runs}/voc8_resnet18 " in command
    assert f"--data_dir={env['MGD_LAUNCH_ENV'][:-len('env.sh')]}data " in command
    assert "--weights=gs://b/weights" in command and "-- --config.batch_size=16" in command
    # the workers cannot read this machine's folders
    local = _script("recipe.sh", "--platform=tpu", "--weights=/home/me/downloads", "--dry-run",
                    env=env)
    assert local.returncode == 2 and "gcloud storage cp" in local.stderr


def test_recipe_on_tpu_workers_runs_single_process_tools_on_worker_0_only(recipe, tmp_path):
    """Each worker runs the stages in order (what --platform=tpu starts on every worker): the
    trainings and the evaluation on every worker through worker_run.sh (pid for stop.sh,
    console), the imports and the export on worker 0 alone, on the CPU; worker 1 waits for what
    worker 0 writes. A stage stopped by launch/stop.sh starts nothing after it."""
    procs = {}
    for worker in ("1", "0"):
        home = tmp_path / f"home{worker}"
        home.mkdir()
        procs[worker] = subprocess.Popen(
            ["bash", os.path.join(LAUNCH, "recipe.sh"), "--platform=tpu-worker",
             f"--weights={tmp_path / 'downloads'}", f"--workdir={recipe.workdir}",
             f"--python={tmp_path / 'rbin/python'}"],
            env=dict(recipe.base_env, HOME=str(home), TPU_WORKER_ID=worker,
                     MGD_RECIPE_POLL="0.1", FAKE_SECONDS="0.3"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for worker, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, (worker, out)
    by_worker = {w: [(_stage(c["args"]), c["jax_platforms"]) for c in recipe.calls()
                     if c["worker"] == w] for w in procs}
    assert by_worker["0"] == [("import", "cpu")] * 3 + [
        (s, "") for s in ("teacher_deep", "teacher_wide", "student", "eval")] + [("export", "cpu")]
    assert by_worker["1"] == [(s, "") for s in ("teacher_deep", "teacher_wide", "student", "eval")]
    for worker in procs:  # worker_run.sh ran them: its console, its pid file (removed at the end)
        assert (tmp_path / f"home{worker}/mgd_jax_run/console.txt").exists()
        assert not (tmp_path / f"home{worker}/mgd_jax_run/train.pid").exists()
    # stopped by launch/stop.sh (its flag) during the student: no evaluation, no export
    for name in ("student", "student_deploy"):
        subprocess.run(["rm", "-rf", str(recipe.workdir / name)], check=True)
    stopper = tmp_path / "rbin/python_stopping"
    stopper.write_text(f"#!/usr/bin/env bash\nif [[ \"$*\" == *mgd_jax.main* ]]; then mkdir -p "
                       f"$HOME/mgd_jax_run; touch $HOME/mgd_jax_run/stop_requested; exit 0; fi\n"
                       f"exec {tmp_path / 'rbin/python'} \"$@\"\n")
    stopper.chmod(0o755)
    stopped = subprocess.run(
        ["bash", os.path.join(LAUNCH, "recipe.sh"), "--platform=tpu-worker",
         f"--weights={tmp_path / 'downloads'}", f"--workdir={recipe.workdir}",
         f"--python={stopper}"],
        env=dict(recipe.base_env, HOME=str(tmp_path / "home1"), TPU_WORKER_ID="1"),
        capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "student stopped before it finished" in stopped.stdout
    assert "recipe: eval" not in stopped.stdout
    # a second recipe on a worker whose first still runs is refused
    (tmp_path / "home1/mgd_jax_run/recipe.pid").write_text(str(os.getpid()))
    twice = subprocess.run(stopped.args, env=dict(recipe.base_env, HOME=str(tmp_path / "home1"),
                                                  TPU_WORKER_ID="1"),
                           capture_output=True, text=True, timeout=60)
    assert twice.returncode == 2 and "a recipe is running here already" in twice.stderr


def _slug(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation other than - and _
    dropped, spaces as hyphens."""
    import re

    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\]\([^)]*\)", "", text).replace("[", "")  # a link's text stays
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_linked_file_and_anchor_exists():
    """Every relative link of the repository's markdown (README.md, docs/, launch/, ...) and
    every docs/*.md named in the launch scripts and the configs points at a file
    that exists, and at a heading of it where it names one (what env.example.sh's link to a
    docs/scaling.md that never existed would have failed)."""
    import re

    skip = {".git", ".venv", "node_modules", "build", "dist"}
    markdown, sources = [], []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".md"):
                markdown.append(path)
            elif name.endswith((".py", ".sh", ".sbatch")) and os.path.relpath(
                    folder, ROOT).split(os.sep)[0] in ("launch", "configs"):
                sources.append(path)
    links = []  # (file, target path, anchor)
    for path in markdown:
        text = re.sub(r"```.*?```", "", Path(path).read_text(), flags=re.S)  # code is no link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            links.append((path, os.path.normpath(os.path.join(os.path.dirname(path), file))
                          if file else path, anchor))
    for path in sources:
        for file, anchor in re.findall(r"\b(docs/[\w.-]+\.md)(?:#([\w-]+))?",
                                       Path(path).read_text()):
            links.append((path, os.path.join(ROOT, file), anchor))
    assert len(markdown) >= 5 and links
    broken = []
    for source, target, anchor in links:
        where = f"{os.path.relpath(source, ROOT)} -> {os.path.relpath(target, ROOT)}"
        if not os.path.exists(target):
            broken.append(where)
        elif anchor and target.endswith(".md"):
            headings = re.findall(r"^#+\s+(.+?)\s*$", re.sub(
                r"```.*?```", "", Path(target).read_text(), flags=re.S), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{where}#{anchor}")
    assert not broken, broken


@pytest.mark.parametrize("platform", ["gpu", "slurm"])
def test_recipe_commands_are_ones_the_tools_accept(recipe, platform, monkeypatch):
    """Each command the recipe prints parses with its tool's own flags (absl, and ml_collections
    for the config and its --config.<field> overrides, which must name existing fields): a
    renamed flag or config field fails here, not days into a run."""
    import importlib

    from absl import flags as absl_flags
    from ml_collections import config_flags

    result = recipe.run(platform, "--dry-run", "--data_dir=/data",
                        "--", "--config.batch_size=16", "--config.eval.batch_size=16")
    assert result.returncode == 0, result.stderr
    monkeypatch.chdir(ROOT)  # the configs are named from the repository root
    commands = [c for c in _printed(result.stdout) if "-m" in c]
    assert len(commands) == 8
    for command in commands:
        module = command[command.index("-m") + 1]
        argv = [module, *command[command.index("-m") + 2:]]
        tool_flags = importlib.import_module(module).FLAGS
        config_args = [a for a in argv[1:] if a.startswith("--config")]
        for arg in argv[1:]:
            if arg not in config_args:
                assert arg[2:].split("=")[0] in tool_flags, (module, arg)
        if config_args:  # the tool's config flag, fresh (its overrides register once)
            assert module == "mgd_jax.main" and "config" in tool_flags
            parsed = absl_flags.FlagValues()
            config_flags.DEFINE_config_file("config", flag_values=parsed, lock_config=True,
                                            sys_argv=[module, *config_args])
            parsed([module, *config_args])  # raises on an unknown config field
            config = parsed["config"].value
            assert config.data_dir == "/data" and config.batch_size == 16
            assert config.eval.batch_size == 16
            assert (config.cps.init if config.method == "cps" else config.student_init)
