"""PyTorch-compatible building blocks (NHWC): convolution, BatchNorm, pooling and resizing.

Everything here reproduces the PyTorch op the official MGD code uses, bit-for-bit in float64 and to
rounding in float32, because imported ImageNet / CPS weights only work with the exact same geometry:

* convolutions take explicit symmetric padding (Flax's 'SAME' pads asymmetrically for stride 2);
* `BatchNorm` normalises with the biased batch variance but updates `running_var` with the
  unbiased one, like `torch.nn.BatchNorm2d`;
* `resize_bilinear_align_corners` is `F.interpolate(..., mode='bilinear', align_corners=True)`
  (`jax.image.resize` is half-pixel, i.e. align_corners=False), as two dense matrix products;
* `adaptive_avg_pool2d` uses PyTorch's overlapping bins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# PyTorch's default Conv2d init: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# Flax computes fan_in of an HWIO kernel as kh*kw*(in/groups), the same as PyTorch.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)
# nn.init.kaiming_normal_(w, mode='fan_in', nonlinearity='relu'): untruncated N(0, 2/fan_in).
kaiming_normal_relu: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default Conv2d bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = torch_default_kernel_init,
    bias_init: Initializer | None = None,
    name: str | None = None,
) -> nn.Conv:
    """A `torch.nn.Conv2d` equivalent: square kernel, explicit symmetric padding, HWIO kernel.

    The kernel is stored as `kernel` (HWIO, (k, k, in/groups, out)) and the bias as `bias`, so a
    PyTorch OIHW weight maps with `w.transpose(2, 3, 1, 0)`. Parameters are always float32.
    """
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init if bias_init is not None else nn.initializers.zeros,
        name=name,
    )


BN_MOMENTUM = 0.1  # every BatchNorm of the official networks: torch's default
RESIZE_METHODS = ("matmul", "gather")


def ema(running: Array, batch: Array, momentum: float = BN_MOMENTUM) -> Array:
    """PyTorch's running-statistics update `(1 - momentum) * running + momentum * batch`."""
    return ((1.0 - momentum) * running + momentum * batch).astype(jnp.float32)


