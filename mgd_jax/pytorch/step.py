"""A PyTorch port of the official training step (Sup.l, CPS, MGD; JayQine/MGD-SSSS `train.py`),
for timing beside mgd_jax's on the same device (`mgd-bench step --compare=torch`) and as a second
implementation of the step: tests/test_torch_step.py loads the same weights and batch into both
and checks that the loss, every metric, the gradients and the new BN statistics agree. Needs the
`[torch]` extra; nothing else in the package imports this module.

The networks are `nets.build`'s (torchvision / timm layouts, the sizes of the config), the losses
those of docs/method.md §1.2 / §2.4 (OHEM as the official `ProbOhemCrossEntropy2d`, per replica;
the plain supervised CE per replica or over the batch as `loss.ce_reduction` says),
the optimiser SGD with momentum and the official `group_weight` split (weight decay on conv /
linear weights only). Per MGD step: the two teachers in train mode without gradient on u0, u1, x_l
and u_mix (8 forwards), the student on u0 and u1 without gradient, then on u_mix and x_l with
gradient (12 network applications). The config's ablation switches (`loss.*`, `teacher_bn`,
`student_nograd_bn_updates`, `cps.weight_rampup`) are honoured as mgd_jax honours them. Precisions:
"fp32" (PyTorch's defaults: TF32 convolutions on GPU) and "bf16" (autocast to bfloat16 +
channels_last, the fastest eager setting measured); on CUDA `cudnn.benchmark` is on, as in the
official train.py. Losses are computed in float32 (float64 logits are rounded to float32 first,
as mgd_jax's losses do).

Departures from the official code (none changes what a step computes on one device with
batch_size == replica_batch, except where said):
- one process, no SyncBN / DDP / all-reduce: BatchNorm statistics are over the whole batch on the
  device; with batch_size > replica_batch the losses are still reduced per replica (L_I, OHEM),
  but the MobileNetV2 backbone BN, per GPU in the official code (ghost groups of replica_batch in
  mgd_jax), is over the whole batch here;
- the logged-only terms that carry no gradient (the teachers' CE against the ground truth and the
  reverse consistency terms against the student's argmax) are left out, as mgd_jax leaves them out;
- the teachers' forwards all run before the student's (the official code interleaves them; the
  values are the same); `optimizer_r.step()` (a no-op, the teachers have no gradients) is left out;
- a constant learning rate (`config.lr`, the poly schedule's first value);
- random inputs and one fixed box CutMix mask (`random_batch`), no data loading;
- the content-aware loss divides by max(norm, 1e-8) (the official divides by the bare norm: NaN
  on an all-zero region), as mgd_jax does;
- `model.output_stride` other than the official one (0) is not supported (ValueError).
"""

from __future__ import annotations

import math
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
LABEL = "PyTorch port of the official step"  # how tables and JSON rows name it


def _network(backbone: str, config: ml_collections.ConfigDict, width: float, depths: str):
    return build(models.canonical(backbone), config.num_classes, width=width,
                 depths=models.parse_depths(depths))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float()  # bf16 under autocast, float64 in tests: the losses compute in float32


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_f32(logits), labels, ignore_index=IGNORE)


def _ohem_ce(logits: torch.Tensor, labels: torch.Tensor, thresh: float,
             min_kept: int) -> torch.Tensor:
    """The official `ProbOhemCrossEntropy2d` on one replica's batch."""
    logits = _f32(logits)
    b, c, h, w = logits.shape
    target = labels.reshape(-1)
    valid = target.ne(IGNORE)
    target = target * valid.long()
    num_valid = int(valid.sum())
    if min_kept <= num_valid and num_valid > 0 and min_kept > 0:
        with torch.no_grad():
            prob = F.softmax(logits, dim=1).transpose(0, 1).reshape(c, -1)
            prob = prob.masked_fill(~valid, 1)
            p = prob[target, torch.arange(len(target), device=target.device)]
            threshold = thresh
            kth = p.sort().values[min(len(p), min_kept) - 1]
            if kth > thresh:
                threshold = kth
            valid = valid & p.le(threshold)
    target = target.masked_fill(~valid, IGNORE).view(b, h, w)
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def _per_replica(fn: Callable[..., torch.Tensor], replica_batch: int,
                 *tensors: torch.Tensor) -> torch.Tensor:
    """`fn` on each replica's consecutive examples, averaged (the official per-GPU loss,
    all-reduced / world size)."""
    groups = [fn(*parts) for parts in zip(*(t.split(replica_batch) for t in tensors),
                                          strict=True)]
    return torch.stack(groups).mean()


def _mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return a * (1 - mask) + b * mask


def _pseudo(net, u0, u1, mask) -> torch.Tensor:
    return _mix(net(u0)[2], net(u1)[2], mask).argmax(1)


def _semantic_sensitive(s: torch.Tensor, t: torch.Tensor, replica_batch: int) -> torch.Tensor:
    """L_I: per replica the L1 sum of the pooled logits, averaged over replicas."""
    diff = (_f32(s).mean((2, 3)) - _f32(t).mean((2, 3))).abs()
    return diff.reshape(-1, replica_batch, diff.shape[-1]).sum((1, 2)).mean()


def _content_aware(s: torch.Tensor, t: torch.Tensor, grid: int) -> torch.Tensor:
    def similarity(f):
        q = F.adaptive_avg_pool2d(_f32(f), grid).flatten(2)  # (N, C, grid^2)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return torch.einsum("nci,ncj->nij", q, q)

    return F.mse_loss(similarity(s), similarity(t))


