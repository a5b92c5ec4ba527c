"""Poly schedule, weight-decay mask and SGD steps vs hand computation and torch.optim.SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import optim


def test_poly_schedule_by_hand():
    sched = optim.poly_schedule(0.01, 100, power=0.9)
    for step in (0, 1, 50, 99):
        assert float(sched(step)) == pytest.approx(0.01 * (1 - step / 100) ** 0.9, rel=1e-6)
    # the last training step (99) still has a positive lr, as the official PolyLR
    assert float(sched(99)) == pytest.approx(0.01 * 0.01**0.9, rel=1e-6)
    assert float(sched(100)) == 0.0 and float(sched(150)) == 0.0
    assert float(jax.jit(sched)(jnp.int32(10))) == pytest.approx(0.01 * 0.9**0.9, rel=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        optim.poly_schedule(0.01, 0)


def _params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "backbone": {
            "conv1_0": {"kernel": f(3, 3, 2, 4)},
            "bn1": {"scale": f(4), "bias": f(4)},
            "dw": {"kernel": f(3, 3, 1, 4)},  # depthwise conv: decayed like any conv weight
        },
        "head": {"dense": {"kernel": f(4, 3), "bias": f(3)}},
        "classifier": {"kernel": f(1, 1, 4, 3), "bias": f(3)},
    }


def test_decay_mask_exactly_kernels():
    mask = optim.decay_mask(_params())
    assert mask == {
        "backbone": {
            "conv1_0": {"kernel": True},
            "bn1": {"scale": False, "bias": False},
            "dw": {"kernel": True},
        },
        "head": {"dense": {"kernel": True, "bias": False}},
        "classifier": {"kernel": True, "bias": False},
    }


def test_decay_mask_on_model_params():
    from mgd_jax import models

    model = models.build("resnet18", 3, width=0.125, depths=(1, 1, 1, 1))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    mask = optim.decay_mask(shapes)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    for path, decay in flat:
        name = path[-1].key
        assert decay == (name == "kernel"), path
    assert any(d for _, d in flat) and not all(d for _, d in flat)


def test_sgd_steps_match_torch():
    from torch_reference import torch

    params = _params()
    lr0, wd, mom, total = 0.1, 1e-2, 0.9, 5
    sched = optim.poly_schedule(lr0, total)
    tx = optim.make_optimizer(sched, wd, mom)
    state = tx.init(params)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask_leaves = jax.tree_util.tree_leaves(optim.decay_mask(params))
    tparams = [torch.tensor(np.asarray(x), requires_grad=True) for x in leaves]
    decay = [p for p, m in zip(tparams, mask_leaves, strict=True) if m]
    no_decay = [p for p, m in zip(tparams, mask_leaves, strict=True) if not m]
    topt = torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr0,
        momentum=mom,
        weight_decay=wd,
    )
    rng = np.random.default_rng(1)
    for it in range(total):
        grads = [rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
        updates, state = tx.update(
            jax.tree_util.tree_unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params
        )
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        for group in topt.param_groups:  # official: set the poly lr before each step
            group["lr"] = lr0 * (1 - it / total) ** 0.9
        for p, g in zip(tparams, grads, strict=True):
            p.grad = torch.tensor(g)
        topt.step()
        leaves = jax.tree_util.tree_leaves(params)
        for x, p in zip(leaves, tparams, strict=True):
            np.testing.assert_allclose(np.asarray(x), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_one_step_by_hand():
    p = {"conv": {"kernel": jnp.full((1, 1, 1, 2), 2.0)}, "bn": {"bias": jnp.full((2,), 2.0)}}
    g = {"conv": {"kernel": jnp.full((1, 1, 1, 2), 0.5)}, "bn": {"bias": jnp.full((2,), 0.5)}}
    tx = optim.make_optimizer(0.1, 0.01, 0.9)
    state = tx.init(p)
    u, state = tx.update(g, state, p)
    # buf = g + wd * p (kernel) / g (bias); update = -lr * buf
    np.testing.assert_allclose(u["conv"]["kernel"], -0.1 * (0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(u["bn"]["bias"], -0.1 * 0.5, rtol=1e-6)
    p2 = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
    u2, _ = tx.update(g, state, p2)
    k2 = float(p2["conv"]["kernel"].reshape(-1)[0])
    buf2 = 0.9 * (0.5 + 0.02) + (0.5 + 0.01 * k2)
    np.testing.assert_allclose(u2["conv"]["kernel"], -0.1 * buf2, rtol=1e-6)
    np.testing.assert_allclose(u2["bn"]["bias"], -0.1 * (0.9 * 0.5 + 0.5), rtol=1e-6)