def apply_moments(batch_stats: Any, moments: Any, momentum: float = BN_MOMENTUM) -> Any:
    """The running-statistics update of one train-mode forward, replayed from the batch moments
    it recorded (`mutable=["batch_moments"]`, same tree as `batch_stats`): equal to applying that
    forward with `mutable=["batch_stats"]`. Lets batched streams update in a chosen order."""
    return jax.tree.map(lambda r, b: ema(r, b, momentum), batch_stats, moments)


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` semantics on NHWC input (statistics over N, H, W).

    * train: normalise with the batch mean and the *biased* batch variance, both computed in float32
      in two passes (mean, then mean of squared deviations); update the running statistics with
      PyTorch's momentum convention `running = (1 - momentum) * running + momentum * batch`
      (momentum 0.1 here == Flax momentum 0.9), using the *unbiased* variance (x n/(n-1)).
    * eval: normalise with the running statistics.

    Under `jit` with the batch sharded over a mesh the reductions are global, i.e. SyncBN.

    `group_size=g` gives ghost BatchNorm: the batch is split into consecutive groups of g examples
    and each group is normalised with its own statistics, which reproduces unsynchronised
    per-replica BatchNorm (the official MobileNetV2 backbone: plain `nn.BatchNorm2d`, 2 images per
    GPU). The running statistics are then updated with the *average over groups* of the groups'
    mean and unbiased variance. (PyTorch would keep one set per replica and evaluate rank 0's;
    the group average is the same estimator with less noise, and it is replica-count independent.)

    `streams=S` normalises S independent batches merged batch-major into one, (B*S, H, W, C) with
    example b of stream s at row b*S + s: statistics (and ghost groups of `group_size` consecutive
    examples) per stream, as S separate calls would. The merge keeps each example's streams
    together, so a batch sharded over devices stays sharded (`methods.base.forward_streams`).
    Running statistics are then updated stream after stream, and `batch_moments` is (S, C).

    Parameters `scale` (1) and `bias` (0) are float32; batch_stats `mean` (0) and `var` (1) are
    float32; the output has `dtype`. In train mode the running statistics are updated when
    `batch_stats` is mutable, and the batch's (mean, unbiased var) are recorded in the collection
    `batch_moments` when that is mutable (see `apply_moments`); neither changes the output.
    """

    momentum: float = BN_MOMENTUM  # PyTorch convention (weight of the new batch statistic)
    epsilon: float = 1e-5
    group_size: int | None = None
    streams: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

        # Statistics in float32 at least (float64 when x is, for the x64 parity tests).
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if not train:
            y = (x32 - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
            return y.astype(self.dtype)

        s = self.streams
        if s < 1 or x.shape[0] % s:
            raise ValueError(
                f"BatchNorm {self.path}: streams={s} must divide the batch size {x.shape[0]}"
            )
        n_batch = x.shape[0] // s  # examples per stream
        g = n_batch if self.group_size is None else self.group_size
        if g < 1 or n_batch % g:
            raise ValueError(
                f"BatchNorm {self.path}: bn_group_size={self.group_size} must divide the batch "
                f"size {n_batch}" + (f" of each of the {s} streams" if s > 1 else "")
            )
        xg = x32.reshape((n_batch // g, g, s) + x.shape[1:])  # (groups, g, streams, H, W, C)
        axes = (1,) + tuple(range(3, xg.ndim - 1))
        n = g * math.prod(x.shape[1:-1])  # values per channel per group and stream
        if n < 2:
            raise ValueError(
                f"BatchNorm {self.path}: train-mode BatchNorm needs more than 1 value per channel "
                f"(got input shape {x.shape}, group size {g}); PyTorch raises here too"
            )
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)  # biased, two-pass
        y = (xg - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        y = y.reshape(x.shape).astype(self.dtype)

        if self.is_initializing():
            return y
        # (S, C): the average over groups of each stream's statistics
        batch_mean = jnp.mean(mean.reshape(-1, s, c), axis=0).astype(jnp.float32)
        batch_var = (jnp.mean(var.reshape(-1, s, c), axis=0) * (n / (n - 1))).astype(jnp.float32)
        if self.is_mutable_collection("batch_moments"):
            self.put_variable("batch_moments", "mean", batch_mean if s > 1 else batch_mean[0])
            self.put_variable("batch_moments", "var", batch_var if s > 1 else batch_var[0])
        if self.is_mutable_collection("batch_stats"):
            for i in range(s):  # the order S separate calls would update in
                ra_mean.value = ema(ra_mean.value, batch_mean[i], self.momentum)
                ra_var.value = ema(ra_var.value, batch_var[i], self.momentum)
        return y


def max_pool_3x3_s2(x: Array) -> Array:
    """`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`: the padding is -inf, never selected."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar: reduce_window is only differentiable with a literal init
        jax.lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )


def _align_corners_coords(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weight of hi for PyTorch's align_corners=True bilinear."""
    # PyTorch: scale = (in-1)/(out-1) (0 when out == 1), src = scale * i, computed in float.
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    lo = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    return lo, hi, w


def _lerp_axis(x: Array, axis: int, n_out: int) -> Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x  # align_corners with equal sizes is the identity
    lo, hi, w = _align_corners_coords(n_in, n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = jnp.asarray(w, x.dtype).reshape(shape)
    x_lo = jnp.take(x, jnp.asarray(lo, jnp.int32), axis=axis)
    x_hi = jnp.take(x, jnp.asarray(hi, jnp.int32), axis=axis)
    return x_lo + (x_hi - x_lo) * w


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of the align-corners linear interpolation along one axis."""
    lo, hi, w = _align_corners_coords(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def resize_bilinear_align_corners(
    x: Array, size: tuple[int, int], *, method: str = "matmul"
) -> Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=True)` for NHWC `x`, in `x.dtype`
    (leading dims before N are kept: stacked batches stay as they are laid out).

    Separable. "matmul" (default): one product with the interpolation matrix per axis, so the
    backward pass is dense too (HIGHEST precision: float32 accuracy on GPU / TPU). "gather": take
    the two neighbours and lerp (the original form; its backward is a scatter-add).
    """
    if x.ndim < 4:
        raise ValueError(f"resize_bilinear_align_corners expects NHWC input, got shape {x.shape}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is not one of {RESIZE_METHODS}")
    oh, ow = int(size[0]), int(size[1])
    if method == "gather":
        return _lerp_axis(_lerp_axis(x, x.ndim - 3, oh), x.ndim - 2, ow)
    h, w = x.shape[-3:-1]
    hp = jax.lax.Precision.HIGHEST
    if h != oh:
        x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(interpolation_matrix(h, oh), x.dtype), x,
                       precision=hp)
    if w != ow:
        x = jnp.einsum("pw,...owc->...opc", jnp.asarray(interpolation_matrix(w, ow), x.dtype), x,
                       precision=hp)
    return x


def upsampled_mean(x: Array, size: tuple[int, int]) -> Array:
    """Spatial mean of `resize_bilinear_align_corners(x, size)` from `x` alone: (N, C) float32.

    The upsampling is linear, so its mean is a fixed weighted mean of the input pixels, with
    weights = the column means of the interpolation matrices (not uniform: border pixels count
    less).
    """
    wh = jnp.asarray(interpolation_matrix(x.shape[1], int(size[0])).mean(axis=0), jnp.float32)
    ww = jnp.asarray(interpolation_matrix(x.shape[2], int(size[1])).mean(axis=0), jnp.float32)
    return jnp.einsum("h,nhwc,w->nc", wh, x.astype(jnp.float32), ww,
                      precision=jax.lax.Precision.HIGHEST)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix with PyTorch's bins [floor(i*L/o), ceil((i+1)*L/o))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool2d(x: Array, size: tuple[int, int]) -> Array:
    """`F.adaptive_avg_pool2d(x, size)` for NHWC `x` (bins may overlap when L % o != 0).

    Two separable averaging matmuls at HIGHEST precision (float32 accuracy on TPU too); the output
    has `x.dtype`.
    """
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool2d expects NHWC input, got shape {x.shape}")
    oh, ow = int(size[0]), int(size[1])
    ct = jnp.promote_types(x.dtype, jnp.float32)
    ph = jnp.asarray(_adaptive_pool_matrix(x.shape[1], oh), ct)
    pw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], ow), ct)
    y = jnp.einsum(
        "oh,nhwc,pw->nopc",
        ph,
        x.astype(ct),
        pw,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y.astype(x.dtype)
