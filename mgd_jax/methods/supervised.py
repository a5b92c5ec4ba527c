"""Sup.l: the student trained on the labeled partition only (the paper's baseline)."""

from __future__ import annotations

import jax
import ml_collections

from mgd_jax import models
from mgd_jax.errors import ConfigError
from mgd_jax.methods import base


class Supervised:
    uses_unlabeled = False
    eval_path = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        options = base.student_options(config)
        self.eval_model = base.build(config.student, config, options)
        self.export_meta = base.network_meta(config.student, config, options)

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        if config.student not in models.STUDENTS:
            raise ConfigError(f"config.student: {config.student!r} is not one of "
                              f"{models.STUDENTS}")

    def init_variables(self, rng: jax.Array) -> base.Variables:
        return base.init_network(rng, self.eval_model, self.config, self.config.student_init)

    def frozen_variables(self, *, random: bool = False) -> dict:
        del random
        return {}

    def extra_evals(self, frozen: dict) -> dict:
        del frozen
        return {}

    def loss(self, params, batch_stats, frozen, batch, rng):
        del frozen, rng
        labeled = batch["labeled"]
        out, batch_stats = base.forward(
            self.eval_model, params, batch_stats, base.normalize(labeled)
        )
        loss_sup = base.supervised_loss(self.config, out.logits, labeled["label"])
        return loss_sup, (batch_stats, {"loss": loss_sup, "loss_sup": loss_sup})
