"""Loss functions of MGD on plain arrays (NHWC logits/features, NHW integer labels).

Every function computes in float32 whatever the input dtype (bf16 activations included), returns a
scalar and is jittable with static shapes. Reductions follow the official code exactly
(docs/method.md §1.2, §4.6):

- `cross_entropy`: `nn.CrossEntropyLoss(ignore_index=255)`, mean over non-ignored pixels.
- `ohem_cross_entropy`: `ProbOhemCrossEntropy2d` (Cityscapes supervised loss).
- `semantic_sensitive` (L_I): L1 **sum** over (batch, classes) of globally average-pooled logits.
- `content_aware` (L_R): MSE **mean** between 7x7-pooled cosine self-similarity matrices.

The official code computes each loss per GPU on its per-GPU batch and then averages over GPUs; use
`per_replica` to reproduce that on a global batch. Loss weights (lambda_1, lambda_2) are applied by
the caller, as is `stop_gradient` on teacher outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mgd_jax.data.datasets import IGNORE_INDEX
from mgd_jax.models.layers import adaptive_avg_pool2d, upsampled_mean

# Floor of the channel norm in `content_aware`; the official has none (NaN on all-zero regions).
COSINE_EPS = 1e-8


def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _nll(logp: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """Per-pixel negative log-likelihood and the validity mask (label != ignore_index)."""
    valid = labels != ignore_index
    # Ignored pixels gather class 0 (any in-range index); their loss is masked out below.
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def _pixel_nll(
    logits: jax.Array, labels: jax.Array, ignore_index: int
) -> tuple[jax.Array, jax.Array]:
    """Per-pixel negative log-likelihood (float32) and the validity mask (label != ignore_index)."""
    return _nll(_log_softmax(logits), labels, ignore_index)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over `mask`; 0 (with a zero, finite gradient) when the mask is empty."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask).astype(jnp.float32)
    return total / jnp.maximum(count, 1.0)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Softmax cross-entropy averaged over the pixels whose label is not `ignore_index`.

    Args:
      logits: (N, H, W, C) float (any float dtype; the math is float32).
      labels: (N, H, W) integer class ids in [0, C), or `ignore_index`.
      ignore_index: label value excluded from the loss and from the mean's denominator.

    Returns:
      A float32 scalar, PyTorch's `CrossEntropyLoss(reduction='mean', ignore_index=...)`. When every
      pixel is ignored it is 0 (PyTorch gives NaN) and its gradient is 0.
    """
    nll, valid = _pixel_nll(logits, labels, ignore_index)
    return _masked_mean(nll, valid)


def cross_entropies(
    logits: jax.Array, targets: Sequence[jax.Array], ignore_index: int = IGNORE_INDEX
) -> list[jax.Array]:
    """`[cross_entropy(logits, t) for t in targets]` from one log-softmax of `logits`."""
    logp = _log_softmax(logits)
    return [_masked_mean(*_nll(logp, t, ignore_index)) for t in targets]


