"""The trainer: SyncBN semantics across device counts, exact resume, the CLI end to end."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import methods, network_dir, optim, train
from mgd_jax.methods import base
from mgd_jax.runtime import parallel
from mgd_jax.runtime.errors import ConfigError, ExportError

from conftest import Killed, killed_after_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(seed, size=32, batch=8):
    rng = np.random.default_rng(seed)

    def part(labeled):
        out = {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "valid": rng.random((batch, size, size)) > 0.1,
        }
        if labeled:
            label = rng.integers(0, 5, (batch, size, size)).astype(np.int32)
            label[rng.random(label.shape) < 0.1] = 255
            out["label"] = label
        return out

    return {
        "labeled": part(True),
        "unlabeled_0": part(False),
        "unlabeled_1": part(False),
        "mask": (rng.random((batch, size, size)) > 0.5).astype(np.uint8),
    }


def one_step(config, mesh, batch):
    method = methods.get(config)
    variables = method.init_variables(jax.random.key(0, impl="rbg"))
    schedule = optim.poly_schedule(config.lr, 10)
    tx = optim.make_optimizer(schedule, config.weight_decay)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(0),
    )
    step = jax.jit(functools.partial(train.train_step, method=method, tx=tx, schedule=schedule))
    new_state, metrics = step(
        parallel.replicate(state, mesh), parallel.replicate(method.frozen_variables(), mesh),
        parallel.global_batch(batch, mesh),
    )
    return jax.device_get((new_state.params, new_state.batch_stats, metrics))


@pytest.mark.parametrize(
    "method, overrides",
    [
        # (the ResNet student's supervised step is the MGD case's too)
        ("supervised", {"student": "mobilenet_v2", "model.depths": "1,1,1,1,1,1,1",
                        "loss.ohem": True, "loss.ohem_min_kept": 300}),
        ("cps", {}),
        ("mgd", {}),
    ],
    ids=["supervised-mobilenet-ohem", "cps", "mgd"],
)
def test_step_on_8_devices_equals_1_device(method, overrides, tiny_config, tiny_teachers):
    """SyncBN: BN statistics over the global batch, whatever the device count.

    In float64: in float32 the per-device convolutions round differently from the whole-batch
    ones and batch-statistics BN amplifies that to ~1e-4 after one step.
    """
    assert jax.device_count() == 8
    config = tiny_config(method, precision="float64", **overrides)
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    batch = random_batch(0)
    with jax.enable_x64(True):
        one = one_step(config, parallel.make_mesh(jax.devices()[:1]), batch)
        eight = one_step(config, parallel.make_mesh(jax.devices()), batch)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        # (the ASPP image-pool mean is taken in float32, hence not 1e-12)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the step really moved the student
    assert float(one[2]["grad_norm"]) > 0


def test_mgd_loss_terms_and_teacher_isolation(tiny_config, tiny_teachers):
    """Every MGD term is active and finite; the teachers get no gradient and stay unchanged."""
    config = tiny_config("mgd")
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    method = methods.get(config)
    variables = method.init_variables(jax.random.key(0, impl="rbg"))
    frozen = method.frozen_variables()
    batch = jax.tree.map(jnp.asarray, random_batch(1))

    def loss_wrt_teachers(frozen_vars):
        loss, aux = method.loss(variables["params"], variables["batch_stats"], frozen_vars, batch,
                                jax.random.PRNGKey(0))
        return loss, aux

    # (jitted: op by op, the three networks' forward and backward take minutes on a CPU)
    grads, (_, metrics) = jax.jit(jax.grad(loss_wrt_teachers, has_aux=True))(frozen)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    for name in ("loss_sup", "loss_consistency_unlabeled", "loss_consistency_labeled",
                 "loss_image", "loss_region"):
        assert np.isfinite(float(metrics[name])) and float(metrics[name]) > 0, name
    # Switching a term off removes it (the ablations are config changes).
    config.loss.region = False
    config.loss.image = False
    ablated = methods.get(config)
    ablated.frozen_variables()
    _, (_, m2) = jax.jit(ablated.loss)(variables["params"], variables["batch_stats"], frozen,
                                       batch, jax.random.PRNGKey(0))
    assert float(m2["loss_region"]) == 0 and float(m2["loss_image"]) == 0
    np.testing.assert_allclose(float(m2["loss_sup"]), float(metrics["loss_sup"]), rtol=1e-6)


def test_cps_weight_ramps_up_over_the_configured_steps(tiny_config):
    """cps.weight_rampup: the cross term's weight is exp(-5 (1 - t)^2) of cps.weight, then full;
    the loss is the two supervised terms plus that weight times the cross term."""
    config = tiny_config("cps", **{"cps.weight": 2.0, "cps.weight_rampup": 100})
    method = methods.get(config)
    variables = method.init_variables(jax.random.key(0, impl="rbg"))
    batch = jax.tree.map(jnp.asarray, random_batch(1))
    loss_fn = jax.jit(method.loss)
    for step, factor in ((0, np.exp(-5.0)), (50, np.exp(-5.0 * 0.25)), (100, 1.0), (900, 1.0)):
        loss, (_, m) = loss_fn(variables["params"], variables["batch_stats"], None, batch,
                               jax.random.PRNGKey(0), jnp.asarray(step))
        np.testing.assert_allclose(float(m["cps_weight"]), 2.0 * factor, rtol=1e-6)
        want = m["loss_sup_branch1"] + m["loss_sup_branch2"] + m["cps_weight"] * m["loss_cps"]
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    config.cps.weight_rampup = -1
    with pytest.raises(ConfigError, match="cps.weight_rampup"):
        methods.check_config(config)


def test_student_bn_updated_four_times_per_mgd_step(tiny_config, tiny_teachers):
    """u0, u1 (no grad), u_mix, x_l: four EMA updates, matching an explicit sequence."""
    config = tiny_config("mgd")
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    method = methods.get(config)
    v = method.init_variables(jax.random.key(0, impl="rbg"))
    batch = jax.tree.map(jnp.asarray, random_batch(2))
    _, (stats, _) = jax.jit(method.loss)(v["params"], v["batch_stats"],
                                         method.frozen_variables(), batch, jax.random.PRNGKey(0))
    expected = v["batch_stats"]
    u0, u1 = base.normalize(batch["unlabeled_0"]), base.normalize(batch["unlabeled_1"])
    for images in (u0, u1, base.mix(u0, u1, batch["mask"]),
                   base.normalize(batch["labeled"])):
        _, expected = base.forward(method.eval_model, v["params"], expected, images)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    config.student_nograd_bn_updates = False
    without = methods.get(config)
    _, (stats2, _) = jax.jit(without.loss)(
        v["params"], v["batch_stats"], without.frozen_variables(), batch, jax.random.PRNGKey(0))
    assert not np.allclose(jax.tree.leaves(stats2)[0], jax.tree.leaves(stats)[0])


def test_interrupt_and_resume_is_bit_identical(synthetic_dir, tmp_path, tiny_config):
    config = tiny_config("cps", synthetic_dir, num_train_steps=4, checkpoint_every=2,
                         eval_every=4)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

    with killed_after_checkpoint(2), pytest.raises(Killed):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

    a, _ = network_dir.load_variables(straight["export"])
    b, _ = network_dir.load_variables(resumed["export"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert straight["miou"] == resumed["miou"]

    # Any checkpoint of a workdir loads as a network: the last step is the export (branch 1 of
    # the CPS state), an earlier one differs.
    workdir = str(tmp_path / "straight")
    for step in (4, "latest", "best"):
        network = network_dir.load_network(workdir, step=step)
        assert network.step == 4
        for x, y in zip(jax.tree.leaves(network.variables), jax.tree.leaves(a), strict=True):
            np.testing.assert_array_equal(x, y)
    earlier = network_dir.load_network(workdir, step=2).variables
    assert not all(np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(earlier), jax.tree.leaves(a), strict=True))
    with pytest.raises(ExportError, match="saved steps: \\[2, 4\\]"):
        network_dir.load_network(workdir, step=3)


def test_a_run_resolves_its_dataset_name_once_and_records_its_step_kind(
        synthetic_dir, tmp_path, tiny_config, monkeypatch):
    # The name is read at the top (config_lib.validate); the data modules take the result.
    from mgd_jax.data import datasets

    names, resolve = [], datasets.resolve
    monkeypatch.setattr(datasets, "resolve", lambda name: names.append(name) or resolve(name))
    config = tiny_config("supervised", synthetic_dir, num_train_steps=2)
    assert train.train_and_evaluate(config, str(tmp_path / "run"))["steps"] == 2
    assert names == [synthetic_dir[1]]
    # and config.json records what this backend chose for the unset fields (CPU: the reference
    # step, with the gather upsampling)
    assert config.fused_step is None and config.resize is None
    recorded = (tmp_path / "run" / "config.json").read_text()
    assert '"fused_step": false' in recorded and '"resize": "gather"' in recorded


def test_bad_config_fails_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mgd_jax.main", "--config=configs/voc.py:method=mgd",
         f"--workdir={tmp_path}", f"--config.split_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
    )
    assert proc.returncode != 0
    assert "config.teacher_deep.checkpoint" in proc.stderr


def test_init_from_a_trained_network_takes_its_backbone_only(tmp_path, tiny_config):
    """cps.init / student_init may name a trained network of the architecture with other classes
    (the demo's pre-trained teachers): its backbone loads, the head keeps its fresh init."""
    source = tiny_config("supervised", num_classes=5)
    model = base.build("resnet18", source, base.student_options(source))
    trained = base.init_network(jax.random.key(1, impl="rbg"), model, source)
    network_dir.save_network(str(tmp_path / "net"), trained,
                             {"backbone": "resnet18", "num_classes": 5})
    config = tiny_config("supervised")
    model = base.build("resnet18", config, base.student_options(config))
    fresh = base.init_network(jax.random.key(0, impl="rbg"), model, config)
    loaded = base.init_network(jax.random.key(0, impl="rbg"), model, config,
                               str(tmp_path / "net"))
    for part in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, loaded[part]["backbone"],
                     trained[part]["backbone"])
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["head"],
                 fresh["params"]["head"])
    network_dir.save_network(str(tmp_path / "head"),
                             {"params": {"head": trained["params"]["head"]}},
                             {"backbone": "resnet18", "num_classes": 5})
    with pytest.raises(ExportError, match="no backbone"):
        base.init_network(jax.random.key(0, impl="rbg"), model, config, str(tmp_path / "head"))