def cps_rampup(step: int, steps: int) -> float:
    """mgd_jax's `cps.rampup`: exp(-5 (1 - step / steps)^2) before `steps`, then 1."""
    if steps <= 0:
        return 1.0
    return math.exp(-5.0 * (1.0 - min(step / steps, 1.0)) ** 2)


class Step:
    """The networks, the optimiser and one training step of `config.method`."""

    def __init__(self, config: ml_collections.ConfigDict, device: Any):
        self.config, self.device = config, device
        m = config.model
        if m.get("output_stride", 0):
            raise ValueError(f"pytorch.step: model.output_stride={m.output_stride} is not "
                             "supported (the official output stride only: 0)")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the official train.py
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
        if config.method == "mgd" and config.teacher_bn == "running":
            for name in ("teacher_deep", "teacher_wide"):
                self.nets[name].eval()
        trained = [p for k, n in self.nets.items() if not k.startswith("teacher")
                   for p in n.parameters()]
        for k, n in self.nets.items():
            if k.startswith("teacher"):
                n.requires_grad_(False)
        # The official group_weight: conv / linear weights decay; biases and BN parameters not.
        groups = [{"params": [p for p in trained if p.ndim > 1]},
                  {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
        self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.iteration = 0  # the 0-based step, for cps.weight_rampup

    def to_channels_last(self) -> None:
        for n in self.nets.values():
            n.to(memory_format=torch.channels_last)

    def _supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.config.loss
        if not loss.ohem:
            if loss.get("ce_reduction", "global") == "per_replica":
                return _per_replica(_ce, self.config.replica_batch, logits, labels)
            return _ce(logits, labels)
        return _per_replica(
            lambda z, y: _ohem_ce(z, y, loss.ohem_thresh, loss.ohem_min_kept),
            self.config.replica_batch, logits, labels)

    def losses(self, x_l, labels, u0, u1, mask) -> dict[str, torch.Tensor]:
        """The loss ("loss") and the metrics of mgd_jax's step for the same method, by the same
        names."""
        method = self.config.method
        if method == "supervised":
            loss = self._supervised(self.nets["student"](x_l)[2], labels)
            return {"loss": loss, "loss_sup": loss}
        u_mix = _mix(u0, u1, mask)
        if method == "cps":
            return self._cps_losses(x_l, labels, u0, u1, mask, u_mix)
        return self._mgd_losses(x_l, labels, u0, u1, mask, u_mix)

    def loss(self, x_l, labels, u0, u1, mask) -> torch.Tensor:
        return self.losses(x_l, labels, u0, u1, mask)["loss"]

    def _cps_losses(self, x_l, labels, u0, u1, mask, u_mix) -> dict[str, torch.Tensor]:
        b1, b2 = self.nets["branch1"], self.nets["branch2"]
        with torch.no_grad():
            p1, p2 = _pseudo(b1, u0, u1, mask), _pseudo(b2, u0, u1, mask)
        loss_cps = _ce(b1(u_mix)[2], p2) + _ce(b2(u_mix)[2], p1)
        sup1 = self._supervised(b1(x_l)[2], labels)
        sup2 = self._supervised(b2(x_l)[2], labels)
        weight = self.config.cps.weight * cps_rampup(self.iteration, self.config.cps.weight_rampup)
        return {"loss": sup1 + sup2 + weight * loss_cps,
                "cps_weight": torch.tensor(weight, dtype=torch.float32),
                "loss_sup_branch1": sup1, "loss_sup_branch2": sup2, "loss_cps": loss_cps}

    def _mgd_losses(self, x_l, labels, u0, u1, mask, u_mix) -> dict[str, torch.Tensor]:
        c = self.config
        switch = c.loss
        student, t_deep, t_wide = (self.nets[k] for k in ("student", "teacher_deep",
                                                          "teacher_wide"))
        # L_P's teachers (loss.pixel_teachers: both | deep | wide), in the official order
        chosen = switch.get("pixel_teachers", "both")
        teachers = tuple(t for name, t in (("wide", t_wide), ("deep", t_deep))
                         if chosen in ("both", name))
        with torch.no_grad():
            pseudo_mix = ([_pseudo(t, u0, u1, mask) for t in teachers]
                          if switch.consistency_unlabeled else [])
            pseudo_l = ([t(x_l)[2].argmax(1) for t in teachers]
                        if switch.consistency_labeled else [])
            deep_mix = t_deep(u_mix)[2] if switch.image else None
            wide_mix = t_wide(u_mix)[1] if switch.region else None
            if c.student_nograd_bn_updates:
                student(u0)  # BN running statistics only, as the official code
                student(u1)
        _, s_mix_decoder, s_mix = student(u_mix)
        _, _, s_l = student(x_l)
        zero = torch.zeros((), device=s_l.device)
        loss_sup = self._supervised(s_l, labels) if switch.supervised else zero
        unlabeled = sum((_ce(s_mix, p) for p in pseudo_mix), zero)
        labeled = sum((_ce(s_l, p) for p in pseudo_l), zero)
        image = (switch.lambda_image * _semantic_sensitive(s_mix, deep_mix, c.replica_batch)
                 if switch.image else zero)
        region = (switch.lambda_region * _content_aware(s_mix_decoder, wide_mix,
                                                        switch.region_grid)
                  if switch.region else zero)
        return {"loss": loss_sup + unlabeled + labeled + image + region, "loss_sup": loss_sup,
                "loss_consistency_unlabeled": unlabeled, "loss_consistency_labeled": labeled,
                "loss_image": image, "loss_region": region}

    def __call__(self, batch: tuple[torch.Tensor, ...], autocast: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss(*batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
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
        "label": LABEL,
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
