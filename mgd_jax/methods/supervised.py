"""Sup.l: the student trained on the labeled partition only (the paper's baseline)."""

from __future__ import annotations

from mgd_jax.methods import base


class Supervised(base.StudentMethod):
    def loss(self, params, batch_stats, frozen, batch, rng, step=0):
        del frozen, rng, step
        labeled = batch["labeled"]
        out, batch_stats = base.forward(
            self.eval_model, params, batch_stats, base.normalize(labeled)
        )
        loss_sup = base.supervised_loss(self.config, out.logits, base.labels_of(labeled))
        return loss_sup, (batch_stats, {"loss": loss_sup, "loss_sup": loss_sup})
