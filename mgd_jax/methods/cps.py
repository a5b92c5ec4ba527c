"""The teacher stage: cross pseudo supervision (CPS) with CutMix (docs/method.md §2.4).

Two branches of one architecture, both optimised: CE on labeled images for each, plus, on the
mixed unlabeled image, each branch supervised by the other's hard pseudo-label. Pseudo-labels come
from no-grad forwards on the unmixed images, mixed with the CutMix mask. Branch 1 is evaluated and
exported as the teacher checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mgd_jax import models
from mgd_jax.methods import base, losses
from mgd_jax.runtime.errors import ConfigError

BRANCHES = ("branch1", "branch2")


def rampup(step: jax.Array | int, steps: int) -> jax.Array:
    """Sigmoid ramp-up of the cross term's weight, exp(-5 (1 - t)^2) for t = step / steps < 1,
    then 1 (Laine & Aila 2017); `steps` = 0 gives 1 throughout (the official recipe, whose
    networks start from ImageNet weights)."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return jnp.exp(-5.0 * (1.0 - t) ** 2)


class CPS(base.MethodBase):
    uses_unlabeled = True
    eval_path = ("branch1",)
    init_field = "cps.init"  # the backbone both branches start from

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        backbone = config.cps.backbone
        options = base.build_options(
            backbone, width=config.model.width, depths=config.model.depths,
            output_stride=config.model.output_stride, replica_batch=config.replica_batch,
        )
        self.eval_model = base.build(backbone, config, options)
        self.export_meta = base.network_meta(backbone, config, options)

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        if models.canonical(config.cps.backbone) not in models.BACKBONES:
            raise ConfigError(f"config.cps.backbone: {config.cps.backbone!r} is not one of "
                              f"{models.BACKBONES + tuple(models.ALIASES)}")
        if config.cps.weight_rampup < 0:
            raise ConfigError(f"config.cps.weight_rampup: must be >= 0 (steps; 0 = off), got "
                              f"{config.cps.weight_rampup}")

    def init_variables(self, rng: jax.Array) -> base.Variables:
        # Independent head initialisations, the same ImageNet backbone for both branches.
        per_branch = [
            base.init_network(key, self.eval_model, self.config, self.config.cps.init)
            for key in jax.random.split(rng, len(BRANCHES))
        ]
        return {
            part: {name: v[part] for name, v in zip(BRANCHES, per_branch, strict=True)}
            for part in ("params", "batch_stats")
        }

    def loss(self, params, batch_stats, frozen, batch, rng, step=0):
        del frozen, rng
        x_l, labels, u0, u1, mask, u_mix = base.semi_supervised_inputs(batch)
        part = self._fused_branch if base.fused(self.config) else self._reference_branch
        stats, pseudo, mixed, sup = {}, {}, {}, {}
        for name in BRANCHES:
            stats[name], pseudo[name], mixed[name], sup_logits = part(
                params[name], batch_stats[name], x_l, u0, u1, mask, u_mix)
            sup[name] = base.supervised_loss(self.config, sup_logits, labels)

        loss_cps = losses.cross_entropy(mixed["branch1"], pseudo["branch2"]) + losses.cross_entropy(
            mixed["branch2"], pseudo["branch1"]
        )
        weight = self.config.cps.weight * rampup(step, self.config.cps.weight_rampup)
        loss = sup["branch1"] + sup["branch2"] + weight * loss_cps
        metrics = {
            "loss": loss,
            "cps_weight": weight,
            "loss_sup_branch1": sup["branch1"],
            "loss_sup_branch2": sup["branch2"],
            "loss_cps": loss_cps,
        }
        return loss, (stats, metrics)

    def _reference_branch(self, params, stats, x_l, u0, u1, mask, u_mix):
        """One branch as the official code runs it: a forward per stream, in the order u0, u1
        (no grad; they still update the BN statistics, as the official train-mode no_grad
        passes do), u_mix, x_l. Returns (stats, pseudo-labels, u_mix logits, x_l logits)."""
        model = self.eval_model
        frozen_params = jax.lax.stop_gradient(params)
        out0, stats = base.forward(model, frozen_params, stats, u0)
        out1, stats = base.forward(model, frozen_params, stats, u1)
        pseudo = base.pseudo_labels(out0.logits, out1.logits, mask)
        mixed, stats = base.forward(model, params, stats, u_mix)
        sup, stats = base.forward(model, params, stats, x_l)
        return stats, pseudo, mixed.logits, sup.logits

    def _fused_branch(self, params, stats, x_l, u0, u1, mask, u_mix):
        """`_reference_branch` with two batched calls (u0/u1 without, u_mix/x_l with gradient),
        each stream with its own BN statistics, updated in the same order."""
        model = self.eval_model
        size = x_l.shape[1:3]
        out, moments = base.forward_streams(model, jax.lax.stop_gradient(params), stats,
                                            jnp.stack([u0, u1]))
        stats = base.replay_moments(stats, moments)
        logits_0, logits_1 = base.upsample_logits(model, out.low_logits, size)
        pseudo = base.pseudo_labels(logits_0, logits_1, mask)
        out, moments = base.forward_streams(model, params, stats, jnp.stack([u_mix, x_l]),
                                            remat=base.remat(self.config))
        stats = base.replay_moments(stats, moments)
        mixed, sup = base.upsample_logits(model, out.low_logits, size)
        return stats, pseudo, mixed, sup
