"""Optimizer of the official recipe (docs/method.md §4.1): SGD with momentum, masked weight decay,
per-iteration poly learning rate without warmup.

`make_optimizer` equals `torch.optim.SGD(params, lr, momentum, weight_decay)` with the official
`group_weight` split: weight decay only on conv / linear weights (not on biases, not on BatchNorm),
added to the gradient before the momentum buffer; lr multiplies the buffer; no dampening/Nesterov.
The caller passes the *effective* lr and weight decay (lr_eff, wd_eff of §4.1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> optax.Schedule:
    """lr(step) = base_lr * (1 - step / total_steps) ** power, clamped to 0 for step >= total_steps.

    As the official `PolyLR`, evaluated at the 0-based iteration index *before* each update, so the
    first update uses base_lr and the last (step = total_steps - 1) uses
    base_lr * (1 / total_steps) ** power > 0; the lr never reaches 0 during training. optax passes
    the update count (0 at the first update), which is exactly this index.
    """
    if total_steps <= 0:
        raise ValueError(f"optim.poly_schedule: total_steps must be > 0, got {total_steps}")

    def schedule(step: jax.Array | int) -> jax.Array:
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(total_steps), 0.0, 1.0)
        return base_lr * (1.0 - frac) ** power

    return schedule


def decay_mask(params: Any) -> Any:
    """Pytree of bools: True exactly for conv / dense kernels (leaves named "kernel", ndim >= 2).

    Biases and BatchNorm scale/bias get False, as the official `group_weight` (conv/linear weights
    decay; biases and all norm parameters do not).
    """

    def is_kernel(path: tuple, leaf: Any) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return name == "kernel" and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    weight_decay: float,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """SGD + momentum + masked L2 weight decay, matching `torch.optim.SGD` step for step.

    update = -lr(t) * buf,  buf = momentum * buf + (g + weight_decay * p * mask)  (buf starts at 0,
    so the first buf is the gradient, like PyTorch).

    Args:
      learning_rate: a constant or a schedule of the update count (e.g. `poly_schedule`).
      weight_decay: L2 coefficient on conv/dense kernels (see `decay_mask`).
      momentum: momentum coefficient (0.9).
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=False),
    )
