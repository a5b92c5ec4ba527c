"""The official DeepLabv3+ segmentation networks in PyTorch (torchvision / timm backbones, dilated
as the official code does), written from the spec (docs/method.md §2.3 / §3): the parity tests'
reference and the PyTorch side of the step comparison (`torch_step`). Needs the `[torch]` extra.

`SegNet(backbone, kind, ...)` holds the backbone under `backbone`, the head under `head` and the
1x1 classifier under `classifier`, so its state dict has the key layout of the official
`Single*Network` (backbone ImageNet leftovers such as `fc` / `classifier.1` / `features.18`
included, as in the official checkpoints). `forward` returns (features, decoder, logits) like the
JAX `SegOutput`. `build(backbone, num_classes, width=..., depths=...)` makes the network
`mgd_jax.models.build` makes.

torchvision 0.28 wheels built against a CUDA torch import beside a CPU torch only after their two
compiled-operator schemas are defined; `_torchvision_shim` does that where (and only where) the
compiled operators do not load. This module is the one place that imports torch, torchvision and
timm for the package and the tests.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch


def _torchvision_shim() -> None:
    if hasattr(torch.ops.torchvision, "nms"):  # loaded, or defined by an earlier import
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    folder = os.path.dirname(spec.origin)
    libraries = [f for f in os.listdir(folder) if f.startswith("_C.") or f == "_C.so"]
    try:
        for name in libraries:
            torch.ops.load_library(os.path.join(folder, name))
        return
    except OSError:
        pass
    # Models need none of these operators; only their schemas must exist for the import.
    global _SHIM
    _SHIM = torch.library.Library("torchvision", "DEF")
    _SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_SHIM = None
_torchvision_shim()

import timm  # noqa: E402
import torchvision  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def nostride_dilate(module: nn.Module, dilate: int) -> None:
    """The official `_nostride_dilate`, applied to every conv inside `module`: stride 2 -> 1, and
    every 3x3 conv gets dilation = padding = `dilate`."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilate, dilate)
                m.padding = (dilate, dilate)


def dilate_resnet(backbone: nn.Module) -> nn.Module:
    """layer4 block k gets dilate 2, 4, 8, ... (official Single{Small,Large,Wide}Network)."""
    for k, block in enumerate(backbone.layer4.children()):
        nostride_dilate(block, 2 ** (k + 1))
    return backbone


def dilate_mobilenet(backbone: nn.Module) -> nn.Module:
    """features[15:18] get dilate 2, 4, 8; the stride-2 features[14] is kept (output stride 32)."""
    for k, block in enumerate(backbone.features[15:18]):
        nostride_dilate(block, 2 ** (k + 1))
    return backbone


def resnet_features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """layer1..layer4 outputs of a torchvision or timm ResNet."""
    x = backbone.conv1(x)
    x = backbone.bn1(x)
    x = backbone.act1(x) if hasattr(backbone, "act1") else backbone.relu(x)
    x = backbone.maxpool(x)
    out = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(backbone, name)(x)
        out.append(x)
    return out


def mobilenet_features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """features[3]..features[17] outputs (official MobileNetV2.forward; features[18] unused)."""
    out = []
    for i, layer in enumerate(backbone.features[:18]):
        x = layer(x)
        if i > 2:
            out.append(x)
    return out