def ohem_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Online hard-example-mined cross-entropy, `ProbOhemCrossEntropy2d` semantics.

    On the batch given (the official applies it per GPU; see `per_replica`), with
    p = softmax probability of the ground-truth class and V = number of non-ignored pixels:

    - if `min_kept > V`: plain cross-entropy over all valid pixels (no mining);
    - else if `min_kept > 0` (and V > 0): threshold = the `min_kept`-th smallest p (counting the
      ignored pixels as p = 1, like the official `masked_fill`) if that exceeds `thresh`, else
      `thresh`; keep the valid pixels with p <= threshold (ties kept);
    - else (`min_kept == 0`): plain cross-entropy; the official only masks inside `min_kept > 0`.

    Then cross-entropy averaged over the kept pixels (0 when none). The mining mask carries no
    gradient. Shapes are static: the rank statistic comes from a full sort of the N*H*W pixels.

    Args:
      logits: (N, H, W, C) float.
      labels: (N, H, W) integer, `ignore_index` for ignored pixels.
      thresh: probability threshold (official Cityscapes value 0.7).
      min_kept: minimum number of pixels kept (static Python int; official 100000 per GPU).
      ignore_index: ignored label value.

    Returns:
      A float32 scalar.
    """
    min_kept = int(min_kept)
    nll, valid = _pixel_nll(logits, labels, ignore_index)
    n_pixels = valid.size
    if min_kept <= 0 or min_kept > n_pixels:
        # min_kept > N implies min_kept > V: the official's "too few labels" branch, always.
        return _masked_mean(nll, valid)

    num_valid = jnp.sum(valid)
    # softmax probability of the GT class (as F.softmax rounds it); ignored pixels count as 1, as
    # in the official masked_fill. The mask is not differentiated.
    probs = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32)), axis=-1)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    p_gt = jnp.take_along_axis(probs, safe[..., None], axis=-1)[..., 0]
    prob = jnp.where(valid, p_gt, 1.0).reshape(-1)
    kth = jnp.sort(prob)[min_kept - 1]
    threshold = jnp.where(kth > thresh, kth, jnp.float32(thresh))
    kept = valid & (prob.reshape(valid.shape) <= threshold)
    kept = jnp.where(min_kept > num_valid, valid, kept)
    return _masked_mean(nll, kept)


def semantic_sensitive(
    student_logits: jax.Array, teacher_logits: jax.Array, *, size: tuple[int, int] | None = None
) -> jax.Array:
    """Image-level semantic-sensitive loss L_I (unweighted).

    sum over batch and classes of |GAP(student) - GAP(teacher)|, where GAP is the mean over H, W of
    the raw (pre-softmax) full-resolution logits. A SUM over the batch it is given: its scale
    depends on the batch size (official: the per-GPU batch; use `per_replica`). Multiply by
    lambda_1 outside.

    Args:
      student_logits, teacher_logits: (N, H, W, C), the full-resolution logits; or, with `size`,
        the low-resolution logits whose align-corners upsampling to `size` they are (the mean of
        the upsampled logits then comes from them directly: `layers.upsampled_mean`).
    Returns:
      A float32 scalar.
    """
    if size is None:
        gap = lambda x: jnp.mean(jnp.asarray(x, jnp.float32), axis=(1, 2))
    else:
        gap = lambda x: upsampled_mean(x, size)
    return jnp.sum(jnp.abs(gap(student_logits) - gap(teacher_logits)))


def _cosine_self_similarity(feature: jax.Array, grid: int) -> jax.Array:
    """(N, H, W, C) -> (N, grid^2, grid^2) cosine similarity of the pooled regional vectors."""
    q = adaptive_avg_pool2d(jnp.asarray(feature, jnp.float32), (grid, grid))
    n, gh, gw, c = q.shape
    q = q.reshape(n, gh * gw, c)  # row-major regions: index = i * grid + j, like torch flatten(2)
    # max(norm, eps), written so the gradient stays finite at an all-zero region.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), COSINE_EPS**2))
    q = q / norm
    return jnp.einsum("nic,njc->nij", q, q, precision=jax.lax.Precision.HIGHEST)


def content_aware(
    student_feature: jax.Array, teacher_feature: jax.Array, grid: int = 7
) -> jax.Array:
    """Region-level content-aware loss L_R (unweighted).

    Each feature map is average-pooled to grid x grid regions with PyTorch's adaptive bins
    (overlapping: floor(i*L/g) .. ceil((i+1)*L/g)); the regional vectors (channels) give a
    grid^2 x grid^2 cosine self-similarity matrix; the loss is the mean over (batch, i, j) of the
    squared difference of the two matrices (`F.mse_loss`). Multiply by lambda_2 outside.

    Deviation: the channel norm is max(||q||, COSINE_EPS) (1e-8); the official divides by the bare
    norm and gives NaN on an all-zero (post-ReLU) region. Elsewhere the values are identical.

    Args:
      student_feature, teacher_feature: (N, H, W, C) decoder features. Only N must agree: the
        similarity matrices are grid^2 x grid^2 whatever the channels or the spatial size (the
        official networks both have 256 channels; reduced-width ones differ).
      grid: pooled grid size (7 in the official code).
    Returns:
      A float32 scalar.
    """
    if student_feature.ndim != 4 or teacher_feature.ndim != 4 or (
        student_feature.shape[0] != teacher_feature.shape[0]
    ):
        raise ValueError(
            f"losses.content_aware: student feature {student_feature.shape} and teacher feature "
            f"{teacher_feature.shape} must be (N, H, W, C) with the same N"
        )
    ms = _cosine_self_similarity(student_feature, grid)
    mt = _cosine_self_similarity(teacher_feature, grid)
    return jnp.mean(jnp.square(ms - mt))


def per_replica(
    loss_fn: Callable[..., jax.Array], *arrays: jax.Array, replica_batch: int, **kwargs
) -> jax.Array:
    """Apply `loss_fn` to consecutive groups of `replica_batch` examples and average the results.

    This is how the official code reduces: each GPU computes the loss on its own per-GPU batch, then
    `all_reduce(SUM) / world_size`. E.g. `per_replica(ohem_cross_entropy, logits, labels,
    replica_batch=2, thresh=0.7, min_kept=100000)` on a global batch of 16 equals the mean of the 8
    per-GPU OHEM losses; `per_replica(semantic_sensitive, s, t, replica_batch=2)` equals the
    official per-GPU sum averaged over GPUs.

    Args:
      loss_fn: a loss taking batched arrays as positional arguments (leading axis = batch).
      *arrays: the batched arguments; all share the leading batch size B (a multiple of
        `replica_batch`).
      replica_batch: examples per replica (the official per-GPU batch).
      **kwargs: passed to `loss_fn` unchanged (static options).
    Returns:
      The float32 mean over the B / replica_batch groups.
    """
    b = arrays[0].shape[0]
    if replica_batch <= 0 or b % replica_batch:
        raise ValueError(
            f"losses.per_replica: batch size {b} is not a positive multiple of "
            f"replica_batch={replica_batch}"
        )
    groups = b // replica_batch
    split = [a.reshape((groups, replica_batch) + a.shape[1:]) for a in arrays]
    values = jax.vmap(lambda *xs: loss_fn(*xs, **kwargs))(*split)
    return jnp.mean(values)
