"""Segmentation networks of the official MGD code in flax.linen (NHWC): DeepLabv3+ on ResNet-18,
MobileNetV2 (students), ResNet-101 and Wide-ResNet-50-2 (teachers).

    model = build("resnet18", num_classes=21)
    variables = model.init(rng, images, train=False)          # {"params", "batch_stats"}
    out = model.apply(variables, images)                      # SegOutput(features, decoder, logits)
    out, upd = model.apply(variables, images, train=True, mutable=["batch_stats"])

Parameter trees mirror the PyTorch state-dict keys of the official `Single*Network` by a
mechanical rule (`mgd_jax.pytorch.importer.flax_path`; `backbone`, `head`, `classifier` at the top).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mgd_jax.models.deeplabv3plus import SegmentationModel, SegOutput
from mgd_jax.models.layers import RESIZE_METHODS
from mgd_jax.models.mobilenet_v2 import MobileNetV2
from mgd_jax.models.resnet import RESNET_CONFIGS, ResNet, scale_channels

__all__ = ["ALIASES", "BACKBONES", "PRECISIONS", "RESIZE_METHODS", "STUDENTS", "TEACHERS",
           "SegOutput", "SegmentationModel", "build", "canonical", "compute_dtype", "count_params",
           "parse_depths"]

STUDENTS = ("resnet18", "mobilenet_v2")
TEACHERS = ("resnet101", "wide_resnet50_2")
BACKBONES = STUDENTS + TEACHERS
ALIASES = {"wide_resnet34_2": "wide_resnet50_2"}  # the official name of the WRN-50-2 layout
PRECISIONS = ("auto", "float32", "bfloat16")


def canonical(backbone: str) -> str:
    """The backbone's name in `BACKBONES` (aliases resolved)."""
    return ALIASES.get(backbone, backbone)


def compute_dtype(precision: str = "auto") -> jnp.dtype:
    """Compute dtype of a precision setting (`PRECISIONS`, or any dtype name, e.g. "float64" in
    tests): "auto" is bfloat16 on GPU/TPU and float32 on CPU (parameters and BN statistics
    always stay float32)."""
    if precision == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return jnp.dtype(precision)
    except TypeError:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}") from None


def parse_depths(text: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Blocks per stage from "1,1,2,1" (or a tuple); None for "" (the official depths)."""
    if not text:
        return None
    if isinstance(text, tuple | list):
        return tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in str(text).split(","))
    except ValueError as e:
        raise ValueError(f"depths {text!r} must be comma-separated integers") from e


def build(
    backbone: str,
    num_classes: int,
    *,
    dtype: Any = jnp.float32,
    output_stride: int | None = None,
    depths: tuple[int, ...] | None = None,
    width: float = 1.0,
    bn_group_size: int | None = None,
    resize: str = "matmul",
) -> SegmentationModel:
    """The official DeepLabv3+ network for `backbone` (defaults: exact official architecture).

    backbone: "resnet18" | "mobilenet_v2" | "resnet101" | "wide_resnet50_2" (alias
        "wide_resnet34_2").
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and BN statistics stay float32, and
        `decoder` / `logits` are returned in float32.
    output_stride: ResNets 16 only (official); MobileNetV2 32 (official default) or 16.
    depths: blocks per stage (4 for ResNets, 7 inverted-residual stages for MobileNetV2), to make
        small test / demo networks.
    width: channel multiplier for every layer incl. the head's 256 and the low-level reduce
        (ResNet / head: rounded, >= 1; MobileNetV2 backbone: torchvision's `make_divisible(., 8)`).
    bn_group_size: ghost-BN group size for the *backbone's* BatchNorms (per-replica statistics;
        the official MobileNetV2 backbone uses plain per-GPU BN over 2 images). The head's BN is
        always over the whole (global) batch, like SyncBN.
    resize: how the align-corners upsampling is computed (`layers.RESIZE_METHODS`; same values).
    """
    name = canonical(backbone)
    if name not in BACKBONES:
        raise ValueError(
            f"models.build: unknown backbone {backbone!r}; expected one of "
            f"{BACKBONES + tuple(ALIASES)}"
        )
    if num_classes < 1:
        raise ValueError(f"models.build: num_classes must be >= 1, got {num_classes}")
    if width <= 0:
        raise ValueError(f"models.build: width must be > 0, got {width}")
    if bn_group_size is not None and bn_group_size < 1:
        raise ValueError(f"models.build: bn_group_size must be >= 1 or None, got {bn_group_size}")

    if name == "mobilenet_v2":
        net: Any = MobileNetV2(
            width=width,
            depths=None if depths is None else tuple(depths),
            output_stride=32 if output_stride is None else output_stride,
            bn_group_size=bn_group_size,
            dtype=dtype,
        )
        reduce_channels = 24  # HeadSmall for MobileNetV2: reduce 24 -> 24
    else:
        if output_stride not in (None, 16):
            raise ValueError(
                f"models.build: {name} runs at output stride 16 (layer4 dilated 2, 4, 8); "
                f"got output_stride={output_stride}"
            )
        cfg = dict(RESNET_CONFIGS[name])
        if depths is not None:
            cfg["layers"] = tuple(depths)
        net = ResNet(**cfg, width=width, bn_group_size=bn_group_size, dtype=dtype)
        reduce_channels = 48
    return SegmentationModel(
        backbone=net,
        num_classes=num_classes,
        head_channels=scale_channels(256, width),
        reduce_channels=scale_channels(reduce_channels, width),
        dtype=dtype,
        resize=resize,
    )


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs).

    Pass `variables["params"]`: batch_stats are buffers, not parameters (PyTorch counts them
    neither).
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
