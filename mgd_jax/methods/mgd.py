"""The student stage: multi-granularity distillation from two frozen teachers (§1.2, §6.1).

Routing, as in the official train.py:
  L_sup  CE (or OHEM) of S(x_l) against the ground truth;
  L_P    hard-label CE of S(u_mix) against the mixed pseudo-labels of T_W and of T_D (from their
         forwards on the unmixed u0 / u1), and of S(x_l) against argmax T_W(x_l) and T_D(x_l);
  L_I    λ1 · semantic-sensitive(S(u_mix), T_D(u_mix)), the L1 sum scaled per replica;
  L_R    λ2 · content-aware(S's decoder feature, T_W's decoder feature), both on u_mix.
Teachers never enter the optimizer or the checkpoint. The teacher-side CE terms of the official
logged loss carry no gradient and are not computed.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from mgd_jax import losses, weights
from mgd_jax.methods import common

TEACHERS = ("teacher_deep", "teacher_wide")  # T_D, T_W


def load_teacher(config: ml_collections.ConfigDict, name: str):
    """(model, variables) of a teacher checkpoint; its architecture comes from the checkpoint."""
    directory = config[name].checkpoint
    model, variables, meta = weights.load_network(directory, dtype=common.compute_dtype(config))
    backbone = meta["backbone"]
    expected = config[name].backbone
    aliases = {"wide_resnet34_2": "wide_resnet50_2"}
    if aliases.get(backbone, backbone) != aliases.get(expected, expected):
        raise ValueError(
            f"config.{name}.checkpoint={directory!r} holds a {backbone} network, but "
            f"config.{name}.backbone is {expected!r}"
        )
    if int(meta["num_classes"]) != config.num_classes:
        raise ValueError(
            f"config.{name}.checkpoint={directory!r} has {meta['num_classes']} classes, the "
            f"dataset has {config.num_classes}"
        )
    logging.info("%s: %s from %s (%s)", name, backbone, directory, meta.get("build_options"))
    return model, variables


class MGD:
    uses_unlabeled = True

    def __init__(self, config: ml_collections.ConfigDict, teachers: dict | None = None):
        """`teachers` maps teacher_deep / teacher_wide to (model, variables); by default they
        are loaded from `config.<name>.checkpoint`."""
        self.config = config
        options = common.student_options(config)
        self.eval_model = common.build(config.student, config, options)
        self.export_meta = {"backbone": config.student, "num_classes": config.num_classes,
                            "build_options": options}
        self._teachers = teachers or {name: load_teacher(config, name) for name in TEACHERS}
        self.teacher_models = {name: model for name, (model, _) in self._teachers.items()}

    def init_variables(self, rng: jax.Array) -> common.Variables:
        return common.init_network(rng, self.eval_model, self.config, self.config.student_init)

    def frozen_variables(self) -> dict:
        return {name: variables for name, (_, variables) in self._teachers.items()}

    def loss(self, params, batch_stats, frozen, batch, rng):
        del rng
        config, student = self.config, self.eval_model
        switch = config.loss
        x_l, labels, u0, u1, mask, u_mix = common.semi_supervised_inputs(batch)
        batch_bn = config.teacher_bn == "batch"

        def teacher(name, images):
            return common.frozen_forward(
                self.teacher_models[name], frozen[name], images, batch_bn=batch_bn
            )

        # Teacher passes (no gradient). Pseudo-labels for u_mix come from the unmixed images.
        pseudo_mix, pseudo_l, mixed_out = {}, {}, {}
        for name in TEACHERS:
            if switch.consistency_unlabeled:
                logits_0 = teacher(name, u0).logits
                logits_1 = teacher(name, u1).logits
                pseudo_mix[name] = common.pseudo_labels(logits_0, logits_1, mask)
            if switch.consistency_labeled:
                pseudo_l[name] = common.hard_labels(teacher(name, x_l).logits)
        if switch.image:
            mixed_out["teacher_deep"] = teacher("teacher_deep", u_mix)
        if switch.region:
            mixed_out["teacher_wide"] = teacher("teacher_wide", u_mix)

        # Student passes, in the official order u0, u1 (no grad: BN statistics only), u_mix, x_l:
        # four running-statistics updates per step.
        stats = batch_stats
        if config.student_nograd_bn_updates:
            no_grad = jax.lax.stop_gradient(params)
            _, stats = common.forward(student, no_grad, stats, u0)
            _, stats = common.forward(student, no_grad, stats, u1)
        s_mix, stats = common.forward(student, params, stats, u_mix)
        s_l, stats = common.forward(student, params, stats, x_l)

        zero = jnp.zeros((), jnp.float32)
        loss_sup = common.supervised_loss(config, s_l.logits, labels) if switch.supervised else zero
        loss_p_unlabeled = sum(
            (losses.cross_entropy(s_mix.logits, pseudo_mix[n]) for n in pseudo_mix), zero
        )
        loss_p_labeled = sum(
            (losses.cross_entropy(s_l.logits, pseudo_l[n]) for n in pseudo_l), zero
        )
        loss_image = zero
        if switch.image:
            # Σ over each replica's batch, averaged over replicas (the official per-GPU sum
            # all-reduced / W): scale fixed by the recipe's per-replica batch, not the device count.
            loss_image = switch.lambda_image * losses.per_replica(
                losses.semantic_sensitive, s_mix.logits, mixed_out["teacher_deep"].logits,
                replica_batch=config.replica_batch,
            )
        loss_region = zero
        if switch.region:
            loss_region = switch.lambda_region * losses.content_aware(
                s_mix.decoder, mixed_out["teacher_wide"].decoder, grid=switch.region_grid
            )
        loss = loss_sup + loss_p_unlabeled + loss_p_labeled + loss_image + loss_region
        metrics = {
            "loss": loss,
            "loss_sup": loss_sup,
            "loss_consistency_unlabeled": loss_p_unlabeled,
            "loss_consistency_labeled": loss_p_labeled,
            "loss_image": loss_image,
            "loss_region": loss_region,
        }
        return loss, (stats, metrics)

    def eval_variables(self, params, batch_stats) -> common.Variables:
        return {"params": params, "batch_stats": batch_stats}