def test_imagenet_init_merges_a_backbone_checkpoint(tmp_path, tiny_config):
    """config.student_init: a torchvision ResNet-18 imported with --backbone_only loads into the
    deep-stem student the official way (bn1, layer1-4 loaded; the deep stem keeps its init)."""
    from torch_reference import torch, torchvision

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    subprocess.run(
        [sys.executable, "-m", "mgd_jax.tools.import_weights", "--backbone=resnet18",
         f"--torch={tmp_path / 'r18.pth'}", "--backbone_only", f"--output={tmp_path / 'ck'}"],
        check=True, capture_output=True, cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""),
    )
    config = tiny_config("supervised")
    config.model.width, config.model.depths, config.num_classes = 1.0, "", 21
    model = base.build("resnet18", config, base.student_options(config))
    fresh = base.init_network(jax.random.key(0, impl="rbg"), model, config)
    loaded = base.init_network(jax.random.key(0, impl="rbg"), model, config, str(tmp_path / "ck"))
    state = reference.state_dict()
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["layer3_1"]["conv2"]["kernel"],
        state["layer3.1.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"],
                                  state["bn1.running_var"].numpy())
    for leaf in ("conv1_0", "conv1_3", "conv1_6"):  # deep stem: not in torchvision's file
        np.testing.assert_array_equal(loaded["params"]["backbone"][leaf]["kernel"],
                                      fresh["params"]["backbone"][leaf]["kernel"])
    np.testing.assert_array_equal(loaded["params"]["head"]["aspp"]["red_conv"]["kernel"],
                                  fresh["params"]["head"]["aspp"]["red_conv"]["kernel"])
