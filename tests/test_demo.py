"""The embedded default as shipped, through the README's own command (it is CI-sized: about five
minutes on 2 cores): every stage end to end, the table, results.json, and its claim that the MGD
student beats the Sup.l student by at least 3 mIoU points (same architecture, steps, labeled subset
and seed)."""

import importlib.util
import json
import os
import subprocess
import sys

from mgd_jax import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(arg):
    spec = importlib.util.spec_from_file_location("demo_config", f"{ROOT}/configs/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_stage_configs_share_the_student_setting():
    c = demo_config(None)
    sup = demo.stage_config(c, "student_supervised", "/w")
    mgd = demo.stage_config(c, "student_mgd", "/w")
    for field in ("student", "num_train_steps", "seed", "partition", "labeled_count", "lr",
                  "batch_size", "crop_size"):
        assert sup[field] == mgd[field], field
    assert sup.model == mgd.model
    assert (sup.method, mgd.method) == ("supervised", "mgd")
    assert mgd.teacher_deep.checkpoint == "/w/teacher_deep/export"
    assert demo_config("stage=teacher_wide").cps.backbone == "wide_resnet50_2"


def test_demo_mgd_beats_supervised(tmp_path):
    # A subprocess on one CPU device, exactly as a user runs it (the test session simulates 8).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-m", "mgd_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "student_mgd" in proc.stdout and "mIoU %" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"teacher_resnet101", "teacher_wide_resnet50_2",
                            "student_supervised", "student_mgd"}
    for r in results.values():
        assert 0 <= r["miou"] <= 1 and r["params"] > 0 and r["arch"]
    assert results["student_supervised"]["params"] == results["student_mgd"]["params"]
    assert results["teacher_resnet101"]["params"] > results["student_mgd"]["params"]
    # Each stage is an ordinary run in its own sub-workdir; MGD evaluated the loaded teachers.
    mgd = json.loads((tmp_path / "student_mgd" / "final_metrics.json").read_text())
    assert mgd["extra_evals"]["teacher_deep"] == results["teacher_resnet101"]["miou"]
    assert (tmp_path / "teacher_wide" / "export" / "meta.json").is_file()
    gain = results["student_mgd"]["miou"] - results["student_supervised"]["miou"]
    assert gain >= 0.03, results
