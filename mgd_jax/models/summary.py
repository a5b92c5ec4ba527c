"""Model summary (`mgd-bench models [--size=512] [--num_classes=21]`).

For each backbone's DeepLabv3+ network it prints the parameter count (from `jax.eval_shape`, no
compile), analytic conv MACs of the whole network (docs/method.md §3.3), the backbone's FLOPs
counted like `thop` (conv MACs + 2 x BN output elements, docs/method.md §5.3) and XLA's FLOP
estimate of the lowered (uncompiled) forward pass. XLA skips taps that fall in the zero padding of
dilated convolutions, so its number is below 2 x MACs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgd_jax import models
from mgd_jax.models.layers import BatchNorm

# The official parameter counts at 21 classes (docs/method.md §2-3; exact from the PyTorch models).
OFFICIAL_PARAMS_21 = {
    "resnet18": 16_627_413,
    "mobilenet_v2": 5_760_133,
    "resnet101": 59_468_085,
    "wide_resnet50_2": 83_678_389,
}


def analytic_costs(model: nn.Module, variables: Any, images: jax.ShapeDtypeStruct) -> dict:
    """Conv MACs (whole net, backbone) and BN output elements (backbone), via shape tracing."""
    costs = {"macs": 0, "backbone_macs": 0, "backbone_bn_elems": 0}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        mod = context.module
        in_backbone = mod.path[:1] == ("backbone",)
        if isinstance(mod, nn.Conv):
            cin = args[0].shape[-1] // mod.feature_group_count
            macs = math.prod(out.shape) * cin * math.prod(mod.kernel_size)
            costs["macs"] += macs
            costs["backbone_macs"] += macs if in_backbone else 0
        elif isinstance(mod, BatchNorm) and in_backbone:
            costs["backbone_bn_elems"] += math.prod(out.shape)
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    return costs


def summary(size: int = 512, num_classes: int = 21) -> list[dict]:
    """One row per backbone: params, GMACs, backbone thop-GFLOPs, XLA GFLOPs (batch 1)."""
    rows = []
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    for name in models.BACKBONES:
        model = models.build(name, num_classes)
        variables = jax.eval_shape(
            lambda x, m=model: m.init(jax.random.key(0), x, train=False), images
        )
        costs = analytic_costs(model, variables, images)
        lowered = jax.jit(lambda v, x, m=model: m.apply(v, x).logits).lower(variables, images)
        xla = lowered.cost_analysis() or {}
        rows.append(
            {
                "backbone": name,
                "params": models.count_params(variables["params"]),
                "gmacs": costs["macs"] / 1e9,
                "backbone_gflops_thop": (costs["backbone_macs"] + 2 * costs["backbone_bn_elems"])
                / 1e9,
                "xla_gflops": xla.get("flops", float("nan")) / 1e9,
            }
        )
    return rows


def print_summary(size: int = 512, num_classes: int = 21) -> list[dict]:
    """Prints the table of `summary` with the official parameter counts and FLOP ratios."""
    rows = summary(size, num_classes)
    print(
        f"DeepLabv3+ at {size}x{size}, {num_classes} classes, batch 1 "
        "(backbone FLOPs counted like thop: conv MACs + 2 x BN elements)"
    )
    header = (
        f"{'backbone':<16} {'params':>12} {'official':>9} {'GMACs':>8} "
        f"{'backbone GFLOPs':>16} {'XLA GFLOPs':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        official = OFFICIAL_PARAMS_21.get(r["backbone"]) if num_classes == 21 else None
        match = "-" if official is None else ("ok" if official == r["params"] else "MISMATCH")
        print(
            f"{r['backbone']:<16} {r['params']:>12,} {match:>9} {r['gmacs']:>8.2f} "
            f"{r['backbone_gflops_thop']:>16.3f} {r['xla_gflops']:>11.2f}"
        )
    by = {r["backbone"]: r["backbone_gflops_thop"] for r in rows}
    print(
        "backbone FLOP ratios (paper abstract: 3.4-5.3x vs R18, 38.7-59.6x vs MBv2): "
        f"R101/R18 {by['resnet101'] / by['resnet18']:.2f}, "
        f"WRN/R18 {by['wide_resnet50_2'] / by['resnet18']:.2f}, "
        f"R101/MBv2 {by['resnet101'] / by['mobilenet_v2']:.2f}, "
        f"WRN/MBv2 {by['wide_resnet50_2'] / by['mobilenet_v2']:.2f}"
    )
    return rows
