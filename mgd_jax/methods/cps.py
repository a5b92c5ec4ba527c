"""The teacher stage: cross pseudo supervision (CPS) with CutMix (mgd-method.md §2.4).

Two branches of one architecture, both optimised: CE on labeled images for each, plus, on the
mixed unlabeled image, each branch supervised by the other's hard pseudo-label. Pseudo-labels come
from no-grad forwards on the unmixed images, mixed with the CutMix mask. Branch 1 is evaluated and
exported as the teacher checkpoint.
"""

from __future__ import annotations

import jax
import ml_collections

from mgd_jax import losses
from mgd_jax.methods import common

BRANCHES = ("branch1", "branch2")


class CPS:
    uses_unlabeled = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        backbone = config.cps.backbone
        options = common.build_options(
            backbone, width=config.model.width, depths=config.model.depths,
            output_stride=config.model.output_stride, replica_batch=config.replica_batch,
        )
        self.eval_model = common.build(backbone, config, options)
        self.export_meta = {"backbone": backbone, "num_classes": config.num_classes,
                            "build_options": options}

    def init_variables(self, rng: jax.Array) -> common.Variables:
        # Independent head initialisations, the same ImageNet backbone for both branches.
        per_branch = [
            common.init_network(key, self.eval_model, self.config, self.config.cps.init)
            for key in jax.random.split(rng, len(BRANCHES))
        ]
        return {
            part: {name: v[part] for name, v in zip(BRANCHES, per_branch, strict=True)}
            for part in ("params", "batch_stats")
        }

    def frozen_variables(self) -> dict:
        return {}

    def loss(self, params, batch_stats, frozen, batch, rng):
        del frozen, rng
        model, config = self.eval_model, self.config
        x_l, labels, u0, u1, mask, u_mix = common.semi_supervised_inputs(batch)

        stats = dict(batch_stats)
        pseudo = {}
        # No-grad forwards on the unmixed images (they still update each branch's BN statistics,
        # as in the official code's train-mode no_grad passes).
        for name in BRANCHES:
            frozen_params = jax.lax.stop_gradient(params[name])
            out0, stats[name] = common.forward(model, frozen_params, stats[name], u0)
            out1, stats[name] = common.forward(model, frozen_params, stats[name], u1)
            pseudo[name] = common.pseudo_labels(out0.logits, out1.logits, mask)

        mixed, sup = {}, {}
        for name in BRANCHES:
            out, stats[name] = common.forward(model, params[name], stats[name], u_mix)
            mixed[name] = out.logits
        for name in BRANCHES:
            out, stats[name] = common.forward(model, params[name], stats[name], x_l)
            sup[name] = common.supervised_loss(config, out.logits, labels)

        loss_cps = losses.cross_entropy(mixed["branch1"], pseudo["branch2"]) + losses.cross_entropy(
            mixed["branch2"], pseudo["branch1"]
        )
        loss = sup["branch1"] + sup["branch2"] + config.cps.weight * loss_cps
        metrics = {
            "loss": loss,
            "loss_sup_branch1": sup["branch1"],
            "loss_sup_branch2": sup["branch2"],
            "loss_cps": loss_cps,
        }
        return loss, (stats, metrics)

    def eval_variables(self, params, batch_stats) -> common.Variables:
        return {"params": params["branch1"], "batch_stats": batch_stats["branch1"]}
