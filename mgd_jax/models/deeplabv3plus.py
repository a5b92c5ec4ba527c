"""DeepLabv3+ head of the official MGD code (`network.py`: ASPP, Head / HeadSmall) and the full
segmentation network (`Single{Small,Large,Wide}Network`: backbone + head + 1x1 classifier).

Module names mirror the official ones (`head.aspp.map_convs.2` -> `head/aspp/map_convs_2`,
`head.last_conv.3` -> `head/last_conv_3`). `Head` and `HeadSmall` differ only in their input
channel counts (inferred here) and in the low-level reduce width (48, or 24 for MobileNetV2), so
one `Head` module serves both.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mgd_jax.models.layers import (
    BatchNorm,
    conv,
    kaiming_normal_relu,
    resize_bilinear_align_corners,
    torch_default_bias_init,
)

Array = jax.Array


@flax.struct.dataclass
class SegOutput:
    """What the network returns (a pytree, so jitted functions can return it).

    features: backbone outputs, shallow to deep, in the compute dtype (ResNets: layer1..layer4;
        MobileNetV2: features[3]..features[17]). `features[0]` feeds the decoder, `features[-1]`
        the ASPP.
    decoder: float32 (N, H/4, W/4, 256*width) post-ReLU decoder feature (official
        `v3plus_feature`, used by the region-level loss).
    logits: float32 (N, H, W, num_classes), upsampled with align_corners=True (None when the
        network was called with `upsample=False`).
    low_logits: float32 (N, H/4, W/4, num_classes), the classifier's output before upsampling.
    """

    features: tuple[Array, ...]
    decoder: Array
    logits: Array | None
    low_logits: Array


def leaky_relu(x: Array) -> Array:
    return nn.leaky_relu(x, negative_slope=0.01)  # nn.LeakyReLU() default, ASPP only


class ASPP(nn.Module):
    """Official ASPP: four parallel convs (1x1, 3x3 at rates 6/12/18, no bias) -> concat -> map_bn
    -> LeakyReLU -> red_conv; image-pool branch: global mean -> global_pooling_conv ->
    global_pooling_bn -> LeakyReLU -> pool_red_conv, *added* (broadcast) to the red_conv output;
    then red_bn -> LeakyReLU. The pooling is always over the full map (pooling_size=None)."""

    hidden: int = 256
    out: int = 256
    rates: tuple[int, int, int] = (6, 12, 18)
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dt = self.dtype
        cv = lambda c, k, name, d=1: conv(
            c,
            k,
            padding=d if k == 3 else 0,
            dilation=d,
            dtype=dt,
            kernel_init=kaiming_normal_relu,
            name=name,
        )
        bn = lambda name: BatchNorm(streams=self.bn_streams, dtype=dt, name=name)
        branches = [cv(self.hidden, 1, "map_convs_0")(x)]
        for i, r in enumerate(self.rates):
            branches.append(cv(self.hidden, 3, f"map_convs_{i + 1}", r)(x))
        out = jnp.concatenate(branches, axis=-1)
        out = leaky_relu(bn("map_bn")(out, train))
        out = cv(self.out, 1, "red_conv")(out)

        pool = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(dt)
        pool = cv(self.hidden, 1, "global_pooling_conv")(pool)
        pool = leaky_relu(bn("global_pooling_bn")(pool, train))
        pool = cv(self.out, 1, "pool_red_conv")(pool)

        out = out + pool  # (N,1,1,C) broadcast == pool.repeat(1, 1, H, W)
        return leaky_relu(bn("red_bn")(out, train))


class Head(nn.Module):
    """DeepLabv3+ decoder: ASPP(features[-1]) upsampled (align corners) to features[0]'s size,
    concatenated [aspp, reduce(features[0])], then two 3x3 conv + BN + ReLU (`last_conv`)."""

    channels: int = 256
    reduce_channels: int = 48
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32
    resize: str = "matmul"  # layers.RESIZE_METHODS

    @nn.compact
    def __call__(self, features: tuple[Array, ...], train: bool) -> Array:
        dt = self.dtype
        cv = lambda c, k, name: conv(
            c, k, padding=k // 2, dtype=dt, kernel_init=kaiming_normal_relu, name=name
        )
        bn = lambda name: BatchNorm(streams=self.bn_streams, dtype=dt, name=name)
        f = ASPP(hidden=self.channels, out=self.channels, bn_streams=self.bn_streams, dtype=dt,
                 name="aspp")(
            features[-1], train
        )
        low = features[0]
        low = nn.relu(bn("reduce_1")(cv(self.reduce_channels, 1, "reduce_0")(low), train))
        f = resize_bilinear_align_corners(f, low.shape[1:3], method=self.resize)
        f = jnp.concatenate([f, low], axis=-1)
        f = nn.relu(bn("last_conv_1")(cv(self.channels, 3, "last_conv_0")(f), train))
        f = nn.relu(bn("last_conv_4")(cv(self.channels, 3, "last_conv_3")(f), train))
        return f


class SegmentationModel(nn.Module):
    """backbone -> Head -> 1x1 classifier (with bias) -> align-corners upsampling to input size.

    Build it with `mgd_jax.models.build`. `__call__(images, train, upsample=True)`: images NHWC
    float, RGB, ImageNet-normalised; returns `SegOutput` (`upsample=False` leaves out the
    full-resolution logits). In train mode BatchNorm uses batch statistics and updates
    `batch_stats` (apply with `mutable=["batch_stats"]`).

    `with_bn_streams(S)`: the same network (same parameters) whose every BatchNorm treats its
    input as S streams merged batch-major (`layers.BatchNorm.streams`).
    """

    backbone: nn.Module
    num_classes: int
    head_channels: int = 256
    reduce_channels: int = 48
    dtype: Any = jnp.float32
    resize: str = "matmul"  # layers.RESIZE_METHODS: both compute the same (tests/test_layers.py)
    bn_streams: int = 1  # BatchNorm.streams of the head; the backbone carries its own

    def with_bn_streams(self, streams: int) -> SegmentationModel:
        """This network with `streams` BatchNorm streams in the backbone and the head."""
        return self.clone(bn_streams=streams, backbone=self.backbone.clone(bn_streams=streams))

    @nn.compact
    def __call__(self, images: Array, train: bool = False, upsample: bool = True) -> SegOutput:
        if images.ndim != 4:
            raise ValueError(f"SegmentationModel: images must be NHWC, got shape {images.shape}")
        if getattr(self.backbone, "bn_streams", 1) != self.bn_streams:
            raise ValueError("SegmentationModel: set bn_streams with with_bn_streams, which sets "
                             "the backbone's too")
        x = images.astype(self.dtype)
        features = self.backbone(x, train)
        decoder = Head(self.head_channels, self.reduce_channels, bn_streams=self.bn_streams,
                       dtype=self.dtype, resize=self.resize, name="head")(features, train)
        # business_layer init: kaiming_normal (fan_in, relu) kernel; bias keeps PyTorch's default.
        logits = conv(
            self.num_classes,
            1,
            use_bias=True,
            dtype=self.dtype,
            kernel_init=kaiming_normal_relu,
            bias_init=torch_default_bias_init(self.head_channels),
            name="classifier",
        )(decoder)
        low_logits = logits.astype(jnp.float32)
        if upsample:
            logits = resize_bilinear_align_corners(low_logits, images.shape[1:3],
                                                   method=self.resize)
        return SegOutput(
            features=tuple(features), decoder=decoder.astype(jnp.float32),
            logits=logits if upsample else None, low_logits=low_logits,
        )
