"""The demo's ablation (`configs/demo.py:ablation=1`) with stand-in stages: each variant's config
is the MGD student's but for its switches, the ablation reuses a finished demo's stages, stops on
a signal as the demo does, and writes its table; and `loss.pixel_teachers` against a plain
reference of the single-teacher pixel loss. (The real ablation run is not in CI.)"""

import functools
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_demo import ROOT, demo_config, fake_stages, inject_signal
from test_fused_step import FAST_COMPILE
from test_train import random_batch

from mgd_jax import config_lib, methods
from mgd_jax.methods import base
from mgd_jax.runtime.errors import ConfigError
from mgd_jax.workflows import demo

# What each variant changes against the full MGD student, written out here rather than read from
# `demo.ABLATION`, so that a change there shows.
SWITCHES = {
    "ablation_pixel_deep": {"loss.image": False, "loss.region": False,
                            "loss.pixel_teachers": "deep"},
    "ablation_pixel_wide": {"loss.image": False, "loss.region": False,
                            "loss.pixel_teachers": "wide"},
    "ablation_pixel": {"loss.image": False, "loss.region": False},
    "ablation_pixel_image": {"loss.region": False},
    "ablation_pixel_region": {"loss.image": False},
}
ROWS = ["student_supervised", *SWITCHES, "student_mgd"]


def switch_diff(variant, full):
    """{field: variant's value} where two configs' flattened fields differ (same field set)."""
    a, b = (config_lib.flatten(c.to_dict()) for c in (variant, full))
    assert set(a) == set(b)
    return {k: a[k] for k in a if a[k] != b[k]}


def test_each_variant_is_the_mgd_student_but_for_its_switches():
    assert demo_config(None).stages.split(",") == list(demo.STAGES)  # not the default command
    c = demo_config("seeds=0,1,2,ablation=1")
    assert c.stages.split(",") == [*demo.STAGES, *SWITCHES] and c.demo.seeds == "0,1,2"
    full = demo.stage_config(c, "student_mgd", "/w")
    for stage, switches in SWITCHES.items():
        assert switch_diff(demo.stage_config(c, stage, "/w"), full) == switches, stage
        assert demo.NEEDS[stage] == {"teacher_deep", "teacher_wide"}
    # the MGD student's own values of those switches: every term, both teachers
    assert (full.loss.image, full.loss.region, full.loss.pixel_teachers) == (True, True, "both")
    assert [stage for stage, _ in demo.ABLATION_ROWS] == ROWS


def stage_miou(stage_dir):
    """A stand-in stage's mIoU: distinct per student and seed (0.7 for the others)."""
    stage = os.path.basename(stage_dir)
    seed = int(os.path.basename(os.path.dirname(stage_dir)).removeprefix("seed"))
    return 0.40 + 0.02 * ROWS.index(stage) + 0.01 * seed if stage in ROWS else 0.7


def fake_gains(calls):
    def gains(config, seed_dir, stages):
        calls.append(list(stages))
        sup = demo.final_metrics(seed_dir, "student_supervised")["miou"]
        return {s: (demo.final_metrics(seed_dir, s)["miou"] - sup, 0.007) for s in stages}
    return gains


