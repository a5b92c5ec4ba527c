"""The PyTorch port of the official step (mgd_jax/pytorch/step.py, timed by `mgd-bench step
--compare=torch`) computes what mgd_jax's step computes: the same weights (the port's networks
through `importer.convert`) and the same batch (images, labels, CutMix mask) give the same loss,
every metric, the gradient of every trained parameter and the new BN running statistics, for
Sup.l, CPS and MGD (the official recipe, and MGD with its ablation switches and OHEM).

Networks in float64 on both sides (float32 weights, exact in float64). mgd_jax rounds to float32
the head's outputs (decoder feature, logits), the ASPP image-pool mean, the BN running statistics
and the losses' inputs (the port rounds its logits and features for the losses the same way), so
the two agree to float32 rounding, not float64's: measured worst, gradients 1.3e-5 of a leaf's
largest value (MGD), BN statistics 3e-7, loss and metrics 5e-7. With those roundings switched to
float64 on the mgd_jax side (a one-off check, not this test) every case agreed to 2.5e-13.
Made equal by construction: the CutMix mask (fed to both), one device (no SyncBN / DDP: BN over
the whole batch on both sides; a ResNet student, whose BN has no per-replica groups). `-s` prints
the worst differences per method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mgd_jax import methods
from mgd_jax.data import augment
from mgd_jax.methods import base, mgd

from conftest import make_tiny_config, need

need("torch", "torchvision", "timm")

from mgd_jax.pytorch import importer, nets  # noqa: E402
from mgd_jax.pytorch import step as torch_step  # noqa: E402

torch = nets.torch
# Cheap code generation (minutes otherwise). With it XLA:CPU's float64 programs are only about
# float32-accurate (BN statistics 3e-8 apart), within the float32 roundings of mgd_jax anyway.
COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH, SIZE = 4, 32  # two replicas of replica_batch=2: the per-replica reductions are exercised
TOL = {"metrics": (1e-5, 1e-7), "grads": (1e-4, 1e-5), "batch_stats": (1e-6, 1e-8)}  # rtol, atol*

CASES = {
    "supervised": ("supervised", {}),
    # the paper configs' per-replica L_sup (the supervised case keeps the global mean)
    "cps": ("cps", {"cps.weight": 1.5, "loss.ce_reduction": "per_replica"}),
    "mgd": ("mgd", {"loss.ce_reduction": "per_replica"}),
    # teachers on running statistics, OHEM with mining, terms switched off, L_P from T_D alone,
    # no no-grad passes
    "mgd-variant": ("mgd", {"teacher_bn": "running", "loss.ohem": True,
                            "loss.pixel_teachers": "deep",
                            "loss.ohem_thresh": 0.2, "loss.ohem_min_kept": 300,
                            "loss.consistency_labeled": False, "loss.region": False,
                            "student_nograd_bn_updates": False}),
}


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def part(labeled):
        out = {"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
               "valid": rng.random((BATCH, SIZE, SIZE)) > 0.1}
        if labeled:
            label = rng.integers(0, 5, (BATCH, SIZE, SIZE)).astype(np.uint8)
            label[rng.random(label.shape) < 0.1] = 255
            out["label"] = label
        return out

    mask = np.zeros((BATCH, SIZE, SIZE), np.uint8)  # boxes, one per image, toggled like BoxMask
    for i in range(BATCH):
        y, x = rng.integers(0, SIZE // 2, 2)
        mask[i, y: y + SIZE // 2, x: x + SIZE // 3] = 1
    return {"labeled": part(True), "unlabeled_0": part(False), "unlabeled_1": part(False),
            "mask": mask}


_normalize = jax.jit(augment.normalize)


def _torch_inputs(batch: dict) -> tuple:
    """The port's (x_l, labels, u0, u1, mask): the images normalised as mgd_jax normalises them."""
    def image(part):
        # XLA's normalisation (it may round differently from numpy's by an ulp)
        x = np.asarray(_normalize(part["image"], part["valid"]))
        return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).double()

    labels = torch.from_numpy(batch["labeled"]["label"].astype(np.int64))
    mask = torch.from_numpy(batch["mask"][:, None].astype(np.float64))
    return (image(batch["labeled"]), labels, image(batch["unlabeled_0"]),
            image(batch["unlabeled_1"]), mask)


