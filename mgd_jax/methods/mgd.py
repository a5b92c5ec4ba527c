"""The student stage: multi-granularity distillation from two frozen teachers
(docs/method.md §1.2, §6.1).

Routing, as in the official train.py:
  L_sup  CE (or OHEM) of S(x_l) against the ground truth;
  L_P    hard-label CE of S(u_mix) against the mixed pseudo-labels of T_W and of T_D (from their
         forwards on the unmixed u0 / u1), and of S(x_l) against argmax T_W(x_l) and T_D(x_l)
         (`loss.pixel_teachers`: one teacher's two terms only, an ablation);
  L_I    λ1 · semantic-sensitive(S(u_mix), T_D(u_mix)), the L1 sum scaled per replica;
  L_R    λ2 · content-aware(S's decoder feature, T_W's decoder feature), both on u_mix.
Teachers never enter the optimizer or the checkpoint. The teacher-side CE terms of the official
logged loss carry no gradient and are not computed.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mgd_jax import models
from mgd_jax.methods import base, losses
from mgd_jax.runtime.errors import ConfigError

TEACHERS = ("teacher_deep", "teacher_wide")  # T_D, T_W
TEACHER_BN = ("batch", "running")  # official: batch statistics (train-mode BN, §1.2)
# `loss.pixel_teachers`: whose pseudo-labels L_P uses. Official: both; one alone is an ablation
# (the demo's, docs/demo.md); L_I and L_R keep their teacher whatever this says.
PIXEL_TEACHERS = {"both": TEACHERS, "deep": ("teacher_deep",), "wide": ("teacher_wide",)}


def pixel_teachers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The teachers whose pseudo-labels enter L_P (`loss.pixel_teachers`; a config recorded
    before the field existed means both)."""
    return PIXEL_TEACHERS[config.loss.get("pixel_teachers", "both")]


def load_teacher(config: ml_collections.ConfigDict, name: str) -> base.Network:
    """(model, variables) of a teacher network directory; its architecture comes from there."""
    from mgd_jax import network_dir  # local: orbax only when a checkpoint is read

    network = network_dir.load_network(config[name].checkpoint, precision=config.precision)
    backbone, expected = network.meta["backbone"], config[name].backbone
    if models.canonical(backbone) != models.canonical(expected):
        raise ConfigError(
            f"config.{name}.checkpoint={config[name].checkpoint!r} holds a {backbone} network, "
            f"but config.{name}.backbone is {expected!r}"
        )
    if network.num_classes != config.num_classes:
        raise ConfigError(
            f"config.{name}.checkpoint={config[name].checkpoint!r} has {network.num_classes} "
            f"classes, the dataset has {config.num_classes}"
        )
    logging.info("%s: %s", name, network.describe())
    return network.model, network.variables


def random_teacher(config: ml_collections.ConfigDict, name: str) -> base.Network:
    """A randomly initialised teacher of the configured architecture (benchmarks)."""
    t = config[name]
    options = base.build_options(t.backbone, width=t.width, depths=t.depths,
                                 replica_batch=config.replica_batch)
    model = base.build(t.backbone, config, options)
    init = jax.jit(functools.partial(model.init, train=False))
    key = jax.random.key(config.seed + 1 + TEACHERS.index(name), impl="rbg")
    variables = init(key, jnp.zeros((1, 64, 64, 3), jnp.float32))
    return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


