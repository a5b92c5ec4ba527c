"""mgd_jax.models.layers against the PyTorch ops the official code uses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.models import layers

from torch_reference import torch

F = torch.nn.functional


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


SIZES = [
    ((5, 7), (11, 4)),  # odd, up and down
    ((8, 8), (32, 32)),  # x4 up, even (stride-4 logits -> input)
    ((16, 16), (128, 128)),  # x8 up (MobileNetV2 ASPP -> stride 4)
    ((33, 17), (9, 16)),  # down, odd
    ((13, 9), (7, 7)),  # overlapping adaptive bins
    ((16, 16), (7, 7)),
    ((5, 5), (7, 7)),  # adaptive pool with more bins than inputs
    ((4, 6), (1, 1)),
    ((1, 5), (3, 5)),
    ((7, 7), (7, 7)),
]


@pytest.mark.parametrize("method", layers.RESIZE_METHODS)
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_resize_bilinear_align_corners_matches_torch(size_in, size_out, method):
    x = np.random.default_rng(0).standard_normal((2, *size_in, 3)).astype(np.float32)
    ref = _nhwc(F.interpolate(_nchw(x), size=size_out, mode="bilinear", align_corners=True))
    got = np.asarray(layers.resize_bilinear_align_corners(jnp.asarray(x), size_out,
                                                          method=method))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=5e-6)


@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_matmul_resize_equals_gather_resize_forward_and_gradient(size_in, size_out):
    """The dense form computes the same function: values and input gradients (its backward is
    a matrix product, the gather form's a scatter-add), also against torch's backward."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *size_in, 3))
    cot = rng.standard_normal((2, *size_out, 3))

    def vjp(method):
        fn = lambda v: layers.resize_bilinear_align_corners(v, size_out, method=method)
        out, pull = jax.vjp(fn, jnp.asarray(x))
        return np.asarray(out), np.asarray(pull(jnp.asarray(cot))[0])

    with jax.enable_x64(True):
        (y_mm, g_mm), (y_ga, g_ga) = vjp("matmul"), vjp("gather")
    np.testing.assert_allclose(y_mm, y_ga, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_mm, g_ga, rtol=1e-12, atol=1e-12)
    xt = _nchw(x).requires_grad_(True)
    F.interpolate(xt, size=size_out, mode="bilinear", align_corners=True).backward(_nchw(cot))
    np.testing.assert_allclose(g_mm, _nhwc(xt.grad), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_upsampled_mean_equals_the_mean_of_the_upsampled(size_in, size_out):
    x = np.random.default_rng(4).standard_normal((2, *size_in, 3))
    with jax.enable_x64(True):
        full = layers.resize_bilinear_align_corners(jnp.asarray(x), size_out).mean(axis=(1, 2))
        got = layers.upsampled_mean(jnp.asarray(x, jnp.float32), size_out)
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_adaptive_avg_pool2d_matches_torch(size_in, size_out):
    x = np.random.default_rng(1).standard_normal((2, *size_in, 3)).astype(np.float32)
    ref = _nhwc(F.adaptive_avg_pool2d(_nchw(x), size_out))
    got = np.asarray(layers.adaptive_avg_pool2d(jnp.asarray(x), size_out))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_resize_and_pool_keep_dtype():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    assert layers.resize_bilinear_align_corners(x, (8, 8)).dtype == jnp.bfloat16
    assert layers.adaptive_avg_pool2d(x, (3, 3)).dtype == jnp.bfloat16


@pytest.mark.parametrize("size", [8, 9])
def test_max_pool_3x3_s2_matches_torch(size):
    # all-negative input: padding with 0 instead of -inf would show up at the borders
    x = -np.abs(np.random.default_rng(2).standard_normal((2, size, size, 3))).astype(np.float32)
    ref = _nhwc(torch.nn.MaxPool2d(3, stride=2, padding=1)(_nchw(x)))
    got = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x)))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,groups",
    [
        (3, 2, 1, 1, 1),
        (7, 2, 3, 1, 1),
        (3, 1, 4, 4, 1),
        (3, 2, 1, 1, 6),
        (3, 1, 2, 2, 6),
        (1, 2, 0, 1, 1),
    ],
)
def test_conv_matches_torch(kernel, stride, padding, dilation, groups):
    """Explicit symmetric padding (stride 2 on even sizes is where Flax 'SAME' differs)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 10, 10, 6)).astype(np.float32)
    tconv = torch.nn.Conv2d(6, 12, kernel, stride, padding, dilation, groups, bias=True)
    ref = _nhwc(tconv(_nchw(x)))
    mod = layers.conv(
        12, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, use_bias=True
    )
    params = {
        "params": {
            "kernel": tconv.weight.detach().numpy().transpose(2, 3, 1, 0),
            "bias": tconv.bias.detach().numpy(),
        }
    }
    got = np.asarray(mod.apply(params, jnp.asarray(x)))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_initializers_follow_pytorch():
    key = jax.random.key(0)
    fan_in = 3 * 3 * 64
    k = layers.torch_default_kernel_init(key, (3, 3, 64, 256), jnp.float32)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
    assert float(jnp.max(jnp.abs(k))) <= bound
    assert float(jnp.max(jnp.abs(k))) > 0.99 * bound
    k = layers.kaiming_normal_relu(key, (3, 3, 64, 256), jnp.float32)
    assert abs(float(jnp.std(k)) / math.sqrt(2 / fan_in) - 1) < 0.02
    assert float(jnp.max(jnp.abs(k))) > 3 * math.sqrt(2 / fan_in)  # untruncated normal
    b = layers.torch_default_bias_init(256)(key, (4096,), jnp.float32)
    assert float(jnp.max(jnp.abs(b))) <= 1 / 16


# ---------------------------------------------------------------------------------------------
# BatchNorm


def _bn_input(rng, shape, dtype=np.float64):
    # large mean vs spread: a one-pass E[x^2]-E[x]^2 variance would lose precision here
    return (rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[-1]) + 50.0).astype(dtype)


def _torch_bn(c, x_nhwc=None):
    bn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, c, dtype=torch.float64))
    return bn


def _flax_vars(bn: torch.nn.BatchNorm2d) -> dict:
    return {
        "params": {
            "scale": bn.weight.detach().numpy().copy(),
            "bias": bn.bias.detach().numpy().copy(),
        },
        "batch_stats": {
            "mean": bn.running_mean.numpy().astype(np.float32),
            "var": bn.running_var.numpy().astype(np.float32),
        },
    }


def test_batchnorm_train_and_running_stats_match_torch_float64():
    rng = np.random.default_rng(4)
    c = 5
    tbn = _torch_bn(c)
    variables = _flax_vars(tbn)
    mod = layers.BatchNorm(dtype=jnp.float64)
    with jax.enable_x64(True):
        for step in range(2):  # two updates: the EMA and the unbiased n/(n-1) compound
            x = _bn_input(rng, (3, 4, 5, c))
            tbn.train()
            ref = _nhwc(tbn(_nchw(x)))
            got, upd = mod.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-10, err_msg=f"{step}")
            variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
            assert upd["batch_stats"]["var"].dtype == jnp.float32  # stored in float32
            np.testing.assert_allclose(
                upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-6
            )
            np.testing.assert_allclose(
                upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-6
            )
        tbn.eval()
        x = _bn_input(rng, (2, 3, 3, c))
        ref = _nhwc(tbn(_nchw(x)))
        got = mod.apply(variables, jnp.asarray(x), train=False)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)  # f32 running stats


def test_batchnorm_float32_two_pass_precision():
    """Offset data: the two-pass float32 variance stays close to torch's float64 result."""
    rng = np.random.default_rng(5)
    x = _bn_input(rng, (4, 8, 8, 3)) * 0.01 + 1000.0
    tbn = _torch_bn(3)
    tbn.train()
    ref = _nhwc(tbn(_nchw(x)))
    mod = layers.BatchNorm()
    got, _ = mod.apply(
        _flax_vars(tbn), jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"]
    )
    # float32 quantisation of x itself (~6e-5 absolute at 1000) bounds the achievable accuracy
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=5e-2)