def runs(workdir, seed, stage):
    path = workdir / f"seed{seed}" / stage / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_the_ablation_reuses_the_demo_stops_on_a_signal_and_writes_its_table(
        monkeypatch, tmp_path, capsys):
    from mgd_jax import main
    from mgd_jax.data import prepare

    monkeypatch.setattr(prepare, "ensure_synthetic", lambda *a, **k: demo.DATASET)
    monkeypatch.setattr(demo, "save_panels", lambda config, seed_dir: None)
    calls = []
    monkeypatch.setattr(demo, "student_gains", fake_gains(calls))
    everything = [*demo.STAGES, *SWITCHES]
    fake_stages(monkeypatch, {s: (0.3, 0) for s in everything}, stage_miou, record=True)

    def demo_command(arg):
        return main.main(["mgd-train", f"--config={ROOT}/configs/demo.py:{arg}",
                          f"--workdir={tmp_path}"])

    # the demo itself: no ablation stage, no ablation table
    assert demo_command("seeds=0,1") == 0
    assert "ablation" not in json.loads((tmp_path / "results.json").read_text())
    assert not (tmp_path / "seed0" / "ablation_pixel").exists()
    capsys.readouterr()

    # the ablation in its workdir, stopped by a signal as its second stage starts at seed 0
    fake_stages(monkeypatch, {s: (60.0 if s.startswith("ablation") else 0.3, 0)
                              for s in everything}, stage_miou, record=True)
    inject_signal(monkeypatch, tmp_path / "seed0", "spawned", "ablation_pixel_wide")
    assert demo_command("seeds=0,1,ablation=1") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("demo stopped by SIGTERM at seed 0 (stopped: ablation_pixel_deep, "
                           "ablation_pixel_wide; finished: pretrain_deep"), last
    record = json.loads((tmp_path / "stopped.json").read_text())
    assert record["stages"] == {s: "finished" if s in demo.STAGES else "stopped"
                                if s in ("ablation_pixel_deep", "ablation_pixel_wide")
                                else "not started" for s in everything}
    assert not (tmp_path / "results.json").exists()

    # the same command continues; the demo's stages were never trained again
    fake_stages(monkeypatch, {s: (0.3, 0) for s in everything}, stage_miou, record=True)
    monkeypatch.setattr(demo, "scheduler_point", lambda point, stage: None)
    assert demo_command("seeds=0,1,ablation=1") == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        for stage in demo.STAGES:
            assert runs(tmp_path, seed, stage) == 1, (seed, stage)
            assert f"stage {stage}: already trained in {tmp_path}/seed{seed}/{stage}" in out
        for stage in SWITCHES:  # seed 0's first two: started, stopped, continued
            stopped = seed == 0 and stage in ("ablation_pixel_deep", "ablation_pixel_wide")
            assert runs(tmp_path, seed, stage) == (2 if stopped else 1), (seed, stage)
        # the configs the scheduler handed to the variants' processes
        handed = {}
        for stage in ("student_mgd", *SWITCHES):
            with open(tmp_path / f"seed{seed}" / stage / demo.STAGE_CONFIG_FILE, "rb") as f:
                handed[stage] = pickle.load(f)
        for stage, switches in SWITCHES.items():
            assert switch_diff(handed[stage], handed["student_mgd"]) == switches
        # two at a time, each after both teachers
        spans = {s: demo.final_metrics(str(tmp_path / f"seed{seed}"), s) for s in SWITCHES}
        for r in spans.values():
            assert sum(o["start"] <= r["start"] < o["end"] for o in spans.values()) <= 2
    # one gain call per seed: the demo's (MGD only), then the ablation's (every variant)
    assert calls == [["student_mgd"]] * 2 + [["student_mgd", *SWITCHES]] * 2

    results = json.loads((tmp_path / "results.json").read_text())
    table = results["ablation"]
    assert list(table) == ROWS
    for i, (stage, row) in enumerate(table.items()):
        assert set(row["seeds"]) == {"0", "1"}
        mious = [0.40 + 0.02 * i + 0.01 * seed for seed in (0, 1)]
        for seed, miou in zip((0, 1), mious, strict=True):
            cell = row["seeds"][str(seed)]
            assert cell["miou"] == pytest.approx(miou)
            if stage == "student_supervised":
                assert cell["gain"] is None and cell["gain_se"] is None
            else:
                assert cell["gain"] == pytest.approx(0.02 * i) and cell["gain_se"] == 0.007
        assert row["miou_mean"] == pytest.approx(np.mean(mious))
        assert row["miou_std"] == pytest.approx(np.std(mious, ddof=1))
        assert row["gain_mean"] == (None if i == 0 else pytest.approx(0.02 * i))
        assert row["switches"] == (None if i == 0 else SWITCHES.get(stage, {}))
        assert row["variant"] == dict(demo.ABLATION_ROWS)[stage]
    assert results["seeds"]["1"]["gain"] == pytest.approx(0.02 * (len(ROWS) - 1))
    assert "ablation" not in results["seeds"]["0"]
    assert not (tmp_path / "stopped.json").exists()

    # the printed table: a header and one row per student, seed cells and mean +- std
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("ablation: mIoU")))
    assert "seed 0" in lines[at + 1] and "gain mean +- std" in lines[at + 1]
    for (stage, name), line in zip(demo.ABLATION_ROWS, lines[at + 2: at + 2 + len(ROWS)],
                                   strict=True):
        assert line.startswith(name), line
        assert line.count("+-") == (1 if stage == "student_supervised" else 2), line
    assert "L_sup + L_P + L_I + L_R (MGD)" in lines[at + 1 + len(ROWS)]


@pytest.fixture(scope="module")
def mgd_parts(tiny_teachers):
    """float64 MGD configs (L_I, L_R off) on the tiny teachers, a batch and the student."""
    from conftest import make_tiny_config

    def config(pixel_teachers, fused=True):
        c = make_tiny_config("mgd", precision="float64", fused_step=fused,
                             **{"loss.image": False, "loss.region": False,
                                "loss.pixel_teachers": pixel_teachers})
        c.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
        c.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
        return c

    return config, random_batch(4)