class ASPP(nn.Module):
    """Official ASPP: map convs (1x1 + 3x3 at 6/12/18) -> cat -> map_bn -> LeakyReLU -> red_conv,
    plus the image-pool branch (mean -> conv -> BN -> LeakyReLU -> pool_red_conv) added before
    red_bn -> LeakyReLU."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, rates=(6, 12, 18)):
        super().__init__()
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_ch, hidden, 1, bias=False)]
            + [nn.Conv2d(in_ch, hidden, 3, padding=r, dilation=r, bias=False) for r in rates]
        )
        self.map_bn = nn.BatchNorm2d(hidden * 4)
        self.global_pooling_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.global_pooling_bn = nn.BatchNorm2d(hidden)
        self.red_conv = nn.Conv2d(hidden * 4, out_ch, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.01)
        out = act(self.map_bn(torch.cat([m(x) for m in self.map_convs], 1)))
        out = self.red_conv(out)
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = act(self.global_pooling_bn(self.global_pooling_conv(pool)))
        pool = self.pool_red_conv(pool)
        return act(self.red_bn(out + pool))


class Head(nn.Module):
    """Official Head / HeadSmall: ASPP(deep) upsampled (align corners) to the low-level size,
    cat [aspp, reduce(low)], then last_conv (two 3x3 conv + BN + ReLU)."""

    def __init__(self, in_ch: int, low_ch: int, reduce_ch: int, hidden: int = 256):
        super().__init__()
        self.aspp = ASPP(in_ch, hidden, hidden)
        self.reduce = nn.Sequential(
            nn.Conv2d(low_ch, reduce_ch, 1, bias=False), nn.BatchNorm2d(reduce_ch), nn.ReLU()
        )
        self.last_conv = nn.Sequential(
            nn.Conv2d(hidden + reduce_ch, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        f = self.aspp(features[-1])
        low = features[0]
        f = F.interpolate(f, size=low.shape[2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([f, self.reduce(low)], 1))


class SegNet(nn.Module):
    """backbone -> Head -> classifier (1x1, bias) -> align-corners upsampling to the input."""

    def __init__(
        self, backbone: nn.Module, kind: str, num_classes: int, *, in_ch: int, low_ch: int,
        reduce_ch: int, hidden: int = 256,
    ):
        super().__init__()
        self.kind = kind  # "resnet" | "mobilenet" | "features" (the backbone returns them)
        self.backbone = backbone
        self.head = Head(in_ch, low_ch, reduce_ch, hidden)
        self.classifier = nn.Conv2d(hidden, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor):
        if self.kind == "features":
            features = self.backbone(x)
        else:
            fn = resnet_features if self.kind == "resnet" else mobilenet_features
            features = fn(self.backbone, x)
        decoder = self.head(features)
        logits = self.classifier(decoder)
        logits = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)
        return features, decoder, logits


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics (defaults would hide mistakes in their
    mapping) and random conv biases; conv weights keep their random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))  # models.resnet.scale_channels


RESNETS = {  # (block, depths, deep stem width or None for the 7x7 stem, base width)
    "resnet18": ("BasicBlock", (2, 2, 2, 2), 32, 64),
    "resnet101": ("Bottleneck", (3, 4, 23, 3), 64, 64),
    "wide_resnet50_2": ("Bottleneck", (3, 4, 6, 3), None, 128),
}
MOBILENET_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


def resnet(backbone: str, *, width: float = 1.0, depths: Sequence[int] | None = None):
    """A timm ResNet of the official layout (deep stems 32-32-64 / 64-64-128; base width 128 is
    the Wide-ResNet-50-2 layout), not yet dilated."""
    block, layers, stem, base_width = RESNETS[backbone]
    net = timm.models.resnet.ResNet(
        block=getattr(timm.models.resnet, block),
        layers=list(depths or layers),
        stem_type="" if stem is None else "deep",
        stem_width=_scale(stem or 64, width),
        channels=tuple(_scale(c, width) for c in (64, 128, 256, 512)),
        base_width=base_width,
    )
    if stem is None and width != 1.0:
        # timm's 7x7 stem is 64 wide whatever stem_width; mgd_jax scales it with the width.
        ch = _scale(64, width)
        first = net.layer1[0]
        net.conv1 = nn.Conv2d(3, ch, 7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(ch)
        first.conv1 = nn.Conv2d(ch, first.conv1.out_channels, 1, bias=False)
        if first.downsample is not None:
            down = first.downsample[0]
            first.downsample[0] = nn.Conv2d(ch, down.out_channels, 1, bias=False)
    return net


class MobileNetFeatures(nn.Module):
    """torchvision MobileNetV2 (`width_mult`, blocks per stage) dilated like the official code
    (output stride 32): the features of the last stride-4 block and of the last block."""

    def __init__(self, width: float = 1.0, depths: Sequence[int] | None = None):
        super().__init__()
        setting = [[t, c, n, s] for (t, c, n, s), n in zip(
            MOBILENET_SETTING, depths or [row[2] for row in MOBILENET_SETTING], strict=True)]
        self.net = torchvision.models.mobilenet_v2(width_mult=width,
                                                   inverted_residual_setting=setting)
        counts = [row[2] for row in setting]
        self.low = counts[0] + counts[1]  # features index of the last c24 block
        self.last = sum(counts)
        first_dilated = 1 + sum(counts[:5]) + 1  # the c160 stage after its first block, and on
        for k, block in enumerate(self.net.features[first_dilated: self.last + 1]):
            nostride_dilate(block, 2 ** (k + 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.net.features[: self.last + 1]):
            x = layer(x)
            if i in (self.low, self.last):
                out.append(x)
        return out


class ResNetFeatures(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = dilate_resnet(backbone)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return resnet_features(self.net, x)


def build(backbone: str, num_classes: int, *, width: float = 1.0,
          depths: Sequence[int] | None = None) -> SegNet:
    """The network `mgd_jax.models.build(backbone, num_classes, width=, depths=)` builds, in
    PyTorch (for timing: parameter names are not the official ones)."""
    if backbone == "mobilenet_v2":
        features = MobileNetFeatures(width, depths)
        reduce = 24
    else:
        features = ResNetFeatures(resnet(backbone, width=width, depths=depths))
        reduce = 48
    with torch.no_grad():
        found = features.eval()(torch.zeros(1, 3, 64, 64))
    low, deep = found[0], found[-1]
    return SegNet(features.train(), "features", num_classes, in_ch=deep.shape[1],
                  low_ch=low.shape[1], reduce_ch=_scale(reduce, width),
                  hidden=_scale(256, width))