def test_ghost_batchnorm_equals_per_group_torch_bn():
    rng = np.random.default_rng(6)
    c, g, groups = 4, 2, 3
    x = _bn_input(rng, (g * groups, 3, 4, c))
    mod = layers.BatchNorm(group_size=g, dtype=jnp.float64)
    tbns = [_torch_bn(c) for _ in range(groups)]
    variables = _flax_vars(tbns[0])
    with jax.enable_x64(True):
        got, upd = mod.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    refs = []
    for i, tbn in enumerate(tbns):
        tbn.train()
        refs.append(_nhwc(tbn(_nchw(x[i * g : (i + 1) * g]))))
    np.testing.assert_allclose(np.asarray(got), np.concatenate(refs), rtol=0, atol=1e-10)
    # running statistics: the average of the groups' updated statistics
    mean = np.mean([t.running_mean.numpy() for t in tbns], axis=0)
    var = np.mean([t.running_var.numpy() for t in tbns], axis=0)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var, rtol=1e-6)


def test_batchnorm_bfloat16_compute_keeps_float32_state():
    x = jnp.asarray(_bn_input(np.random.default_rng(7), (2, 4, 4, 3), np.float32)).astype(
        jnp.bfloat16
    )
    mod = layers.BatchNorm(dtype=jnp.bfloat16)
    variables = mod.init(jax.random.key(0), x, train=False)
    assert jax.tree.map(lambda a: a.dtype, variables) == {
        "params": {"scale": jnp.float32, "bias": jnp.float32},
        "batch_stats": {"mean": jnp.float32, "var": jnp.float32},
    }
    y, upd = mod.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert upd["batch_stats"]["mean"].dtype == jnp.float32
    assert abs(float(jnp.mean(y.astype(jnp.float32)))) < 0.05