def pixel_terms(config, batch):
    """The step's two L_P metrics (unlabeled, labeled) and what a plain reference needs."""
    method = methods.get(config)
    variables = method.init_variables(jax.random.key(0, impl="rbg"))
    frozen = method.frozen_variables()
    args = (variables["params"], variables["batch_stats"], frozen,
            jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0))
    # Cheap code generation (as tests/test_fused_step.py): four tiny steps compile in seconds.
    _, (_, metrics) = jax.jit(method.loss).lower(*args).compile(
        compiler_options=FAST_COMPILE)(*args)
    return ((float(metrics["loss_consistency_unlabeled"]),
             float(metrics["loss_consistency_labeled"])), method, variables, frozen)


def reference_pixel_terms(method, variables, frozen, batch, teacher):
    """L_P from one teacher, plainly: each network applied on its own to each image batch (BN
    on that batch's statistics: the student trains, the tiny config's teachers use batch BN),
    the unmixed teacher logits mixed with the CutMix mask, argmax, mean softmax CE in numpy.
    (The networks run in float64, so that no pseudo-label flips; the step's CE is float32.)"""
    @functools.partial(jax.jit, static_argnums=0)  # (op by op, the forwards take seconds)
    def forward(model, v, images):
        return model.apply(v, images, train=True, mutable=["batch_stats"])[0].logits

    def logits(model, v, images):
        return np.asarray(forward(model, v, images), np.float64)

    def ce(z, labels):
        logp = z - z.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return -np.mean(np.take_along_axis(logp, labels[..., None], -1))

    batch = jax.tree.map(jnp.asarray, batch)
    u0, u1 = base.normalize(batch["unlabeled_0"]), base.normalize(batch["unlabeled_1"])
    x_l = base.normalize(batch["labeled"])
    u_mix = base.mix(u0, u1, batch["mask"])
    m = np.asarray(batch["mask"], np.float64)[..., None]
    t = method.teacher_models[teacher]
    pseudo_mix = np.argmax(logits(t, frozen[teacher], u0) * (1 - m)
                           + logits(t, frozen[teacher], u1) * m, -1)
    pseudo_l = np.argmax(logits(t, frozen[teacher], x_l), -1)
    student = method.eval_model
    return (ce(logits(student, variables, u_mix), pseudo_mix),
            ce(logits(student, variables, x_l), pseudo_l))


def test_pixel_loss_from_one_teacher_is_the_single_teacher_formula(mgd_parts):
    config, batch = mgd_parts
    with jax.enable_x64(True):
        got = {}
        for choice in ("deep", "wide", "both"):
            got[choice], method, variables, frozen = pixel_terms(config(choice), batch)
        for choice, teacher in (("deep", "teacher_deep"), ("wide", "teacher_wide")):
            np.testing.assert_allclose(
                got[choice], reference_pixel_terms(method, variables, frozen, batch, teacher),
                rtol=1e-6, err_msg=choice)
        # both teachers: the two single-teacher terms added (the official L_P)
        np.testing.assert_allclose(got["both"], np.add(got["deep"], got["wide"]), rtol=1e-6)
        assert got["deep"] != got["wide"]
        # the reference step (one network application per stream) agrees
        reference_step, *_ = pixel_terms(config("deep", fused=False), batch)
        np.testing.assert_allclose(reference_step, got["deep"], rtol=1e-6)


def test_an_unknown_pixel_teacher_is_refused(mgd_parts):
    config, _ = mgd_parts
    with pytest.raises(ConfigError, match="^config.loss.pixel_teachers: 'student' is not one "
                                          "of \\('both', 'deep', 'wide'\\)$"):
        methods.check_config(config("student"))


def test_a_stage_is_reused_only_when_trained_to_the_end_with_the_same_config(tmp_path):
    c = demo_config("ablation=1")

    def reused(stage, trained_as=None, files=("config.json", "final_metrics.json", "export")):
        """`finished_stage` of a stage directory holding `files` of a stage trained with the
        stage config of `trained_as` (default: the same stage)."""
        stage_dir = tmp_path / stage
        stage_dir.mkdir()
        recorded = config_lib.resolve_backend_defaults(
            demo.stage_config(c, trained_as or stage, str(tmp_path)))  # as a run records it
        for name in files:
            if name == "config.json":
                (stage_dir / name).write_text(recorded.to_json_best_effort())
            elif name == "final_metrics.json":
                (stage_dir / name).write_text(json.dumps({"miou": 0.5}))
            else:
                (stage_dir / name).mkdir()
        return demo.finished_stage(c, stage, str(tmp_path))

    assert reused("ablation_pixel") == {"miou": 0.5}
    assert reused("ablation_pixel_image", files=("config.json", "export")) is None  # stopped
    assert reused("ablation_pixel_region", files=("config.json", "final_metrics.json")) is None
    assert reused("ablation_pixel_deep", files=("final_metrics.json", "export")) is None
    assert reused("student_mgd", trained_as="ablation_pixel_wide") is None  # other switches
    c.demo.student_steps = 10  # other steps
    assert demo.finished_stage(c, "ablation_pixel", str(tmp_path)) is None
