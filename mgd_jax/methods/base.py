"""The method protocol, and the pieces every method shares: building and initialising
networks, forwards with BN updates, CutMix mixing and hard pseudo-labels, the supervised loss."""

from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from mgd_jax import models
from mgd_jax.methods import losses
from mgd_jax.models import layers
from mgd_jax.runtime.errors import ConfigError

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}
Network = tuple[Any, Variables]  # (flax module, its variables)


class Method(Protocol):
    """What the trainer needs from a training method; it never branches on the method's name.

    A method is constructed from the config (cheaply: nothing is read until asked for) and gives:
    the network that is evaluated and exported (`eval_model`, its variables at `eval_path` inside
    the trained params / batch_stats, its build description `export_meta`), fresh trainable
    variables, frozen variables passed to every step (never differentiated, never checkpointed),
    the loss, networks to evaluate once before training (e.g. MGD's teachers), and the images
    one step reads (`images_per_step`, for throughput). A class may also define
    `check_config(config)` (run by `config_lib.validate` before anything is read).
    `MethodBase` and `StudentMethod` below give the usual defaults; a new method registered with
    `methods.register` is a `StudentMethod` plus its loss (tests/test_architecture.py).
    """

    uses_unlabeled: bool  # the train stream carries unlabeled_0/1 and a CutMix mask
    eval_model: Any
    eval_path: tuple[str, ...]  # () for a single network; ("branch1",) for CPS
    export_meta: dict[str, Any]  # backbone, num_classes, build_options of eval_model
    init_field: str  # the config field of its networks' start ("student_init"; "" = none)

    def init_variables(self, rng: jax.Array) -> Variables: ...

    def frozen_variables(self, *, random: bool = False) -> Any:
        """The frozen pytree (e.g. teachers); `random=True`: random stand-ins of the configured
        architecture (benchmarks, no checkpoint needed)."""

    def loss(
        self, params: Any, batch_stats: Any, frozen: Any, batch: dict, rng: jax.Array,
        step: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
        """(loss, (new batch_stats, scalar metrics)) at train `step` (0-based, as the lr
        schedule's); differentiated w.r.t. `params` only."""

    def extra_evals(self, frozen: Any) -> dict[str, Network]:
        """Networks evaluated on val once before training, by report name."""

    def images_per_step(self, batch_size: int) -> int:
        """The training images one step reads (throughput, benchmarks)."""


class MethodBase:
    """Defaults of the protocol: labeled data only, one network, nothing frozen or extra."""

    uses_unlabeled = False
    # The config field naming the network directory its trained networks start from ("" = no
    # such field); `config_lib.validate` refuses it empty for the datasets of the paper.
    init_field = ""
    eval_path: tuple[str, ...] = ()

    def frozen_variables(self, *, random: bool = False) -> dict:
        del random
        return {}

    def extra_evals(self, frozen: Any) -> dict[str, Network]:
        del frozen
        return {}

    def images_per_step(self, batch_size: int) -> int:
        # a labeled batch, and with unlabeled data the two unlabeled batches u0 and u1
        return batch_size * (3 if self.uses_unlabeled else 1)


class StudentMethod(MethodBase):
    """A method that trains the configured student (`config.student`, `config.model`,
    ImageNet init from `config.student_init`); subclasses add the loss."""

    init_field = "student_init"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        options = student_options(config)
        self.eval_model = build(config.student, config, options)
        self.export_meta = network_meta(config.student, config, options)

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        if config.student not in models.BACKBONES:
            raise ConfigError(f"config.student: {config.student!r} is not one of "
                              f"{models.BACKBONES}")

    def init_variables(self, rng: jax.Array) -> Variables:
        return init_network(rng, self.eval_model, self.config, self.config.student_init)


def select(tree: Any, path: tuple[str, ...]) -> Any:
    """`tree[path[0]][path[1]]...` (a method's `eval_path` into params / batch_stats)."""
    for key in path:
        tree = tree[key]
    return tree


def eval_variables(method: Method, params: Any, batch_stats: Any) -> Variables:
    """The evaluated network's variables inside the trained ones."""
    return {"params": select(params, method.eval_path),
            "batch_stats": select(batch_stats, method.eval_path)}


def build_options(
    backbone: str, *, width: float = 1.0, depths: str | tuple = "", output_stride: int = 0,
    replica_batch: int | None = None,
) -> dict[str, Any]:
    """The `models.build` keyword options (also the exported checkpoint's meta)."""
    options: dict[str, Any] = {"width": float(width)}
    parsed = models.parse_depths(depths)
    if parsed:
        options["depths"] = tuple(parsed)
    if output_stride:
        options["output_stride"] = int(output_stride)
    if backbone == "mobilenet_v2" and replica_batch:
        # The official MobileNetV2 backbone BN is per GPU (not SyncBN): ghost groups of the
        # recipe's per-replica batch reproduce it on any number of devices.
        options["bn_group_size"] = int(replica_batch)
    return options


def student_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return build_options(
        config.student, width=config.model.width, depths=config.model.depths,
        output_stride=config.model.output_stride, replica_batch=config.replica_batch,
    )


# The step each backend gets where `config.fused_step` is unset: the fused step only where it is
# shown ahead. CPU: measured slower (docs/performance.md); GPU: not measured yet; TPU: compiled
# for v5e, the same FLOPs but more bytes and HBM (docs/performance.md, TPU section).
FUSED_STEP_DEFAULT = {"cpu": False, "gpu": False, "tpu": False}


def fused(config: ml_collections.ConfigDict) -> bool:
    """`config.fused_step`: the batched step (True) or the reference step (False: one network
    application per stream, full-resolution L_I); both compute the same. Unset
    (None): `FUSED_STEP_DEFAULT` for this backend."""
    value = config.get("fused_step")
    if value is None:
        return FUSED_STEP_DEFAULT.get(jax.default_backend(), False)
    return bool(value)


def remat(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("remat", False))


# The upsampling form each backend's reference step gets where `config.resize` is unset (the
# fused step always takes the dense one). TPU: compiled for v5e, the matmul form moves fewer bytes
# and compiles faster (docs/performance.md, TPU section); CPU and GPU: the original gather form.
RESIZE_DEFAULT = {"cpu": "gather", "gpu": "gather", "tpu": "matmul"}


def resize_method(config: ml_collections.ConfigDict, backend: str | None = None) -> str:
    """`config.resize` (`layers.RESIZE_METHODS`); unset: "matmul" in the fused step, else
    `RESIZE_DEFAULT` for `backend` (default: this process's)."""
    value = config.get("resize")
    if value is not None:
        if value not in models.RESIZE_METHODS:  # the tools that skip config_lib.validate
            raise ConfigError(f"config.resize: {value!r} is not one of {models.RESIZE_METHODS}")
        return value
    if fused(config):
        return "matmul"
    return RESIZE_DEFAULT.get(backend or jax.default_backend(), "gather")


def build(backbone: str, config: ml_collections.ConfigDict, options: dict[str, Any]):
    return models.build(backbone, config.num_classes, dtype=models.compute_dtype(config.precision),
                        resize=resize_method(config), **options)


def network_meta(backbone: str, config: ml_collections.ConfigDict, options: dict[str, Any]
                 ) -> dict[str, Any]:
    """`export_meta` of a network built by `build`."""
    return {"backbone": backbone, "num_classes": config.num_classes, "build_options": options}


# An init field's value that means "from random weights, deliberately" ("" is refused for the
# datasets of the paper, whose recipe starts from ImageNet backbones: config_lib.validate).
RANDOM_INIT = "none"


def init_network(
    rng: jax.Array, model: Any, config: ml_collections.ConfigDict, init_dir: str = ""
) -> Variables:
    """Fresh variables (official init), with a pre-trained backbone merged in when given.

    `init_dir` is a network directory: an imported ImageNet backbone (`mgd-import
    --backbone_only`) or any trained network of the same architecture, whose
    head (trained for other classes) is left out. Its backbone leaves replace the fresh ones
    (the official partial-load semantics: e.g. torchvision ResNet-18 leaves the deep stem at its
    initial values). "" or `RANDOM_INIT`: fresh variables only.
    """
    size = min(int(config.crop_size), 64)
    # One jitted init instead of hundreds of eagerly compiled initialiser ops.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((1, size, size, 3), jnp.float32))
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    if init_dir and init_dir != RANDOM_INIT:
        from mgd_jax import network_dir  # local: orbax only when a checkpoint is read

        loaded, meta = network_dir.load_variables(init_dir)
        loaded = {part: {"backbone": tree["backbone"]} for part, tree in loaded.items()
                  if "backbone" in tree}
        if "params" not in loaded:
            raise network_dir.ExportError(f"{init_dir}: holds no backbone parameters to start from")
        variables, kept = network_dir.merge_variables(variables, loaded, source=init_dir)
        logging.info(
            "initialised from %s (%s); %d leaves keep their fresh initialisation: %s",
            init_dir, meta.get("source", "?"), len(kept), ", ".join(kept[:20]),
        )
    return variables


def normalize(part: dict[str, jax.Array]) -> jax.Array:
    """uint8 image + valid mask -> the recipe's normalised image (0 on padding)."""
    from mgd_jax.data import augment  # local: the step needs no OpenCV

    return augment.normalize(part["image"], part["valid"])


def semi_supervised_inputs(batch: dict) -> tuple[jax.Array, ...]:
    """(x_l, labels, u0, u1, mask, u_mix): a train batch normalised, with the CutMix image."""
    x_l = normalize(batch["labeled"])
    u0 = normalize(batch["unlabeled_0"])
    u1 = normalize(batch["unlabeled_1"])
    mask = batch["mask"]
    return x_l, labels_of(batch["labeled"]), u0, u1, mask, mix(u0, u1, mask)


def labels_of(part: dict[str, jax.Array]) -> jax.Array:
    """The labels of a labeled batch as int32 (the host sends uint8: 255 = ignore)."""
    return part["label"].astype(jnp.int32)


def forward(model: Any, params: Any, batch_stats: Any, images: jax.Array, *, train: bool = True):
    """One forward; in train mode returns the BN statistics it updated (else unchanged)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, images, train=False), batch_stats
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]


def frozen_forward(model: Any, variables: Variables, images: jax.Array, *, batch_bn: bool):
    """A teacher forward: no gradient; BN on batch statistics (official) or running ones.

    With batch statistics the updated running statistics are discarded, as nothing in the
    recipe ever reads them.
    """
    variables = jax.lax.stop_gradient(variables)
    out, _ = forward(model, variables["params"], variables["batch_stats"], images, train=batch_bn)
    return out


def forward_streams(
    model: Any, params: Any, batch_stats: Any, streams: jax.Array, *, train: bool = True,
    upsample: bool = False, remat: bool = False,
) -> tuple[Any, Any]:
    """S image batches (S, B, H, W, 3) through one network in one call, each with its own
    BatchNorm batch statistics: the streams are merged batch-major into S*B images (example b
    of stream s at b*S + s) and every BatchNorm normalises each stream separately
    (`model.with_bn_streams(S)`).

    Returns (outputs stacked on axis 0, batch moments stacked on axis 0 or None in eval mode).
    The running statistics are not touched: `replay_moments` applies the streams' updates in the
    order the unbatched forwards would. `upsample=False` leaves the full-resolution logits out
    (`upsample_logits` makes them for the streams that need them). `remat`: keep only the
    network's inputs for the backward pass and recompute its activations there
    (`config.remat`: less memory, about one more forward; the same values, BN included).
    """
    # Batch-major, not stream-major (what vmap over the stream axis gives): with B sharded over
    # devices, a stream-major merged batch is no plain sharding of its dim, and the SPMD
    # partitioner replicates the batch, running every example's convolutions on every device.
    n_streams, batch = streams.shape[:2]
    variables = {"params": params, "batch_stats": batch_stats}
    net = model.with_bn_streams(n_streams)

    def run(images):
        if not train:
            return net.apply(variables, images, train=False, upsample=upsample), None
        out, moments = net.apply(variables, images, train=True, upsample=upsample,
                                 mutable=["batch_moments"])
        moments = moments["batch_moments"]
        if n_streams == 1:  # BatchNorm records (C,) for a single stream
            moments = jax.tree.map(lambda m: m[None], moments)
        return out, moments

    if remat:
        run = jax.checkpoint(run)
    merged = jnp.swapaxes(streams, 0, 1).reshape((n_streams * batch,) + streams.shape[2:])
    out, moments = run(merged)
    out = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((batch, n_streams) + x.shape[1:]), 0, 1), out)
    return out, moments


def replay_moments(batch_stats: Any, moments: Any, order: Any = None) -> Any:
    """`batch_stats` after the running-statistics updates of the streams `order` (default: all,
    first to last) of `forward_streams`' moments."""
    order = range(jax.tree.leaves(moments)[0].shape[0]) if order is None else order
    for s in order:
        batch_stats = layers.apply_moments(batch_stats, stream(moments, s))
    return batch_stats


def upsample_logits(model: Any, low_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Full-resolution logits (..., H, W, C) of stacked low-resolution ones, as the network
    makes them."""
    # No flattening of the leading dims: merging a stream axis into a batch sharded over
    # devices stream-major would make the partitioner reshard (see `forward_streams`).
    return layers.resize_bilinear_align_corners(low_logits, size, method=model.resize)


def cast_kernels(variables: Variables, dtype: Any) -> Variables:
    """Conv kernels in the compute dtype, once (convolutions cast them on every call anyway; BN
    parameters and statistics stay float32): for frozen networks."""
    if jnp.dtype(dtype).itemsize >= 4:
        return variables

    def cast(path, leaf):
        return leaf.astype(dtype) if jax.tree_util.keystr(path[-1:]) == "['kernel']" else leaf

    return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}


def stream(tree: Any, index: int) -> Any:
    """Stream `index` of outputs stacked by `forward_streams`."""
    return jax.tree.map(lambda x: x[index], tree)


def mix(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """CutMix: `a * (1 - M) + b * M` with M (B, H, W) broadcast over channels."""
    m = mask.astype(a.dtype)[..., None]
    return a * (1 - m) + b * m


def pseudo_labels(logits_0: jax.Array, logits_1: jax.Array, mask: jax.Array) -> jax.Array:
    """CPS hard labels for the mixed image: argmax of the unmixed logits mixed with M."""
    return jnp.argmax(mix(logits_0, logits_1, mask), axis=-1).astype(jnp.int32)


def hard_labels(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# How L_sup's plain cross-entropy is averaged (`config.loss.ce_reduction`).
# "per_replica": the official one. Each GPU averages its CE over its own valid pixels and the
# all-reduced losses are divided by the GPU count; here the groups are consecutive
# `replica_batch` examples of the global batch (the recipe's per-GPU batch, not the devices
# present), so the value does not depend on the machine. A group without a valid pixel counts
# as 0: PyTorch's CE is NaN there but its gradient 0, so the official update is the same and
# only its logged loss is NaN.
# "global": one mean over the valid pixels of the whole global batch (equal to "per_replica"
# when every group has as many valid pixels).
CE_REDUCTIONS = ("per_replica", "global")


def ce_reduction(config: ml_collections.ConfigDict) -> str:
    """`config.loss.ce_reduction` ("global" for configs recorded before the field existed)."""
    return config.loss.get("ce_reduction", "global")


def supervised_loss(config: ml_collections.ConfigDict, logits: jax.Array, labels: jax.Array):
    """L_sup (every method's supervised term: Sup.l, both CPS branches, the MGD student).

    OHEM (`loss.ohem`) is always per replica, as the official code runs it per GPU (its min_kept
    is per GPU); plain CE is reduced as `loss.ce_reduction` says (`CE_REDUCTIONS`)."""
    if config.loss.ohem:
        return losses.per_replica(
            losses.ohem_cross_entropy, logits, labels, replica_batch=config.replica_batch,
            thresh=config.loss.ohem_thresh, min_kept=config.loss.ohem_min_kept,
        )
    if ce_reduction(config) == "per_replica":
        return losses.per_replica(losses.cross_entropy, logits, labels,
                                  replica_batch=config.replica_batch)
    return losses.cross_entropy(logits, labels)