def test_batchnorm_init_does_not_update_and_errors_are_clear():
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 2, 2, 3)), jnp.float32)
    variables = layers.BatchNorm().init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1)
    with pytest.raises(ValueError, match="divide the batch"):
        layers.BatchNorm(group_size=3).apply(variables, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="more than 1 value"):
        layers.BatchNorm().apply(variables, x[:1, :1, :1], train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("group_size", [None, 2])
def test_recorded_batch_moments_replay_the_running_statistics_update(group_size):
    """`apply_moments` of the recorded moments == the update of a mutable `batch_stats` apply,
    and recording changes nothing else."""
    bn = layers.BatchNorm(group_size=group_size)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 5, 6, 3)) * 2 + 1, jnp.float32)
    variables = bn.init(jax.random.PRNGKey(0), x, train=False)
    variables = {"params": variables["params"],
                 "batch_stats": {"mean": jnp.full((3,), 0.3), "var": jnp.full((3,), 1.7)}}
    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    y2, moments = bn.apply(variables, x, train=True, mutable=["batch_moments"])
    np.testing.assert_array_equal(y, y2)
    replayed = layers.apply_moments(variables["batch_stats"], moments["batch_moments"])
    for key in ("mean", "var"):
        np.testing.assert_array_equal(replayed[key], updated["batch_stats"][key])


@pytest.mark.parametrize("group_size", [None, 2])
def test_batchnorm_streams_equal_a_per_stream_loop(group_size):
    """`streams=S` on S batches merged batch-major (row b*S + s) == S separate BatchNorm calls:
    outputs, per-stream ghost groups, (S, C) batch moments, and running statistics updated
    stream after stream."""
    s, b, c = 3, 4, 5
    rng = np.random.default_rng(9)
    xs = rng.standard_normal((s, b, 3, 4, c)) * rng.uniform(0.5, 3, (s, 1, 1, 1, c)) + np.arange(s)[
        :, None, None, None, None
    ]
    plain = layers.BatchNorm(group_size=group_size, dtype=jnp.float64)
    streamed = layers.BatchNorm(group_size=group_size, streams=s, dtype=jnp.float64)
    with jax.enable_x64(True):
        merged = jnp.asarray(xs.swapaxes(0, 1).reshape((b * s,) + xs.shape[2:]))
        variables = {
            "params": {"scale": jnp.linspace(0.5, 2, c), "bias": jnp.linspace(-1, 1, c)},
            "batch_stats": {"mean": jnp.full((c,), 0.3), "var": jnp.full((c,), 1.7)},
        }
        got, moments = streamed.apply(variables, merged, train=True, mutable=["batch_moments"])
        got_2, updated = streamed.apply(variables, merged, train=True, mutable=["batch_stats"])
        stats = variables["batch_stats"]
        for i in range(s):
            ref, ref_moments = plain.apply(variables, jnp.asarray(xs[i]), train=True,
                                           mutable=["batch_moments"])
            np.testing.assert_allclose(got[i::s], ref, rtol=0, atol=1e-12, err_msg=f"{i}")
            for key in ("mean", "var"):
                assert moments["batch_moments"][key].shape == (s, c)
                np.testing.assert_allclose(moments["batch_moments"][key][i],
                                           ref_moments["batch_moments"][key], rtol=1e-6)
            _, upd = plain.apply({**variables, "batch_stats": stats}, jnp.asarray(xs[i]),
                                 train=True, mutable=["batch_stats"])
            stats = upd["batch_stats"]
    np.testing.assert_array_equal(got, got_2)
    for key in ("mean", "var"):
        np.testing.assert_allclose(updated["batch_stats"][key], stats[key], rtol=1e-6)
    with pytest.raises(ValueError, match="streams=2 must divide"):
        layers.BatchNorm(streams=2).apply(variables, merged[:3], train=True,
                                          mutable=["batch_stats"])
