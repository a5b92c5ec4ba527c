"""MobileNetV2 backbone of the official MGD student (torchvision layout, `features[0..17]`).

`features.18` (the 1x1 conv 320->1280) and the classifier are omitted, as in the official model
(they exist there but are never used). Module and parameter names follow torchvision's state-dict
keys through the mechanical rule (`features.2.conv.1.0` -> `features_2/conv_1_0`).

Output stride (official: 32): `features[15:18]` get `_nostride_dilate` with dilate 2, 4, 8. Those
blocks have stride 1 already, so only their depthwise 3x3 convs change (dilation = padding =
2, 4, 8); the stride-2 block `features[14]` is kept. `output_stride=16` (an option, not used by the
official recipe) additionally applies `_nostride_dilate(dilate=2)` to `features[14]`: its stride-2
depthwise conv becomes stride 1 with dilation = padding = 2; `features[15:18]` keep 2, 4, 8.

The backbone returns the outputs of every block from the last stride-4 block on, shallow to deep,
like the official `forward` (`features[3]`..`features[17]`, 15 tensors at width/depth 1): the first
is the 24-channel low-level feature, the last the 320-channel ASPP input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgd_jax.models.layers import BatchNorm, conv

Array = jax.Array

# torchvision's inverted-residual setting: expand ratio t, channels c, blocks n, first stride s.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_LOW_LEVEL_STAGE = 1  # the c24 stage: its last block is the stride-4 low-level feature
_DILATED_STAGE = 5  # the c160 stage: blocks after its first one (and all later) are dilated


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never down by > 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def relu6(x: Array) -> Array:
    return jnp.clip(x, 0, 6)


class InvertedResidual(nn.Module):
    """torchvision `InvertedResidual`: [1x1 expand + BN + ReLU6] -> 3x3 depthwise + BN + ReLU6
    -> 1x1 linear + BN, with a residual when stride 1 and in == out channels."""

    inp: int
    oup: int
    stride: int
    expand_ratio: int
    dilation: int = 1
    bn_group_size: int | None = None
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = lambda name: BatchNorm(group_size=self.bn_group_size, streams=self.bn_streams,
                                         dtype=self.dtype, name=name)
        hidden = int(round(self.inp * self.expand_ratio))
        out = x
        k = 0  # index inside the torch `conv` Sequential
        if self.expand_ratio != 1:
            out = conv(hidden, 1, dtype=self.dtype, name=f"conv_{k}_0")(out)
            out = relu6(bn(f"conv_{k}_1")(out, train))
            k += 1
        d = self.dilation
        out = conv(
            hidden,
            3,
            stride=self.stride,
            padding=d,
            dilation=d,
            groups=hidden,
            dtype=self.dtype,
            name=f"conv_{k}_0",
        )(out)
        out = relu6(bn(f"conv_{k}_1")(out, train))
        out = conv(self.oup, 1, dtype=self.dtype, name=f"conv_{k + 1}")(out)
        out = bn(f"conv_{k + 2}")(out, train)
        if self.stride == 1 and self.inp == self.oup:
            out = x + out
        return out


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2 `features[0..17]` (see the module docstring).

    `depths` overrides the block count n of each of the 7 inverted-residual stages; `width` is
    torchvision's `width_mult` (channels rounded with `make_divisible(., 8)`).
    """

    width: float = 1.0
    depths: tuple[int, ...] | None = None
    output_stride: int = 32
    bn_group_size: int | None = None
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
        setting = INVERTED_RESIDUAL_SETTING
        if self.depths is not None:
            if len(self.depths) != len(setting) or min(self.depths) < 1:
                raise ValueError(
                    f"MobileNetV2: depths must be {len(setting)} positive block counts (one per "
                    f"inverted-residual stage), got {self.depths}"
                )
            setting = tuple(
                (t, c, n, s) for (t, c, _, s), n in zip(setting, self.depths, strict=True)
            )
        if self.output_stride not in (16, 32):
            raise ValueError(
                f"MobileNetV2: output_stride must be 32 or 16, got {self.output_stride}"
            )

        bn = lambda name: BatchNorm(group_size=self.bn_group_size, streams=self.bn_streams,
                                         dtype=self.dtype, name=name)
        inp = make_divisible(32 * self.width)
        x = conv(inp, 3, stride=2, padding=1, dtype=self.dtype, name="features_0_0")(x)
        x = relu6(bn("features_0_1")(x, train))

        features: list[Array] = []
        idx = 1
        dilate = 2
        for stage, (t, c, n, s) in enumerate(setting):
            oup = make_divisible(c * self.width)
            for i in range(n):
                stride = s if i == 0 else 1
                dilation = 1
                if stage > _DILATED_STAGE or (stage == _DILATED_STAGE and i > 0):
                    dilation, dilate = dilate, dilate * 2  # features[15:18]: 2, 4, 8
                elif stage == _DILATED_STAGE and self.output_stride == 16:
                    stride, dilation = 1, 2  # _nostride_dilate(features[14], 2)
                x = InvertedResidual(
                    inp,
                    oup,
                    stride,
                    t,
                    dilation=dilation,
                    bn_group_size=self.bn_group_size,
                    bn_streams=self.bn_streams,
                    dtype=self.dtype,
                    name=f"features_{idx}",
                )(x, train)
                inp = oup
                idx += 1
                if stage > _LOW_LEVEL_STAGE or (stage == _LOW_LEVEL_STAGE and i == n - 1):
                    features.append(x)
        return tuple(features)