def _to_flax(tensors: dict, backbone: str, options: dict, num_classes: int, *,
             complete: bool) -> dict:
    """A port network's state dict (or gradients by parameter name) as mgd_jax variables."""
    # nets.build wraps the torchvision / timm backbone in `.net`; mgd_jax's layout has no wrapper
    renamed = {k.replace("backbone.net.", "backbone.", 1): v.detach()
               for k, v in tensors.items()}
    _, report = importer.convert(renamed, backbone, num_classes, part="model",
                                 require_complete=complete, **options)
    # The importer's names and shape checks, but the values at their own precision (it casts to
    # the model's float32).
    flat = {}
    for key, leaf in report.loaded.items():
        value = renamed[key].numpy()
        flat[tuple(leaf.split("/"))] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    return traverse_util.unflatten_dict(flat)


def _networks(config) -> dict[str, tuple[str, dict]]:
    """Port network name -> (backbone, mgd_jax build options)."""
    method = methods.get(config)
    options = method.export_meta["build_options"]
    if config.method == "cps":
        return {name: (config.cps.backbone, options) for name in ("branch1", "branch2")}
    found = {"student": (config.student, options)}
    if config.method == "mgd":
        for name in mgd.TEACHERS:
            t = config[name]
            found[name] = (t.backbone, base.build_options(
                t.backbone, width=t.width, depths=t.depths, replica_batch=config.replica_batch))
    return found


def _run_torch(config, batch) -> tuple[dict, dict]:
    """The port's step: its networks (random BN parameters and statistics), the metrics, and per
    network the gradients and the new running statistics; plus the initial state dicts."""
    torch.manual_seed(0)
    step = torch_step.Step(config, torch.device("cpu"))
    for seed, net in enumerate(step.nets.values(), start=1):
        nets.randomize_(net, seed)  # in float32: the float64 copies hold the same values
    initial = {k: {n: t.clone() for n, t in net.state_dict().items()}
               for k, net in step.nets.items()}
    for net in step.nets.values():
        net.double()
    metrics = step.losses(*_torch_inputs(batch))
    metrics["loss"].backward()
    after = {k: {"grads": {n: p.grad for n, p in net.named_parameters() if p.grad is not None},
                 "state": net.state_dict()} for k, net in step.nets.items()}
    return initial, {"metrics": {k: float(v.detach()) for k, v in metrics.items()},
                     "nets": after}


def _run_jax(config, batch, initial: dict, networks: dict) -> dict:
    """mgd_jax's step (`method.loss` under value_and_grad, as train.train_step) from the same
    weights, in float64."""
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        variables = {k: f64(_to_flax(initial[k], *networks[k], config.num_classes, complete=True))
                     for k in networks}
        method = methods.get(config)
        frozen = {}
        if config.method == "mgd":
            # the teachers' modules as `frozen_variables` would set them, without a checkpoint
            method.teacher_models = {name: base.build(networks[name][0], config,
                                                      networks[name][1])
                                     for name in mgd.TEACHERS}
            frozen = {name: variables[name] for name in mgd.TEACHERS}
        trained = [k for k in networks if not k.startswith("teacher")]
        if config.method == "cps":
            params = {k: variables[k]["params"] for k in trained}
            stats = {k: variables[k]["batch_stats"] for k in trained}
        else:
            params, stats = variables["student"]["params"], variables["student"]["batch_stats"]

        def run(params, stats, frozen, batch):
            def loss_fn(p):
                return method.loss(p, stats, frozen, batch, jax.random.PRNGKey(0), 0)

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        args = (params, stats, frozen, jax.tree.map(jnp.asarray, batch))
        compiled = jax.jit(run).lower(*args).compile(compiler_options=COMPILE)
        (loss, (new_stats, metrics)), grads = jax.device_get(compiled(*args))
    if config.method != "cps":
        grads, new_stats = {"student": grads}, {"student": new_stats}
    return {"loss": float(loss), "metrics": {k: float(v) for k, v in metrics.items()},
            "grads": grads, "batch_stats": new_stats}


