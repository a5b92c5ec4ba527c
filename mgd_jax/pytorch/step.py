"""The training step of the official PyTorch code (Sup.l, CPS, MGD), for timing beside mgd_jax's
on the same device (`mgd-bench step --compare=torch`). Needs the
`[torch]` extra; nothing else in the package imports this module.

The networks are `torch_nets.build`'s (torchvision / timm layouts, the sizes of the config), the
losses those of docs/method.md §1.2 / §2.4, the optimiser SGD with momentum. Per MGD step: the two
teachers in train mode without gradient on u0, u1, x_l and u_mix (8 forwards), the student on
u0 and u1 without gradient, then on u_mix and x_l with gradient (12 network applications). Inputs
are random, as in `bench.run_bench`. Precisions: "fp32" (PyTorch's defaults: TF32 convolutions on
GPU) and "bf16" (autocast to bfloat16 + channels_last, the fastest eager setting measured).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from mgd_jax import models
from mgd_jax.pytorch.nets import build, torch

F = torch.nn.functional
PRECISIONS = ("fp32", "bf16")
IGNORE = 255


def _network(backbone: str, config: ml_collections.ConfigDict, width: float, depths: str):
    return build(models.canonical(backbone), config.num_classes, width=width,
                 depths=models.parse_depths(depths))


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def _mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return a * (1 - mask) + b * mask


def _pseudo(net, u0, u1, mask) -> torch.Tensor:
    return _mix(net(u0)[2], net(u1)[2], mask).argmax(1)


def _semantic_sensitive(s: torch.Tensor, t: torch.Tensor, replica_batch: int) -> torch.Tensor:
    """L_I: per replica the L1 sum of the pooled logits, averaged over replicas."""
    diff = (s.float().mean((2, 3)) - t.float().mean((2, 3))).abs()
    return diff.reshape(-1, replica_batch, diff.shape[-1]).sum((1, 2)).mean()


def _content_aware(s: torch.Tensor, t: torch.Tensor, grid: int) -> torch.Tensor:
    def similarity(f):
        q = F.adaptive_avg_pool2d(f.float(), grid).flatten(2)  # (N, C, grid^2)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return torch.einsum("nci,ncj->nij", q, q)

    return F.mse_loss(similarity(s), similarity(t))


class Step:
    """The networks, the optimiser and one training step of `config.method`."""

    def __init__(self, config: ml_collections.ConfigDict, device: Any):
        self.config, self.device = config, device
        m = config.model
        nets: dict[str, Any] = {}
        if config.method == "cps":
            for name in ("branch1", "branch2"):
                nets[name] = _network(config.cps.backbone, config, m.width, m.depths)
        else:
            nets["student"] = _network(config.student, config, m.width, m.depths)
        if config.method == "mgd":
            for name in ("teacher_deep", "teacher_wide"):
                t = config[name]
                nets[name] = _network(t.backbone, config, t.width, t.depths)
        self.nets = {k: v.to(device).train() for k, v in nets.items()}
        trained = [p for k, n in self.nets.items() if not k.startswith("teacher")
                   for p in n.parameters()]
        for k, n in self.nets.items():
            if k.startswith("teacher"):
                n.requires_grad_(False)
        self.optimizer = torch.optim.SGD(trained, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)

    def to_channels_last(self) -> None:
        for n in self.nets.values():
            n.to(memory_format=torch.channels_last)

    def loss(self, x_l, labels, u0, u1, mask) -> torch.Tensor:
        method = self.config.method
        if method == "supervised":
            return _ce(self.nets["student"](x_l)[2], labels)
        u_mix = _mix(u0, u1, mask)
        if method == "cps":
            b1, b2 = self.nets["branch1"], self.nets["branch2"]
            with torch.no_grad():
                p1, p2 = _pseudo(b1, u0, u1, mask), _pseudo(b2, u0, u1, mask)
            cps = _ce(b1(u_mix)[2], p2) + _ce(b2(u_mix)[2], p1)
            return _ce(b1(x_l)[2], labels) + _ce(b2(x_l)[2], labels) + self.config.cps.weight * cps
        return self._mgd_loss(x_l, labels, u0, u1, mask, u_mix)

    def _mgd_loss(self, x_l, labels, u0, u1, mask, u_mix) -> torch.Tensor:
        c = self.config
        student, t_deep, t_wide = (self.nets[k] for k in ("student", "teacher_deep",
                                                          "teacher_wide"))
        with torch.no_grad():
            pseudo_mix = [_pseudo(t, u0, u1, mask) for t in (t_wide, t_deep)]
            pseudo_l = [t(x_l)[2].argmax(1) for t in (t_wide, t_deep)]
            deep_mix = t_deep(u_mix)[2]
            wide_mix = t_wide(u_mix)[1]
            student(u0)  # BN running statistics only, as the official code
            student(u1)
        _, s_mix_decoder, s_mix = student(u_mix)
        _, _, s_l = student(x_l)
        loss = _ce(s_l, labels)
        loss = loss + sum(_ce(s_mix, p) for p in pseudo_mix) + sum(_ce(s_l, p) for p in pseudo_l)
        loss = loss + c.loss.lambda_image * _semantic_sensitive(s_mix, deep_mix, c.replica_batch)
        return loss + c.loss.lambda_region * _content_aware(s_mix_decoder, wide_mix,
                                                            c.loss.region_grid)

    def __call__(self, batch: tuple[torch.Tensor, ...], autocast: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss(*batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


def random_batch(config: ml_collections.ConfigDict, batch_size: int, device: Any,
                 channels_last: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_l, labels, u0, u1, mask) on `device`: normalised-looking images, labels with ignored
    pixels, a box CutMix mask."""
    g = torch.Generator().manual_seed(seed)
    size = int(config.crop_size)
    shape = (batch_size, 3, size, size)
    images = [torch.randn(shape, generator=g) for _ in range(3)]
    labels = torch.randint(0, config.num_classes, (batch_size, size, size), generator=g)
    labels[:, :, : size // 16] = IGNORE
    mask = torch.zeros(batch_size, 1, size, size)
    mask[:, :, size // 4: size // 2, size // 3: 3 * size // 4] = 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_l, u0, u1 = (x.to(device).contiguous(memory_format=fmt) for x in images)
    return x_l, labels.to(device), u0, u1, mask.to(device)


def _sync(device: Any) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def run(config: ml_collections.ConfigDict, *, batch_size: int, precision: str = "fp32",
        steps: int = 20, warmup: int = 3, device: str | None = None) -> dict[str, Any]:
    """Times `steps` PyTorch training steps of `config.method` after `warmup` ones; returns
    ms/step (median, min, max), images/s and, on CUDA, the peak memory of the steps."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    bf16 = precision == "bf16"
    step = Step(config, dev)
    if bf16:
        step.to_channels_last()
    batch = random_batch(config, batch_size, dev, channels_last=bf16, seed=config.seed)
    sync = _sync(dev)
    for _ in range(warmup):
        step(batch, bf16)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(batch, bf16)
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    images = batch_size * (1 if config.method == "supervised" else 3)
    return {
        "implementation": "torch",
        "precision": "bf16 autocast + channels_last" if bf16 else "fp32",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ms_per_step": 1e3 * median,
        "ms_min": 1e3 * min(times),
        "ms_max": 1e3 * max(times),
        "images_per_s": images / median,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                              else None),
        "loss": float(loss.detach()),
        "finite": bool(np.isfinite(float(loss.detach()))),
        "steps": steps,
        "warmup": warmup,
    }