class MGD(base.StudentMethod):
    uses_unlabeled = True

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.teacher_models: dict = {}  # set by frozen_variables()

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        base.StudentMethod.check_config(config)
        if config.teacher_bn not in TEACHER_BN:
            raise ConfigError(f"config.teacher_bn: {config.teacher_bn!r} is not one of "
                              f"{TEACHER_BN}")
        for name in TEACHERS:
            path = config[name].checkpoint
            if not path:
                raise ConfigError(f"config.{name}.checkpoint: is empty: method=mgd needs a "
                                  "trained teacher (a CPS run's export/ or an imported network)")
            if not os.path.isdir(os.path.expanduser(path)):
                raise ConfigError(f"config.{name}.checkpoint: {path!r} does not exist")
        chosen = config.loss.get("pixel_teachers", "both")
        if chosen not in PIXEL_TEACHERS:
            raise ConfigError(f"config.loss.pixel_teachers: {chosen!r} is not one of "
                              f"{tuple(PIXEL_TEACHERS)}")
        if config.loss.lambda_image < 0 or config.loss.lambda_region < 0:
            raise ConfigError("config.loss.lambda_image / lambda_region: must be >= 0")

    def frozen_variables(self, *, random: bool = False) -> dict:
        """The two teachers' variables (their modules go to `teacher_models`)."""
        make = random_teacher if random else load_teacher
        teachers = {name: make(self.config, name) for name in TEACHERS}
        self.teacher_models = {name: model for name, (model, _) in teachers.items()}
        dtype = models.compute_dtype(self.config.precision)
        return {name: base.cast_kernels(variables, dtype)
                for name, (_, variables) in teachers.items()}

    def extra_evals(self, frozen: dict) -> dict[str, base.Network]:
        """Each teacher on val before training: a cheap guard against a wrong import."""
        if not self.config.evaluate_teachers:
            return {}
        return {name: (self.teacher_models[name], frozen[name]) for name in TEACHERS}

    def loss(self, params, batch_stats, frozen, batch, rng, step=0):
        del rng, step
        inputs = base.semi_supervised_inputs(batch)
        if base.fused(self.config):
            parts = self._fused_parts(params, batch_stats, frozen, inputs)
        else:
            parts = self._reference_parts(params, batch_stats, frozen, inputs)
        return self._combine(inputs[1], *parts)

    def _teacher(self, name: str) -> Any:
        # A teacher loaded from a network directory is rebuilt with this step's resize method.
        return self.teacher_models[name].clone(resize=base.resize_method(self.config))

    def _reference_parts(self, params, batch_stats, frozen, inputs):
        """The step as the official code runs it: one network application per stream (12)."""
        config, student = self.config, self.eval_model
        switch = config.loss
        x_l, _, u0, u1, mask, u_mix = inputs
        batch_bn = config.teacher_bn == "batch"

        def teacher(name, images):
            return base.frozen_forward(self._teacher(name), frozen[name], images,
                                       batch_bn=batch_bn)

        # Teacher passes (no gradient). Pseudo-labels for u_mix come from the unmixed images.
        pseudo_mix, pseudo_l = {}, {}
        image_target = region_target = None
        for name in pixel_teachers(config):
            if switch.consistency_unlabeled:
                logits_0 = teacher(name, u0).logits
                logits_1 = teacher(name, u1).logits
                pseudo_mix[name] = base.pseudo_labels(logits_0, logits_1, mask)
            if switch.consistency_labeled:
                pseudo_l[name] = base.hard_labels(teacher(name, x_l).logits)
        if switch.image:
            image_target = teacher("teacher_deep", u_mix).logits
        if switch.region:
            region_target = teacher("teacher_wide", u_mix).decoder

        # Student passes, in the official order u0, u1 (no grad: BN statistics only), u_mix, x_l:
        # four running-statistics updates per step.
        stats = batch_stats
        if config.student_nograd_bn_updates:
            no_grad = jax.lax.stop_gradient(params)
            _, stats = base.forward(student, no_grad, stats, u0)
            _, stats = base.forward(student, no_grad, stats, u1)
        s_mix, stats = base.forward(student, params, stats, u_mix)
        s_l, stats = base.forward(student, params, stats, x_l)
        image = None if image_target is None else (s_mix.logits, image_target, None)
        return (s_mix.logits, s_l.logits, s_mix.decoder, pseudo_mix, pseudo_l, image,
                region_target, stats)

    def _fused_parts(self, params, batch_stats, frozen, inputs):
        """The same quantities with each network called once per gradient mode: every stream of
        a teacher in one batched call, the student's u0/u1 in one, u_mix/x_l in one, each stream
        with its own BN statistics (`base.forward_streams`); the student's running statistics
        are updated in the official order u0, u1, u_mix, x_l. L_I uses low-resolution logits."""
        config, student = self.config, self.eval_model
        switch = config.loss
        x_l, _, u0, u1, mask, u_mix = inputs
        size = x_l.shape[1:3]
        images = {"u0": u0, "u1": u1, "x_l": x_l, "u_mix": u_mix}
        pixel = pixel_teachers(config)
        wanted = {name: ((["u0", "u1"] if switch.consistency_unlabeled else [])
                         + (["x_l"] if switch.consistency_labeled else []))
                  if name in pixel else [] for name in TEACHERS}
        if switch.image:
            wanted["teacher_deep"].append("u_mix")
        if switch.region:
            wanted["teacher_wide"].append("u_mix")

        pseudo_mix, pseudo_l, mixed = {}, {}, {}
        for name in TEACHERS:
            names = wanted[name]
            if not names:
                continue
            model = self._teacher(name)
            out, _ = base.forward_streams(
                model, *jax.lax.stop_gradient((frozen[name]["params"],
                                               frozen[name]["batch_stats"])),
                jnp.stack([images[k] for k in names]), train=config.teacher_bn == "batch",
            )
            labelled = [k for k in names if k != "u_mix"]
            if labelled:
                full = base.upsample_logits(model, out.low_logits[: len(labelled)], size)
                full = dict(zip(labelled, full, strict=True))
                if switch.consistency_unlabeled:
                    pseudo_mix[name] = base.pseudo_labels(full["u0"], full["u1"], mask)
                if switch.consistency_labeled:
                    pseudo_l[name] = base.hard_labels(full["x_l"])
            if "u_mix" in names:
                mixed[name] = base.stream(out, names.index("u_mix"))

        stats = batch_stats
        if config.student_nograd_bn_updates:
            _, moments = base.forward_streams(student, jax.lax.stop_gradient(params), stats,
                                              jnp.stack([u0, u1]))
            stats = base.replay_moments(stats, moments)
        out, moments = base.forward_streams(student, params, stats, jnp.stack([u_mix, x_l]),
                                            remat=base.remat(config))
        stats = base.replay_moments(stats, moments)
        s_mix_logits, s_l_logits = base.upsample_logits(student, out.low_logits, size)
        image = None
        if switch.image:
            image = (out.low_logits[0], mixed["teacher_deep"].low_logits, size)
        region_target = mixed["teacher_wide"].decoder if switch.region else None
        return (s_mix_logits, s_l_logits, out.decoder[0], pseudo_mix, pseudo_l, image,
                region_target, stats)

    def _combine(self, labels, s_mix_logits, s_l_logits, s_mix_decoder, pseudo_mix, pseudo_l,
                 image, region_target, stats):
        """The loss and its metrics from the student's outputs and the teachers' targets;
        `image` is (student, teacher, size) logits for L_I (low-resolution ones with a size)."""
        config = self.config
        switch = config.loss
        zero = jnp.zeros((), jnp.float32)
        targets_l = [pseudo_l[n] for n in pseudo_l]
        # L_sup shares the student's log-softmax with the L_P targets when it is a plain CE over
        # the whole batch; otherwise `base.supervised_loss` reduces it (per replica / OHEM).
        if switch.supervised and not config.loss.ohem and base.ce_reduction(config) == "global":
            loss_sup, *ce_l = losses.cross_entropies(s_l_logits, [labels, *targets_l])
        else:
            ce_l = losses.cross_entropies(s_l_logits, targets_l)
            loss_sup = (base.supervised_loss(config, s_l_logits, labels) if switch.supervised
                        else zero)
        loss_p_labeled = sum(ce_l, zero)
        loss_p_unlabeled = sum(
            losses.cross_entropies(s_mix_logits, [pseudo_mix[n] for n in pseudo_mix]), zero
        )
        loss_image = zero
        if image is not None:
            # Σ over each replica's batch, averaged over replicas (the official per-GPU sum
            # all-reduced / W): scale fixed by the recipe's per-replica batch, not the device count.
            student_logits, teacher_logits, size = image
            loss_image = switch.lambda_image * losses.per_replica(
                losses.semantic_sensitive, student_logits, teacher_logits,
                replica_batch=config.replica_batch, size=size,
            )
        loss_region = zero
        if region_target is not None:
            loss_region = switch.lambda_region * losses.content_aware(
                s_mix_decoder, region_target, grid=switch.region_grid
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
