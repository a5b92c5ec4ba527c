"""Sup.l: the student trained on the labeled partition only (the paper's baseline)."""

from __future__ import annotations

import jax
import ml_collections

from mgd_jax.methods import common


class Supervised:
    uses_unlabeled = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        options = common.student_options(config)
        self.eval_model = common.build(config.student, config, options)
        self.export_meta = {"backbone": config.student, "num_classes": config.num_classes,
                            "build_options": options}

    def init_variables(self, rng: jax.Array) -> common.Variables:
        return common.init_network(rng, self.eval_model, self.config, self.config.student_init)

    def frozen_variables(self) -> dict:
        return {}

    def loss(self, params, batch_stats, frozen, batch, rng):
        del frozen, rng
        labeled = batch["labeled"]
        out, batch_stats = common.forward(
            self.eval_model, params, batch_stats, common.normalize(labeled)
        )
        loss_sup = common.supervised_loss(self.config, out.logits, labeled["label"])
        return loss_sup, (batch_stats, {"loss": loss_sup, "loss_sup": loss_sup})

    def eval_variables(self, params, batch_stats) -> common.Variables:
        return {"params": params, "batch_stats": batch_stats}
