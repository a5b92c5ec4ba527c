"""mgd_jax.models: architecture (shapes, strides, dilations, names, exact official sizes), dtypes,
BatchNorm modes. Full-size networks are only traced (jax.eval_shape); anything that runs uses
reduced depth / width at 64 px. Numerical parity with PyTorch is tests/test_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd_jax import models
from mgd_jax.models.summary import analytic_costs

NUM_CLASSES = 5
SIZE = 64
# Reduced networks that keep every structural feature (stems, downsample blocks, layer4 dilation,
# MobileNetV2's stride-4 low-level block and its dilated blocks after features[14]).
SMALL = {
    "resnet18": dict(depths=(1, 1, 1, 2), width=0.25),
    "mobilenet_v2": dict(depths=(1, 1, 1, 1, 1, 2, 1), width=0.25),
    "resnet101": dict(depths=(1, 1, 2, 2), width=0.125),
    "wide_resnet50_2": dict(depths=(1, 1, 1, 2), width=0.125),
}
OFFICIAL_PARAMS_21 = {
    "resnet18": 16_627_413,
    "mobilenet_v2": 5_760_133,
    "resnet101": 59_468_085,
    "wide_resnet50_2": 83_678_389,
}


def _images(n: int = 2, size: int = SIZE, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


def _full_variables(name: str, num_classes: int = 21, size: int = 512, **kw):
    model = models.build(name, num_classes, **kw)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(_key(), x, train=False), images)
    return model, variables, images


def _key(seed: int = 0) -> jax.Array:
    # "rbg" keys compile ~5x faster than threefry on CPU; initialisation needs no more
    return jax.random.key(seed, impl="rbg")


_RUNS: dict[str, tuple] = {}


def _small_run(name: str) -> tuple:
    """(name, model, variables, eval output, train output, updated batch_stats), compiled once
    per backbone and shared by the tests (compilation dominates on CPU)."""
    if name in _RUNS:
        return _RUNS[name]
    model = models.build(name, NUM_CLASSES, **SMALL[name])
    x = _images()
    variables = jax.jit(lambda x: model.init(_key(), x, train=False))(x)

    @jax.jit
    def run(variables, x):
        out_eval = model.apply(variables, x, train=False)
        out_train, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return out_eval, out_train, upd

    _RUNS[name] = (name, model, variables, *run(variables, x))
    return _RUNS[name]


# Executed for real: the two students (the teachers share the ResNet code and are covered by
# the traced full-size tests here and by tests/test_parity.py).
@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def small(request):
    return _small_run(request.param)


@pytest.mark.parametrize("name", list(SMALL))
def test_small_traced_shapes(name):
    """Reduced networks of every backbone: shapes and strides by tracing (no compile)."""
    model = models.build(name, NUM_CLASSES, **SMALL[name])
    x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(_key(), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
    _check_small_output(name, out)


def test_small_shapes_strides_and_dtypes(small):
    name, model, variables, out, out_train, _ = small
    for o in (out, out_train):
        _check_small_output(name, o)
        assert bool(jnp.all(o.decoder >= 0))  # post-ReLU
        assert bool(jnp.all(jnp.isfinite(o.logits)))


def _check_small_output(name: str, out) -> None:
    w = SMALL[name]["width"]
    feats = out.features
    if name == "mobilenet_v2":
        # features[3]..features[17] analogue: the stride-4 block, then every later block
        assert len(feats) == 1 + sum(SMALL[name]["depths"][2:])
        assert feats[0].shape == (2, 16, 16, models.mobilenet_v2.make_divisible(24 * w))
        assert feats[-1].shape == (2, 2, 2, models.mobilenet_v2.make_divisible(320 * w))  # OS32
        strides = [SIZE // f.shape[1] for f in feats]
        assert strides == sorted(strides) and strides[0] == 4
    else:
        expansion = 1 if name == "resnet18" else 4
        assert len(feats) == 4  # layer1..layer4, shallow -> deep
        assert [f.shape[1] for f in feats] == [16, 8, 4, 4]  # strides 4, 8, 16, 16 (OS16)
        assert [f.shape[-1] for f in feats] == [
            round(c * w) * expansion for c in (64, 128, 256, 512)
        ]
    head = round(256 * w)
    assert out.decoder.shape == (2, SIZE // 4, SIZE // 4, head)
    assert out.logits.shape == (2, SIZE, SIZE, NUM_CLASSES)
    assert out.decoder.dtype == jnp.float32 and out.logits.dtype == jnp.float32


def test_train_mode_updates_batch_stats(small):
    name, _, variables, out_eval, out_train, upd = small
    assert set(upd) == {"batch_stats"}
    old, new = variables["batch_stats"], upd["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new))
    assert all(changed), f"{name}: every BatchNorm must update its running statistics"
    # eval mode uses the (initial) running statistics, train mode the batch statistics
    assert not np.allclose(out_eval.logits, out_train.logits)


def test_full_size_parameter_counts_are_official():
    for name, expected in OFFICIAL_PARAMS_21.items():
        _, variables, _ = _full_variables(name)
        assert models.count_params(variables["params"]) == expected, name
    _, variables, _ = _full_variables("wide_resnet34_2")
    assert models.count_params(variables["params"]) == OFFICIAL_PARAMS_21["wide_resnet50_2"]


def test_full_size_costs_match_spec():
    """docs/method.md §3.3 (conv MACs) and §5.3 (backbone FLOPs counted like thop), at 512 px."""
    spec = {  # name: (GMACs, backbone GFLOPs), to the digits the spec gives
        "resnet18": ("42.47", "17.21"),
        "mobilenet_v2": ("22.45", "1.529"),
        "resnet101": ("95.63", "59.11"),
        "wide_resnet50_2": ("127.68", "91.12"),
    }
    for name, (gmacs, gflops) in spec.items():
        model, variables, images = _full_variables(name)
        c = analytic_costs(model, variables, images)
        assert f"{c['macs'] / 1e9:.2f}" == gmacs, name
        bb = (c["backbone_macs"] + 2 * c["backbone_bn_elems"]) / 1e9
        assert f"{bb:.{len(gflops.split('.')[1])}f}" == gflops, name


def test_full_size_shapes():
    for name, deep, low in [
        ("resnet18", 512, 64),
        ("mobilenet_v2", 320, 24),
        ("resnet101", 2048, 256),
        ("wide_resnet50_2", 2048, 256),
    ]:
        model, variables, _ = _full_variables(name)
        out = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x),
            variables,
            jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32),
        )
        os_ = 32 if name == "mobilenet_v2" else 16
        assert out.features[0].shape == (2, 128, 128, low), name
        assert out.features[-1].shape == (2, 512 // os_, 512 // os_, deep), name
        assert out.decoder.shape == (2, 128, 128, 256)
        assert out.logits.shape == (2, 512, 512, 21)
    _, variables, _ = _full_variables("mobilenet_v2")
    assert (
        len(
            jax.eval_shape(
                lambda v, x: models.build("mobilenet_v2", 21).apply(v, x),
                variables,
                jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32),
            ).features
        )
        == 15
    )  # features[3..17]


def test_parameter_names_follow_the_mechanical_rule():
    """Spot checks of the state-dict-derived names (full list: tests/test_parity.py)."""
    _, v, _ = _full_variables("resnet18")
    params = flatten_dict(v["params"], sep="/")
    stats = flatten_dict(v["batch_stats"], sep="/")
    assert set(v["params"]) == {"backbone", "head", "classifier"}
    expected = {
        "backbone/conv1_0/kernel": (3, 3, 3, 32),  # backbone.conv1.0.weight
        "backbone/conv1_1/scale": (32,),
        "backbone/conv1_6/kernel": (3, 3, 32, 64),
        "backbone/bn1/bias": (64,),
        "backbone/layer1_1/conv2/kernel": (3, 3, 64, 64),
        "backbone/layer4_0/downsample_0/kernel": (1, 1, 256, 512),
        "head/aspp/map_convs_0/kernel": (1, 1, 512, 256),
        "head/aspp/map_convs_3/kernel": (3, 3, 512, 256),
        "head/aspp/map_bn/scale": (1024,),
        "head/aspp/global_pooling_conv/kernel": (1, 1, 512, 256),
        "head/aspp/global_pooling_bn/bias": (256,),
        "head/aspp/red_conv/kernel": (1, 1, 1024, 256),
        "head/aspp/pool_red_conv/kernel": (1, 1, 256, 256),
        "head/aspp/red_bn/scale": (256,),
        "head/reduce_0/kernel": (1, 1, 64, 48),
        "head/reduce_1/scale": (48,),
        "head/last_conv_0/kernel": (3, 3, 304, 256),
        "head/last_conv_1/scale": (256,),
        "head/last_conv_3/kernel": (3, 3, 256, 256),
        "head/last_conv_4/bias": (256,),
        "classifier/kernel": (1, 1, 256, 21),
        "classifier/bias": (21,),
    }
    for k, shape in expected.items():
        assert params[k].shape == shape, k
    assert stats["backbone/layer2_0/downsample_1/var"].shape == (128,)
    assert "backbone/layer1_0/downsample_0/kernel" not in params  # 64 -> 64: identity shortcut
    assert all(k.split("/")[-1] in ("mean", "var") for k in stats)

    _, v, _ = _full_variables("mobilenet_v2")
    params = flatten_dict(v["params"], sep="/")
    for k, shape in {
        "backbone/features_0_0/kernel": (3, 3, 3, 32),
        "backbone/features_0_1/scale": (32,),
        "backbone/features_1/conv_0_0/kernel": (3, 3, 1, 32),  # t=1: depthwise first
        "backbone/features_1/conv_1/kernel": (1, 1, 32, 16),
        "backbone/features_1/conv_2/scale": (16,),
        "backbone/features_3/conv_0_0/kernel": (1, 1, 24, 144),
        "backbone/features_3/conv_1_0/kernel": (3, 3, 1, 144),
        "backbone/features_17/conv_2/kernel": (1, 1, 960, 320),
        "backbone/features_17/conv_3/bias": (320,),
        "head/aspp/map_convs_0/kernel": (1, 1, 320, 256),
        "head/reduce_0/kernel": (1, 1, 24, 24),
        "head/last_conv_0/kernel": (3, 3, 280, 256),
    }.items():
        assert params[k].shape == shape, k
    assert not any(k.startswith("backbone/features_18") for k in params)

    _, v, _ = _full_variables("resnet101")
    params = flatten_dict(v["params"], sep="/")
    assert params["backbone/conv1_6/kernel"].shape == (3, 3, 64, 128)
    assert params["backbone/layer1_0/downsample_0/kernel"].shape == (1, 1, 128, 256)
    assert params["backbone/layer3_22/conv3/kernel"].shape == (1, 1, 256, 1024)
    _, v, _ = _full_variables("wide_resnet50_2")
    params = flatten_dict(v["params"], sep="/")
    assert params["backbone/conv1/kernel"].shape == (7, 7, 3, 64)
    assert params["backbone/layer1_0/conv2/kernel"].shape == (3, 3, 128, 128)  # width x2
    assert params["backbone/layer4_2/conv3/kernel"].shape == (1, 1, 1024, 2048)
    assert "backbone/fc/kernel" not in params


def _conv_geometry(name: str, **kw) -> dict[str, tuple]:
    """path -> (kernel, stride, padding, dilation, groups) of every conv, by tracing only."""
    model, variables, images = _full_variables(name, size=128, **kw)
    geo = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__":
            geo["/".join(mod.path)] = (
                mod.kernel_size[0],
                mod.strides[0],
                mod.padding[0][0],
                mod.kernel_dilation[0],
                mod.feature_group_count,
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    return geo


def test_dilation_and_padding_follow_nostride_dilate():
    g = _conv_geometry("resnet18")
    assert g["backbone/conv1_0"] == (3, 2, 1, 1, 1)
    assert g["backbone/layer3_0/conv1"] == (3, 2, 1, 1, 1)
    assert g["backbone/layer4_0/conv1"] == (3, 1, 2, 2, 1)  # stride removed, dilation 2
    assert g["backbone/layer4_0/conv2"] == (3, 1, 2, 2, 1)
    assert g["backbone/layer4_0/downsample_0"] == (1, 1, 0, 1, 1)
    assert g["backbone/layer4_1/conv1"] == (3, 1, 4, 4, 1)
    assert g["backbone/layer4_1/conv2"] == (3, 1, 4, 4, 1)
    assert g["head/aspp/map_convs_3"] == (3, 1, 18, 18, 1)
    assert g["head/last_conv_0"] == (3, 1, 1, 1, 1)
    for name in ("resnet101", "wide_resnet50_2"):
        g = _conv_geometry(name)
        assert [g[f"backbone/layer4_{j}/conv2"] for j in range(3)] == [
            (3, 1, 2, 2, 1),
            (3, 1, 4, 4, 1),
            (3, 1, 8, 8, 1),
        ], name
        assert g["backbone/layer4_0/downsample_0"] == (1, 1, 0, 1, 1)
        assert g["backbone/layer4_0/conv1"] == (1, 1, 0, 1, 1)
        assert g["backbone/layer2_0/conv2"] == (3, 2, 1, 1, 1)  # stride on the 3x3 (v1b)
    assert _conv_geometry("wide_resnet50_2")["backbone/conv1"] == (7, 2, 3, 1, 1)

    g = _conv_geometry("mobilenet_v2")
    assert g["backbone/features_2/conv_1_0"] == (3, 2, 1, 1, 96)
    assert g["backbone/features_14/conv_1_0"] == (3, 2, 1, 1, 576)  # kept: OS32
    assert [g[f"backbone/features_{i}/conv_1_0"][1:4] for i in (15, 16, 17)] == [
        (1, 2, 2),
        (1, 4, 4),
        (1, 8, 8),
    ]
    g16 = _conv_geometry("mobilenet_v2", output_stride=16)
    assert g16["backbone/features_14/conv_1_0"] == (3, 1, 2, 2, 576)
    assert {k: v for k, v in g16.items() if "features_14/" not in k} == {
        k: v for k, v in g.items() if "features_14/" not in k
    }


def test_mobilenet_output_stride_16():
    model16 = models.build("mobilenet_v2", NUM_CLASSES, output_stride=16, **SMALL["mobilenet_v2"])
    model32 = models.build("mobilenet_v2", NUM_CLASSES, **SMALL["mobilenet_v2"])
    x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
    v16 = jax.eval_shape(lambda x: model16.init(_key(), x), x)
    v32 = jax.eval_shape(lambda x: model32.init(_key(), x), x)
    assert jax.tree.map(lambda a: a.shape, v16) == jax.tree.map(lambda a: a.shape, v32)
    o16 = jax.eval_shape(lambda v, x: model16.apply(v, x), v16, x)
    o32 = jax.eval_shape(lambda v, x: model32.apply(v, x), v32, x)
    assert o16.features[-1].shape[1:3] == (4, 4) and o32.features[-1].shape[1:3] == (2, 2)
    assert o16.logits.shape == o32.logits.shape == (2, SIZE, SIZE, NUM_CLASSES)


def test_bfloat16_compute_close_to_float32():
    name, m32, v, _, _, upd = _small_run("resnet18")
    m16 = models.build(name, NUM_CLASSES, dtype=jnp.bfloat16, **SMALL[name])
    x = _images()
    v16 = jax.eval_shape(lambda x: m16.init(_key(), x), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v16))  # params + BN stats f32
    assert jax.tree.map(lambda a: a.shape, v16) == jax.tree.map(lambda a: a.shape, v)
    v = {"params": v["params"], **upd}  # realistic running statistics

    @jax.jit
    def run(v, x):
        train = lambda m: m.apply(v, x, train=True, mutable=["batch_stats"])
        return m32.apply(v, x), m16.apply(v, x), train(m32)[0], train(m16)

    o32, o16, t32, (t16, u16) = run(v, x)
    assert o16.features[-1].dtype == jnp.bfloat16
    assert o16.logits.dtype == jnp.float32 and o16.decoder.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(u16))
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    # bf16 has an 8-bit mantissa: ~1% after a dozen layers
    assert rel(o16.logits, o32.logits) < 0.03
    assert rel(o16.decoder, o32.decoder) < 0.03
    # train mode: the backbone stays close; the head is not compared because the ASPP image-pool
    # BN over a batch of 2 maps each channel to +-1, which amplifies any rounding
    for a, b in zip(t16.features, t32.features, strict=True):
        assert rel(a, b) < 0.06


def test_initialisation_follows_official():
    _, _, v, _, _, _ = _small_run("resnet18")
    flat = flatten_dict(v["params"], sep="/")
    head = round(256 * SMALL["resnet18"]["width"])
    bias = flat["classifier/bias"]
    assert float(jnp.max(jnp.abs(bias))) <= 1 / np.sqrt(head) and float(jnp.std(bias)) > 0
    for k, a in flat.items():
        if k.endswith("scale"):
            assert bool(jnp.all(a == 1)), k
        elif k.endswith("bias") and k != "classifier/bias":
            assert bool(jnp.all(a == 0)), k
    # head/classifier: kaiming normal fan_in; backbone: PyTorch default U(+-1/sqrt(fan_in))
    k = flat["head/last_conv_0/kernel"]
    fan_in = np.prod(k.shape[:3])
    assert abs(float(jnp.std(k)) / np.sqrt(2 / fan_in) - 1) < 0.05
    k = flat["backbone/layer1_0/conv1/kernel"]
    fan_in = np.prod(k.shape[:3])
    assert float(jnp.max(jnp.abs(k))) <= 1 / np.sqrt(fan_in)
    assert abs(float(jnp.std(k)) / np.sqrt(1 / (3 * fan_in)) - 1) < 0.15


def test_ghost_bn_groups_are_independent_in_the_backbone():
    """bn_group_size=2 on a batch of 4: the backbone features of the first two images equal
    those of a plain (group = whole batch) forward of just these two."""
    name, _, v, _, ref, _ = _small_run("mobilenet_v2")
    model = models.build(name, NUM_CLASSES, bn_group_size=2, **SMALL[name])
    x = jnp.concatenate([_images(), _images(seed=2) * 3 + 1])
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0].features)
    for f, r in zip(fwd(v, x), ref.features, strict=True):
        np.testing.assert_allclose(f[:2], r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bn_group_size"):
        jax.eval_shape(fwd, v, x[:3])


def test_batch_statistics_are_global_when_sharded():
    """Under jit on a batch sharded over devices (one image each), BN sees the global batch."""
    name, model, v, _, ref, ref_upd = _small_run("resnet18")
    assert len(jax.devices()) >= 2, "conftest.py simulates 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    x = jax.device_put(_images(), NamedSharding(mesh, P("data")))
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    scale = float(jnp.max(jnp.abs(ref.logits)))
    np.testing.assert_allclose(out.logits, ref.logits, rtol=0, atol=1e-5 * scale)
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(ref_upd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_segoutput_is_a_pytree_and_jit_returns_it(small):
    _, _, _, out, _, _ = small
    assert isinstance(out, models.SegOutput)
    leaves = jax.tree.leaves(out)
    assert len(leaves) == len(out.features) + 3  # + decoder, logits, low_logits
    assert out.low_logits.shape[1:3] == out.decoder.shape[1:3]


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build("resnet50", 21)
    with pytest.raises(ValueError, match="output stride 16"):
        models.build("resnet18", 21, output_stride=8)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    with pytest.raises(ValueError, match="output_stride must be 32 or 16"):
        jax.eval_shape(
            lambda x: models.build("mobilenet_v2", 21, output_stride=8).init(_key(), x),
            x,
        )
    with pytest.raises(ValueError, match="depths"):
        jax.eval_shape(lambda x: models.build("resnet18", 21, depths=(1, 1, 1)).init(_key(), x), x)
    with pytest.raises(ValueError, match="depths"):
        jax.eval_shape(lambda x: models.build("mobilenet_v2", 21, depths=(1, 1)).init(_key(), x), x)
