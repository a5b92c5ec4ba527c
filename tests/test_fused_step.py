"""The batched (fused) step computes what the reference step computes: one network application
per stream, full-resolution L_I (config.fused_step=False); and which upsampling form a step uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import random_batch

from mgd_jax import methods
from mgd_jax.runtime.errors import ConfigError

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def loss_and_grads(config, batch, variables=None):
    method = methods.get(config)
    if variables is None:
        variables = method.init_variables(jax.random.key(0, impl="rbg"))
    frozen = method.frozen_variables()

    def run(params, batch_stats, batch):
        def loss_fn(p):
            return method.loss(p, batch_stats, frozen, batch, jax.random.PRNGKey(0))

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    args = (variables["params"], variables["batch_stats"], batch)
    # Cheap code generation: the unbatched reference step takes minutes to compile otherwise.
    compiled = jax.jit(run).lower(*args).compile(compiler_options=FAST_COMPILE)
    (loss, (stats, metrics)), grads = compiled(*args)
    return variables, jax.device_get((loss, metrics, grads, stats))


def assert_steps_agree(reference, fused, *, metrics_tol: dict, trees_tol: dict) -> None:
    """Loss > 0, every metric, the gradients and the new BN statistics of two steps agree; the
    trees' `atol` is relative to the largest leaf of the tree."""
    assert set(reference[1]) == set(fused[1])
    for name in reference[1]:
        np.testing.assert_allclose(fused[1][name], reference[1][name], **metrics_tol,
                                   err_msg=name)
    for part, a, b in (("grads", reference[2], fused[2]), ("batch_stats", reference[3], fused[3])):
        flat_a = jax.tree_util.tree_leaves_with_path(a)
        flat_b = jax.tree.leaves(b)
        assert len(flat_a) == len(flat_b)
        # Leaves whose exact value is 0 (e.g. a bias feeding a BatchNorm) hold rounding noise:
        # compare against the scale of the whole tree there.
        scale = max(float(np.max(np.abs(x))) for _, x in flat_a)
        for (path, x), y in zip(flat_a, flat_b, strict=True):
            np.testing.assert_allclose(y, x, rtol=trees_tol["rtol"],
                                       atol=trees_tol["atol"] * scale,
                                       err_msg=f"{part}{jax.tree_util.keystr(path)}")
    assert float(reference[0]) > 0


@pytest.mark.parametrize(
    "method, dtype, overrides",
    [
        ("supervised", "float64", {}),
        ("cps", "float64", {}),
        ("mgd", "float64", {"remat": True}),  # remat: the same values, recomputed
        # ghost-BN student, teachers on running statistics, OHEM, terms switched off
        ("mgd", "float64", {"student": "mobilenet_v2", "model.depths": "1,1,1,1,1,1,1",
                            "teacher_bn": "running", "loss.ohem": True,
                            "loss.ohem_min_kept": 300, "loss.consistency_labeled": False,
                            "loss.region": False, "student_nograd_bn_updates": False}),
    ],
    ids=["supervised", "cps", "mgd-remat", "mgd-variant"],
)
def test_fused_step_equals_reference(method, dtype, overrides, tiny_config, tiny_teachers):
    """Loss, every metric, the gradients and the new BN statistics agree, with float64 compute, to
    the rounding of the float32 parameters and gradients."""
    config = tiny_config(method, precision=dtype, **overrides)
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    batch = jax.tree.map(jnp.asarray, random_batch(3, batch=4))
    # (parameters and their gradients are float32 even when the compute is float64)
    tol = dict(rtol=1e-5, atol=1e-6)
    with jax.enable_x64(dtype == "float64"):
        config.fused_step = False
        variables, reference = loss_and_grads(config, batch)
        config.fused_step = True
        _, fused = loss_and_grads(config, batch, variables)
    assert_steps_agree(reference, fused, metrics_tol=tol, trees_tol=tol)


@pytest.mark.parametrize("method", ["supervised", "cps", "mgd"])
def test_fused_step_equals_reference_float32(method, tiny_config, tiny_teachers):
    """The same comparison in float32 compute: the two steps sum in different orders (merged
    streams, matmul vs gather resize, low- vs full-resolution L_I), so gradients differ by float32
    rounding grown through the network (measured: at most ~1.5e-5 of the largest gradient)."""
    config = tiny_config(method, precision="float32")
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    batch = jax.tree.map(jnp.asarray, random_batch(3, batch=4))
    config.fused_step = False
    variables, reference = loss_and_grads(config, batch)
    config.fused_step = True
    _, fused = loss_and_grads(config, batch, variables)
    assert_steps_agree(reference, fused, metrics_tol=dict(rtol=2e-5, atol=1e-6),
                       trees_tol=dict(rtol=1e-4, atol=1e-4))


def test_the_upsampling_form_is_the_config_s_else_the_step_s_else_the_backend_s():
    import ml_collections

    def resize(backend, **fields):
        return methods.base.resize_method(ml_collections.ConfigDict(fields), backend=backend)

    assert resize("cpu", fused_step=True) == resize("tpu", fused_step=True) == "matmul"
    assert resize("cpu", fused_step=False) == methods.base.RESIZE_DEFAULT["cpu"]
    assert resize("tpu", fused_step=False) == "matmul"  # fewer bytes on TPU (docs/performance.md)
    assert resize("tpu", fused_step=True, resize="gather") == "gather"
    with pytest.raises(ConfigError, match=r"^config.resize: 'bicubic' is not one of"):
        resize("cpu", resize="bicubic")  # one error line in every tool, validated or not
