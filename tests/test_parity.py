"""Numerical parity of every backbone family + DeepLabv3+ against independent PyTorch references.

The references are torchvision / timm backbones (dilated in torch like the official
`_nostride_dilate`) with the spec-written head of `torch_heads.py`; random weights, random BN
affine parameters and running statistics. Their state dicts go through `importer.from_torch`, so
the importer is proven by the same numbers. Checked:

* eval-mode BN, float32: backbone features, decoder feature, logits, max|d| / max|ref| <= 1e-4;
* train-mode BN (batch 2, images with different statistics), float64 on both sides: <= 1e-6;
* the running statistics after that train-mode forward vs torch's running_mean / running_var.

Reduced depths (and one reduced width) keep this fast; every family keeps its real block types,
stem, layer4 dilations (2, 4, 8) and head. ResNet-18 and MobileNetV2 run at full size.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mgd_jax import models
from mgd_jax.pytorch import importer

import torch_heads as th
from torch_reference import timm, torch, torchvision

NUM_CLASSES = 5
EVAL_TOL = 1e-4
TRAIN_TOL = 1e-6


def _timm_resnet(block: str, layers, *, stem_width: int, deep: bool, width: float = 1.0,
                 base_width: int = 64):
    ch = lambda c: max(1, round(c * width))
    return timm.models.resnet.ResNet(
        block=getattr(timm.models.resnet, block),
        layers=list(layers),
        stem_type="deep" if deep else "",
        stem_width=ch(stem_width),
        channels=tuple(ch(c) for c in (64, 128, 256, 512)),
        base_width=base_width,
    )


@dataclasses.dataclass(frozen=True)
class Case:
    backbone: str
    options: dict[str, Any]
    make_backbone: Callable[[], Any]  # torch backbone, not yet dilated
    kind: str  # "resnet" | "mobilenet"
    in_ch: int
    low_ch: int
    reduce_ch: int
    hidden: int = 256
    size: tuple[int, int] = (64, 96)  # non-square: catches H/W mix-ups
    train: bool = True


CASES = {
    # The student at full size: timm deep stem 32-32-64 == furnace ResNet-18 deep stem.
    "resnet18": Case(
        "resnet18", {},
        lambda: _timm_resnet("BasicBlock", (2, 2, 2, 2), stem_width=32, deep=True),
        "resnet", in_ch=512, low_ch=64, reduce_ch=48,
    ),
    # Large input so the ASPP's 6/12/18-dilated taps all see real pixels (19x20 at stride 16);
    # quarter width keeps it cheap.
    "resnet18_aspp": Case(
        "resnet18", {"width": 0.25},
        lambda: _timm_resnet("BasicBlock", (2, 2, 2, 2), stem_width=32, deep=True, width=0.25),
        "resnet", in_ch=128, low_ch=16, reduce_ch=12, hidden=64, size=(304, 320), train=False,
    ),
    # T_D: v1c deep stem 64-64-128 Bottleneck ResNet; reduced depth and half width.
    "resnet101": Case(
        "resnet101", {"depths": (1, 1, 2, 3), "width": 0.5},
        lambda: _timm_resnet("Bottleneck", (1, 1, 2, 3), stem_width=64, deep=True, width=0.5),
        "resnet", in_ch=1024, low_ch=128, reduce_ch=24, hidden=128,
    ),
    # T_W: torchvision Wide-ResNet-50-2 layout (7x7 stem, base width 128) at full width.
    "wide_resnet50_2": Case(
        "wide_resnet50_2", {"depths": (1, 1, 2, 3)},
        lambda: torchvision.models.resnet.ResNet(
            torchvision.models.resnet.Bottleneck, [1, 1, 2, 3], width_per_group=128
        ),
        "resnet", in_ch=2048, low_ch=256, reduce_ch=48,
    ),
    # The MobileNetV2 student: torchvision mobilenet_v2 at full size, output stride 32.
    "mobilenet_v2": Case(
        "mobilenet_v2", {},
        lambda: torchvision.models.mobilenet_v2(),
        "mobilenet", in_ch=320, low_ch=24, reduce_ch=24,
    ),
}


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _images(size: tuple[int, int]) -> np.ndarray:
    """Two images with different statistics: batch-statistics bugs (wrong axes) show up."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size, 3)).astype(np.float32)
    x[1] = x[1] * 2.5 + 0.7
    return x


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    c = CASES[request.param]
    torch.manual_seed(0)
    backbone = c.make_backbone()
    if c.kind == "resnet":
        th.dilate_resnet(backbone)
    else:
        th.dilate_mobilenet(backbone)
    net = th.SegNet(
        backbone, c.kind, NUM_CLASSES, in_ch=c.in_ch, low_ch=c.low_ch, reduce_ch=c.reduce_ch,
        hidden=c.hidden,
    )
    th.randomize_(net, seed=1).eval()
    variables = importer.from_torch(net.state_dict(), c.backbone, NUM_CLASSES, **c.options)
    return c, net, variables


def _compare(out, ref, tol: float, what: str) -> None:
    features, decoder, logits = ref
    assert len(out.features) == len(features), what
    pairs = [(f"backbone feature {i}", a, b) for i, (a, b) in enumerate(zip(out.features, features,
                                                                         strict=True))]
    pairs += [("decoder", out.decoder, decoder), ("logits", out.logits, logits)]
    for name, a, b in pairs:
        err = _rel(a, _nhwc(b))
        assert err <= tol, f"{what}: {name}: max|d|/max|ref| = {err:.3g} > {tol}"


def test_eval_float32(case):
    c, net, variables = case
    x = _images(c.size)
    model = models.build(c.backbone, NUM_CLASSES, **c.options)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert np.abs(_nhwc(ref[2])).max() > 1e-3  # not a degenerate all-zero comparison
    _compare(out, ref, EVAL_TOL, f"{c.backbone} eval")


@pytest.mark.parametrize("case", [k for k, c in CASES.items() if c.train], indirect=True)
def test_train_float64_and_running_stats(case):
    c, net, variables = case
    x = _images(c.size)
    # float32 weights are exact in float64, so both sides start from identical values.
    ref_net = copy.deepcopy(net).double().train()
    with torch.no_grad():
        ref = ref_net(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
    with jax.enable_x64(True):
        model = models.build(c.backbone, NUM_CLASSES, dtype=jnp.float64, **c.options)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
        out, updated = apply(v64, jnp.asarray(x, jnp.float64))
        assert out.features[-1].dtype == jnp.float64
        _compare(out, ref, TRAIN_TOL, f"{c.backbone} train float64")
        new_stats = traverse_util.flatten_dict(jax.device_get(updated["batch_stats"]))

    # torch's updated running_mean / running_var, through the importer.
    want = traverse_util.flatten_dict(
        importer.from_torch(ref_net.state_dict(), c.backbone, NUM_CLASSES, **c.options)[
            "batch_stats"
        ]
    )
    old = traverse_util.flatten_dict(variables["batch_stats"])
    assert new_stats.keys() == want.keys()
    worst = max(_rel(new_stats[k], want[k]) for k in want)
    assert worst <= TRAIN_TOL, worst
    # The update did happen (guards against comparing the initial statistics twice).
    assert max(np.abs(np.asarray(new_stats[k]) - old[k]).max() for k in want) > 1e-3
