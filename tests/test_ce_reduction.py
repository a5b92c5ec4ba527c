"""`loss.ce_reduction`: the supervised CE of every method (Sup.l, both CPS branches, the MGD
student) reduced per replica as the official code does per GPU, checked on one real training
loss against a numpy reference; the paper configs default to the official run."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import np_cross_entropy, np_per_replica_ce
from test_train import random_batch

from mgd_jax import config_lib, methods
from mgd_jax.methods import base
from mgd_jax.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config(path: str, arg: str | None):
    return config_lib.load_config_file(ROOT / "configs" / path, arg)


def test_paper_configs_default_to_the_official_run():
    for path, args in (("voc.py", ("method=mgd", "method=cps", "method=supervised")),
                       ("cityscapes.py", ("method=mgd", "method=cps,teacher=wide_resnet50_2"))):
        for arg in args:
            c = _config(path, arg)
            assert (c.loss.ce_reduction, c.pairing) == ("per_replica", "official"), (path, arg)
    demo = _config("demo.py", None)
    assert (demo.loss.ce_reduction, demo.pairing) == ("global", "independent")
    # the base config keeps the plain behaviours (a config of one's own chooses)
    base_config = config_lib.base_config()
    assert (base_config.loss.ce_reduction, base_config.pairing) == ("global", "independent")
    c = _config("voc.py", "method=mgd")
    c.loss.ce_reduction = "per_gpu"
    with pytest.raises(ConfigError, match=r"config.loss.ce_reduction: 'per_gpu' is not one of"):
        config_lib.validate(c)


@pytest.mark.parametrize("method", ["supervised", "cps", "mgd"])
def test_step_supervised_term_is_per_replica(method, tiny_config, tiny_teachers):
    """One loss-and-gradient evaluation of each method with `ce_reduction=per_replica` on a batch
    whose replica groups have very different valid-pixel counts: the supervised term equals the
    per-group numpy reference computed from the trained network's logits on the labeled images
    (train-mode BN uses the batch's statistics, so a plain forward gives them), not the global
    mean; everything is finite."""
    config = tiny_config(method, **{"loss.ce_reduction": "per_replica"})
    config.teacher_deep.checkpoint = tiny_teachers["teacher_deep"]
    config.teacher_wide.checkpoint = tiny_teachers["teacher_wide"]
    m = methods.get(config)
    variables = m.init_variables(jax.random.key(0, impl="rbg"))
    frozen = m.frozen_variables()
    batch = jax.tree.map(jnp.asarray, random_batch(3))
    logits, _ = jax.jit(lambda v, x: base.forward(m.eval_model, v["params"], v["batch_stats"],
                                                  x))(
        base.eval_variables(m, variables["params"], variables["batch_stats"]),
        base.normalize(batch["labeled"]))
    logits = np.asarray(logits.logits)
    # Replica group 0: few valid pixels, labelled with the network's likeliest class (a low CE);
    # group 1: its least likely class (a high CE). The two reductions weigh them differently.
    labels = np.where(np.arange(8)[:, None, None] < 2, logits.argmax(-1), logits.argmin(-1))
    labels[:2, :, 4:] = 255
    labels[np.asarray(batch["labeled"]["label"]) == 255] = 255
    batch["labeled"]["label"] = jnp.asarray(labels, jnp.int32)

    def run(params, batch_stats, batch):
        return jax.value_and_grad(
            lambda p: m.loss(p, batch_stats, frozen, batch, jax.random.PRNGKey(0)),
            has_aux=True)(params)

    args = (variables["params"], variables["batch_stats"], batch)
    compiled = jax.jit(run).lower(*args).compile(compiler_options=FAST_COMPILE)
    (loss, (_, metrics)), grads = jax.device_get(compiled(*args))
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))

    want = np_per_replica_ce(logits, labels, config.replica_batch)
    global_ = np_cross_entropy(logits, labels)
    assert abs(want - global_) > 0.05 * global_, (want, global_)
    name = "loss_sup_branch1" if method == "cps" else "loss_sup"
    np.testing.assert_allclose(float(metrics[name]), want, rtol=1e-4)
