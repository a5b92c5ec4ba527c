"""ResNet backbones of the official MGD code, dilated to output stride 16.

* `resnet18`: TorchSeg `furnace/base_model/resnet.py` ResNet-18 with a deep stem 32-32-64
  (the student);
* `resnet101`: the same file's ResNet-101 with a deep stem 64-64-128 ("v1c", teacher T_D);
* `wide_resnet50_2`: timm/torchvision Wide-ResNet-50-2 layout with a 7x7 stem (the official
  "wide_resnet34_2", teacher T_W).

Module and parameter names follow the PyTorch state-dict keys through the mechanical rule of
`mgd_jax.pytorch.importer.flax_path` (`layer1.0.downsample.1` -> `layer1_0/downsample_1`). As in the
official `_nostride_dilate`, every stride-2 conv of layer4 becomes stride 1 and block k of layer4
gets dilation = padding = 2, 4, 8, ... on its 3x3 convs, so layer4 runs at output stride 16.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgd_jax.models.layers import BatchNorm, conv, max_pool_3x3_s2

Array = jax.Array


def scale_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to the nearest integer, at least 1 (the `width` option)."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 convs (both dilated in layer4) plus identity or 1x1-conv + BN shortcut."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    bn_group_size: int | None = None
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = lambda name: BatchNorm(group_size=self.bn_group_size, streams=self.bn_streams,
                                         dtype=self.dtype, name=name)
        d = self.dilation
        out = conv(
            self.planes,
            3,
            stride=self.stride,
            padding=d,
            dilation=d,
            dtype=self.dtype,
            name="conv1",
        )(x)
        out = nn.relu(bn("bn1")(out, train))
        out = conv(self.planes, 3, padding=d, dilation=d, dtype=self.dtype, name="conv2")(out)
        out = bn("bn2")(out, train)
        if self.downsample:
            x = conv(self.planes, 1, stride=self.stride, dtype=self.dtype, name="downsample_0")(x)
            x = bn("downsample_1")(x, train)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here, "v1b") -> 1x1 (x4), plus shortcut.

    The inner width is floor(planes * base_width / 64): 64 gives ResNet, 128 Wide-ResNet-x2.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    base_width: int = 64
    bn_group_size: int | None = None
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = lambda name: BatchNorm(group_size=self.bn_group_size, streams=self.bn_streams,
                                         dtype=self.dtype, name=name)
        width = self.planes * self.base_width // 64
        d = self.dilation
        out = conv(width, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn("bn1")(out, train))
        out = conv(
            width, 3, stride=self.stride, padding=d, dilation=d, dtype=self.dtype, name="conv2"
        )(out)
        out = nn.relu(bn("bn2")(out, train))
        out = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
        out = bn("bn3")(out, train)
        if self.downsample:
            x = conv(self.planes * 4, 1, stride=self.stride, dtype=self.dtype, name="downsample_0")(
                x
            )
            x = bn("downsample_1")(x, train)
        return nn.relu(out + x)


class ResNet(nn.Module):
    """A ResNet returning the four stage outputs (layer1..layer4), shallow to deep.

    `deep_stem=True`: conv1.0 (3->s, 3x3 s2) conv1.1 BN, ReLU, conv1.3 (s->s) conv1.4 BN, ReLU,
    conv1.6 (s->2s), then bn1; otherwise a 7x7 s2 p3 conv1 (3->64) then bn1. Then ReLU and a
    3x3 s2 p1 max pool. Strides 4, 8, 16, 16 (layer4 dilated, see the module docstring).
    """

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    deep_stem: bool
    stem_width: int = 64
    base_width: int = 64
    width: float = 1.0
    bn_group_size: int | None = None
    bn_streams: int = 1  # BatchNorm.streams
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"ResNet: depths must be 4 positive block counts, got {self.layers}")
        bn = lambda name: BatchNorm(group_size=self.bn_group_size, streams=self.bn_streams,
                                         dtype=self.dtype, name=name)
        ch = lambda c: scale_channels(c, self.width)
        dt = self.dtype
        if self.deep_stem:
            s = ch(self.stem_width)
            x = conv(s, 3, stride=2, padding=1, dtype=dt, name="conv1_0")(x)
            x = nn.relu(bn("conv1_1")(x, train))
            x = conv(s, 3, padding=1, dtype=dt, name="conv1_3")(x)
            x = nn.relu(bn("conv1_4")(x, train))
            x = conv(2 * s, 3, padding=1, dtype=dt, name="conv1_6")(x)
        else:
            x = conv(ch(64), 7, stride=2, padding=3, dtype=dt, name="conv1")(x)
        x = nn.relu(bn("bn1")(x, train))
        x = max_pool_3x3_s2(x)

        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        extra = {"base_width": self.base_width} if self.block == "bottleneck" else {}
        inplanes = x.shape[-1]
        features = []
        for stage, (planes, n_blocks) in enumerate(
            zip((64, 128, 256, 512), self.layers, strict=True)
        ):
            planes = ch(planes)
            for j in range(n_blocks):
                if stage == 3:
                    # _nostride_dilate: no stride anywhere in layer4, block j dilated 2 * 2**j.
                    stride, dilation = 1, 2 ** (j + 1)
                else:
                    stride, dilation = (2 if (stage > 0 and j == 0) else 1), 1
                # The downsample is decided with the *original* stride (2 for layer4 block 0).
                orig_stride = 2 if (stage > 0 and j == 0) else 1
                out_ch = planes * block_cls.expansion
                downsample = j == 0 and (orig_stride != 1 or inplanes != out_ch)
                x = block_cls(
                    planes,
                    stride=stride,
                    dilation=dilation,
                    downsample=downsample,
                    bn_group_size=self.bn_group_size,
                    bn_streams=self.bn_streams,
                    dtype=dt,
                    name=f"layer{stage + 1}_{j}",
                    **extra,
                )(x, train)
                inplanes = out_ch
            features.append(x)
        return tuple(features)


# name -> constructor kwargs (exact official architectures at width 1).
RESNET_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2), deep_stem=True, stem_width=32),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3), deep_stem=True, stem_width=64),
    "wide_resnet50_2": dict(
        block="bottleneck", layers=(3, 4, 6, 3), deep_stem=False, base_width=128
    ),
}