def _leaf_diffs(ours: dict, reference: dict) -> list[tuple[str, float, float, float]]:
    """(leaf, max|d|, max|d| / max|reference leaf|, max|reference leaf|) per leaf."""
    a = traverse_util.flatten_dict(ours, sep="/")
    b = traverse_util.flatten_dict(reference, sep="/")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    out = []
    for key in sorted(a):
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        assert x.shape == y.shape, key
        d = float(np.max(np.abs(x - y)))
        ref = float(np.max(np.abs(y)))
        out.append((key, d, d / max(ref, 1e-300), ref))
    return out


def _check(part: str, diffs: list, scale: float) -> tuple[float, float]:
    """Every leaf within rtol of its own size or atol of the whole tree's scale (leaves whose true
    value is 0, e.g. biases feeding a BatchNorm, hold rounding noise); returns the worst
    (max abs, max rel)."""
    rtol, atol = TOL[part]
    for key, d, _, ref in diffs:
        assert d <= rtol * ref + atol * scale, (
            f"{part} {key}: max|d| {d:.3g}, max|ref| {ref:.3g}, tree scale {scale:.3g}")
    return max(d for _, d, _, _ in diffs), max(r for _, _, r, ref in diffs if ref > 1e-12 * scale)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_port_computes_the_mgd_jax_step(case):
    method, overrides = CASES[case]
    config = make_tiny_config(method, precision="float64", batch_size=BATCH, crop_size=SIZE,
                              **overrides)
    batch = _batch()
    networks = _networks(config)
    initial, port = _run_torch(config, batch)
    ours = _run_jax(config, batch, initial, networks)

    # the loss and every metric, by name
    assert set(port["metrics"]) == set(ours["metrics"])
    rtol, atol = TOL["metrics"]
    worst_metric = (0.0, 0.0)
    for name, want in port["metrics"].items():
        got = ours["metrics"][name]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
        d = abs(got - want)
        worst_metric = (max(worst_metric[0], d), max(worst_metric[1], d / max(abs(want), 1e-30)))
    assert port["metrics"]["loss"] > 0 and ours["loss"] == ours["metrics"]["loss"]

    # gradients of every trained parameter, new running statistics of every trained network
    trained = [k for k in networks if not k.startswith("teacher")]
    grad_diffs, stat_diffs = [], []
    for k in trained:
        backbone, options = networks[k]
        want_grads = _to_flax(port["nets"][k]["grads"], backbone, options, config.num_classes,
                              complete=False)["params"]
        grad_diffs += _leaf_diffs(ours["grads"][k], want_grads)
        want_stats = _to_flax(port["nets"][k]["state"], backbone, options, config.num_classes,
                              complete=True)["batch_stats"]
        stat_diffs += _leaf_diffs(ours["batch_stats"][k], want_stats)
    grads = _check("grads", grad_diffs, max(ref for *_, ref in grad_diffs))
    stats = _check("batch_stats", stat_diffs, max(ref for *_, ref in stat_diffs))
    print(f"\n{case}: loss {port['metrics']['loss']:.6g} | worst |d| (abs, rel): "
          f"loss+metrics {worst_metric[0]:.2e}, {worst_metric[1]:.2e}; "
          f"gradients ({len(grad_diffs)} leaves) {grads[0]:.2e}, {grads[1]:.2e}; "
          f"BN statistics ({len(stat_diffs)} leaves) {stats[0]:.2e}, {stats[1]:.2e}")
