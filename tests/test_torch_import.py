"""mgd_jax.pytorch.importer: key mapping, official checkpoint layouts, partial imports, errors, the
network directory it writes (mgd_jax.network_dir) and the `mgd-import` tool. (Numerical
parity lives in test_parity.py.)

Only `jax.eval_shape` runs on the JAX side here: nothing is compiled.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import traverse_util

from mgd_jax import network_dir
from mgd_jax.pytorch import importer
from mgd_jax.runtime.errors import ExportError, WeightImportError
from mgd_jax.tools import import_weights as import_main

import torch_heads as th
from torch_reference import timm, torch, torchvision

NUM_CLASSES = 21
SMALL = {"width": 0.25}  # ResNet-18 at quarter width: real key layout, tiny tensors


def _small_resnet18(num_classes: int = NUM_CLASSES, seed: int = 0):
    """The official student layout (timm deep stem 32 == furnace ResNet-18) at quarter width."""
    torch.manual_seed(seed)
    backbone = timm.models.resnet.ResNet(
        block=timm.models.resnet.BasicBlock, layers=[2, 2, 2, 2], stem_type="deep",
        stem_width=8, channels=(16, 32, 64, 128),
    )
    net = th.SegNet(th.dilate_resnet(backbone), "resnet", num_classes, in_ch=128, low_ch=16,
                    reduce_ch=12, hidden=64)
    return th.randomize_(net, seed)


@pytest.fixture(scope="module")
def small_sd():
    return {k: v.clone() for k, v in _small_resnet18().state_dict().items()}


def _flat(tree):
    return traverse_util.flatten_dict(tree)


def _fake_init(backbone: str, num_classes: int = NUM_CLASSES, **options):
    """Stand-in initial variables (random, right shapes) without compiling model.init."""
    rng = np.random.default_rng(123)
    flat = {
        p: rng.random(s.shape, dtype=np.float32).astype(s.dtype)
        for p, s in importer.abstract_variables(backbone, num_classes, **options).items()
    }
    return traverse_util.unflatten_dict(flat)


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ----------------------------------------------------------------------------------------------
# Naming rule and layouts


@pytest.mark.parametrize(
    "key, path",
    [
        ("backbone.conv1.0.weight", (("backbone", "conv1_0"), "weight")),
        ("backbone.layer1.0.downsample.1.running_var",
         (("backbone", "layer1_0", "downsample_1"), "running_var")),
        ("backbone.features.1.conv.0.0.weight",
         (("backbone", "features_1", "conv_0_0"), "weight")),
        ("head.aspp.map_convs.2.weight", (("head", "aspp", "map_convs_2"), "weight")),
        ("classifier.bias", (("classifier",), "bias")),
    ],
)
def test_naming_rule(key, path):
    assert importer.flax_path(key) == path
    leaf = {"weight": "kernel", "bias": "bias", "running_var": "var"}[path[1]]
    collection = "batch_stats" if leaf == "var" else "params"
    assert importer.torch_key((collection, *path[0], leaf)) == key


def test_every_model_leaf_has_a_torch_key():
    """The inverse rule is a bijection on each model's leaves (error messages rely on it)."""
    for backbone in ("resnet18", "resnet101", "wide_resnet50_2", "mobilenet_v2"):
        leaves = importer.abstract_variables(backbone, NUM_CLASSES)
        keys = {importer.torch_key(p) for p in leaves}
        assert len(keys) == len(leaves), backbone


def test_full_model_values_and_layout(small_sd):
    v = importer.from_torch(small_sd, "resnet18", NUM_CLASSES, **SMALL)
    assert set(v) == {"params", "batch_stats"}
    p, s = v["params"], v["batch_stats"]
    w = small_sd["backbone.conv1.0.weight"].numpy()
    np.testing.assert_array_equal(p["backbone"]["conv1_0"]["kernel"], w.transpose(2, 3, 1, 0))
    bn = "backbone.layer2.0.downsample.1"
    np.testing.assert_array_equal(p["backbone"]["layer2_0"]["downsample_1"]["scale"],
                                  small_sd[f"{bn}.weight"].numpy())
    np.testing.assert_array_equal(s["backbone"]["layer2_0"]["downsample_1"]["mean"],
                                  small_sd[f"{bn}.running_mean"].numpy())
    np.testing.assert_array_equal(s["head"]["aspp"]["red_bn"]["var"],
                                  small_sd["head.aspp.red_bn.running_var"].numpy())
    np.testing.assert_array_equal(p["classifier"]["bias"], small_sd["classifier.bias"].numpy())
    assert p["head"]["aspp"]["map_convs_3"]["kernel"].shape == (3, 3, 128, 64)
    # numpy input gives the same as torch tensors
    _assert_same(importer.from_torch({k: t.numpy() for k, t in small_sd.items()}, "resnet18",
                                    NUM_CLASSES, **SMALL), v)


def test_official_multi_network_checkpoint(small_sd):
    """{"model": {branch1.*, branch2.*, branch3.*}, optimizer...}: one branch by prefix."""
    other = _small_resnet18(seed=7).state_dict()
    model = {f"branch1.{k}": t for k, t in small_sd.items()}
    model |= {f"branch2.{k}": t for k, t in other.items()}
    model |= {f"branch3.{k}": t for k, t in other.items()}
    ckpt = {"model": model, "optimizer_l": {"state": {}}, "epoch": 33, "iteration": 100}
    want = importer.from_torch(small_sd, "resnet18", NUM_CLASSES, **SMALL)
    for prefix in ("branch1", "branch1."):
        got, report = importer.from_torch(ckpt, "resnet18", NUM_CLASSES, prefix=prefix,
                                         return_report=True, **SMALL)
        _assert_same(got, want)
        assert report.ignored == 2 * len(other)
    # DistributedDataParallel "module." prefix, and a bare state dict
    ddp = {"model": {f"module.{k}": t for k, t in model.items()}}
    _assert_same(importer.from_torch(ddp, "resnet18", NUM_CLASSES, prefix="branch1", **SMALL),
                 want)
    _assert_same(importer.from_torch(model, "resnet18", NUM_CLASSES, prefix="branch1", **SMALL),
                 want)
    with pytest.raises(WeightImportError, match="several networks.*prefix"):
        importer.from_torch(ckpt, "resnet18", NUM_CLASSES, **SMALL)
    with pytest.raises(WeightImportError, match="branch4.*branch1"):
        importer.from_torch(ckpt, "resnet18", NUM_CLASSES, prefix="branch4", **SMALL)
    # the backbone of a full checkpoint only (part="backbone"), merged into fresh variables
    into = _fake_init("resnet18", **SMALL)
    got, report = importer.from_torch(ckpt, "resnet18", NUM_CLASSES, prefix="branch1",
                                      into=into, part="backbone", return_report=True, **SMALL)
    _assert_same(got["params"]["backbone"], want["params"]["backbone"])
    _assert_same(got["params"]["head"], into["params"]["head"])
    assert {leaf.split("/")[1] for leaf in report.initialised} == {"head", "classifier"}


def test_torchvision_resnet18_into_deep_stem_student():
    """The official ResNet-18 init: torchvision weights, strict=False: bn1 + layer1-4 load,
    conv1.weight (7x7) and fc.* are skipped, the deep stem stays initialised."""
    sd = torchvision.models.resnet18().state_dict()
    into = _fake_init("resnet18")
    v, report = importer.from_torch(sd, "resnet18", NUM_CLASSES, into=into, return_report=True)
    assert report.part == "backbone"
    unused = {k for k in report.skipped if not k.endswith("num_batches_tracked")}
    assert unused == {"backbone.conv1.weight", "backbone.fc.weight", "backbone.fc.bias"}
    assert "deep stem" in report.skipped["backbone.conv1.weight"]
    stem = {"conv1_0", "conv1_1", "conv1_3", "conv1_4", "conv1_6"}
    initialised_backbone = {
        tuple(leaf.split("/")) for leaf in report.initialised if leaf.split("/")[1] == "backbone"
    }
    assert {p[2] for p in initialised_backbone} == stem
    assert len(initialised_backbone) == 3 + 2 * 4  # 3 kernels, 2 BNs x (scale, bias, mean, var)
    assert {leaf.split("/")[1] for leaf in report.initialised} == {"backbone", "head", "classifier"}
    for p in initialised_backbone:  # the stem kept its initial values
        np.testing.assert_array_equal(_flat(v)[p], _flat(into)[p])
    np.testing.assert_array_equal(v["params"]["backbone"]["bn1"]["scale"], sd["bn1.weight"].numpy())
    np.testing.assert_array_equal(
        v["params"]["backbone"]["layer4_1"]["conv2"]["kernel"],
        sd["layer4.1.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    assert "deep stem" in report.summary()
    # without into= the stem is missing: an explicit error naming the stem keys
    with pytest.raises(WeightImportError, match="into="):
        importer.from_torch(sd, "resnet18", NUM_CLASSES)


def test_torchvision_mobilenet_v2_backbone():
    sd = torchvision.models.mobilenet_v2().state_dict()
    into = _fake_init("mobilenet_v2")
    v, report = importer.from_torch(sd, "mobilenet_v2", NUM_CLASSES, into=into,
                                    return_report=True)
    unused = {k for k in report.skipped if not k.endswith("num_batches_tracked")}
    assert unused == {
        "backbone.features.18.0.weight", "backbone.features.18.1.weight",
        "backbone.features.18.1.bias", "backbone.features.18.1.running_mean",
        "backbone.features.18.1.running_var", "backbone.classifier.1.weight",
        "backbone.classifier.1.bias",
    }
    assert {leaf.split("/")[1] for leaf in report.initialised} == {"head", "classifier"}
    dw = sd["features.17.conv.1.0.weight"].numpy()  # depthwise (960, 1, 3, 3)
    np.testing.assert_array_equal(
        v["params"]["backbone"]["features_17"]["conv_1_0"]["kernel"], dw.transpose(2, 3, 1, 0)
    )


def test_official_mobilenet_student_checkpoint_skips_imagenet_classifier():
    """A full official MobileNetV2 student state dict carries backbone.classifier.1.* (unused)
    next to the segmentation classifier.* (used)."""
    torch.manual_seed(0)
    net = th.SegNet(th.dilate_mobilenet(torchvision.models.mobilenet_v2()), "mobilenet",
                    NUM_CLASSES, in_ch=320, low_ch=24, reduce_ch=24)
    sd = {k: t for k, t in net.state_dict().items() if not k.startswith("backbone.features.18.")}
    v, report = importer.from_torch(sd, "mobilenet_v2", NUM_CLASSES, return_report=True)
    assert {"backbone.classifier.1.weight", "backbone.classifier.1.bias"} <= set(report.skipped)
    assert "classifier.weight" in report.loaded
    np.testing.assert_array_equal(v["params"]["classifier"]["bias"], sd["classifier.bias"].numpy())


def test_imagenet_teacher_backbones():
    """torchvision wide_resnet50_2 in the checkpoint-wres34.pth.tar wrapping ({"state_dict": ...},
    fc skipped) and the v1c deep-stem ResNet-101 (resnet101_v1c.pth layout, bare): every backbone
    leaf loads."""
    files = {
        "wide_resnet50_2": {
            "state_dict": torchvision.models.wide_resnet50_2().state_dict(),
            "epoch": 90,
            "arch": "wide_resnet50_2",
        },
        "resnet101": timm.models.resnet.ResNet(
            block=timm.models.resnet.Bottleneck, layers=[3, 4, 23, 3], stem_type="deep",
            stem_width=64,
        ).state_dict(),
    }
    for backbone, ckpt in files.items():
        v, report = importer.from_torch(ckpt, backbone, NUM_CLASSES, into=_fake_init(backbone),
                                       return_report=True)
        unused = {k for k in report.skipped if not k.endswith("num_batches_tracked")}
        assert unused == {"backbone.fc.weight", "backbone.fc.bias"}, backbone
        assert {leaf.split("/")[1] for leaf in report.initialised} == {"head", "classifier"}
        assert not report.missing, backbone


# ----------------------------------------------------------------------------------------------
# Errors


def test_wrong_backbone(small_sd):
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(WeightImportError) as e:
        importer.from_torch(sd, "resnet101", NUM_CLASSES, into=_fake_init("resnet101"))
    msg = str(e.value)
    # a mis-shaped key with both shapes, and the backbone it does fit
    assert "backbone.layer1.0.conv1.weight: checkpoint shape (64, 64, 3, 3), model expects " \
           "(64, 128, 1, 1)" in msg
    assert "fit backbone 'resnet18'" in msg
    with pytest.raises(WeightImportError, match="unexpected keys"):
        importer.from_torch(small_sd, "mobilenet_v2", NUM_CLASSES, **SMALL)


def test_wrong_num_classes(small_sd):
    with pytest.raises(WeightImportError) as e:
        importer.from_torch(small_sd, "resnet18", 19, **SMALL)
    msg = str(e.value)
    assert "classifier.weight: checkpoint shape (21, 64, 1, 1), model expects (19, 64, 1, 1)" in msg
    assert "21 classes" in msg and "num_classes=19" in msg


def test_unexpected_and_missing_keys(small_sd):
    extra = dict(small_sd, **{"head.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightImportError, match=r"1 unexpected keys:\n  head.extra.weight"):
        importer.from_torch(extra, "resnet18", NUM_CLASSES, **SMALL)
    missing = {k: t for k, t in small_sd.items() if k != "head.aspp.red_bn.running_var"}
    with pytest.raises(WeightImportError, match=r"missing keys:\n  head.aspp.red_bn.running_var"):
        importer.from_torch(missing, "resnet18", NUM_CLASSES, **SMALL)
    # with into= the missing leaf stays initialised and is reported
    into = _fake_init("resnet18", **SMALL)
    v, report = importer.from_torch(missing, "resnet18", NUM_CLASSES, into=into,
                                   return_report=True, **SMALL)
    assert report.initialised == ["batch_stats/head/aspp/red_bn/var"]
    np.testing.assert_array_equal(v["batch_stats"]["head"]["aspp"]["red_bn"]["var"],
                                  into["batch_stats"]["head"]["aspp"]["red_bn"]["var"])
    # a shape error inside the backbone is never hidden by into=
    bad = dict(small_sd, **{"backbone.bn1.running_mean": torch.zeros(5)})
    with pytest.raises(WeightImportError, match=r"backbone.bn1.running_mean: checkpoint shape "
                                                r"\(5,\), model expects \(16,\)"):
        importer.from_torch(bad, "resnet18", NUM_CLASSES, into=into, **SMALL)


def test_bad_arguments(small_sd):
    with pytest.raises(WeightImportError, match="into="):
        importer.from_torch(small_sd, "resnet18", NUM_CLASSES, part="backbone", **SMALL)
    with pytest.raises(WeightImportError, match="into= is not the variables of resnet18"):
        importer.from_torch(small_sd, "resnet18", NUM_CLASSES, into=_fake_init("resnet18"),
                           **SMALL)
    with pytest.raises(WeightImportError, match="not a state dict"):
        importer.from_torch({"epoch": 3, "optimizer": {}}, "resnet18", NUM_CLASSES)


def test_torch_file_errors(tmp_path, small_sd):
    good = tmp_path / "ok.pth"
    torch.save({"model": small_sd}, good)
    loaded = importer.load_torch_file(str(good))
    assert loaded["model"].keys() == small_sd.keys()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightImportError, match=r"truncated\.pth: cannot read the PyTorch file"):
        importer.load_torch_file(str(truncated))
    with pytest.raises(WeightImportError, match=r"nope\.pth: no such file"):
        importer.load_torch_file(str(tmp_path / "nope.pth"))
    # from_torch takes a path too; errors name the file
    _assert_same(importer.from_torch(good, "resnet18", NUM_CLASSES, **SMALL),
                 importer.from_torch(small_sd, "resnet18", NUM_CLASSES, **SMALL))
    with pytest.raises(WeightImportError, match=r"truncated\.pth: cannot read"):
        importer.from_torch(truncated, "resnet18", NUM_CLASSES, **SMALL)
    with pytest.raises(WeightImportError, match=r"ok\.pth.*19"):
        importer.from_torch(good, "resnet18", 19, **SMALL)


# ----------------------------------------------------------------------------------------------
# Variables checkpoints and the CLI


def test_save_load_roundtrip(tmp_path, small_sd):
    v = importer.from_torch(small_sd, "resnet18", NUM_CLASSES, **SMALL)
    meta = {"backbone": "resnet18", "num_classes": NUM_CLASSES,
            "build_options": {"width": 0.25, "depths": (2, 2, 2, 2)}, "source": "x.pth"}
    network_dir.save_network(str(tmp_path / "ck"), v, meta)
    got, got_meta = network_dir.load_variables(str(tmp_path / "ck"))
    _assert_same(got, v)
    assert got_meta["backbone"] == "resnet18" and got_meta["num_classes"] == NUM_CLASSES
    assert got_meta["build_options"] == {"width": 0.25, "depths": [2, 2, 2, 2]}
    assert got_meta["format"] == network_dir.FORMAT
    with pytest.raises(ExportError, match="already exists"):
        network_dir.save_network(str(tmp_path / "ck"), v, meta)
    network_dir.save_network(str(tmp_path / "ck"), v, meta, overwrite=True)
    with pytest.raises(ExportError, match="needs 'num_classes'"):
        network_dir.save_network(str(tmp_path / "ck2"), v, {"backbone": "resnet18"})
    with pytest.raises(ExportError, match="no such directory"):
        network_dir.load_variables(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a network directory"):
        network_dir.load_variables(str(tmp_path / "empty"))


def test_cli_full_checkpoint(tmp_path, capsys, small_sd):
    path = tmp_path / "teacher.pth"
    torch.save({"model": {f"branch1.{k}": t for k, t in small_sd.items()}, "epoch": 1}, path)
    out = tmp_path / "teacher"
    rc = import_main.main(["import_main", f"--torch={path}", "--backbone=resnet18",
                           "--prefix=branch1", "--num_classes=21", "--width=0.25",
                           f"--output={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loaded 146 tensors" in printed and "backbone.fc.weight" in printed
    v, meta = network_dir.load_variables(str(out))
    _assert_same(v, importer.from_torch(small_sd, "resnet18", NUM_CLASSES, **SMALL))
    assert meta["prefix"] == "branch1" and meta["part"] == "model"
    assert meta["build_options"] == {"width": 0.25}
    json.dumps(meta)
    # wrong class count: exit code 2 and the reason on stderr
    rc = import_main.main(["import_main", f"--torch={path}", "--backbone=resnet18",
                           "--prefix=branch1", "--num_classes=19", "--width=0.25",
                           f"--output={tmp_path / 'bad'}"])
    assert rc == 2
    assert "classifier.weight" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_backbone_only(tmp_path, capsys):
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(sd, path)
    out = tmp_path / "r18"
    assert import_main.main(["import_main", f"--torch={path}", "--backbone=resnet18",
                             "--backbone_only", f"--output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "backbone.conv1.weight: 7x7 stem conv" in printed and "conv1_0" in printed
    v, meta = network_dir.load_variables(str(out))
    assert set(v["params"]) == {"backbone"} and meta["part"] == "backbone"
    assert meta["num_classes"] is None
    assert "params/backbone/conv1_0/kernel" in meta["missing"]
    # what the trainer does with it: merge into fresh variables
    into = _fake_init("resnet18")
    merged, initialised = network_dir.merge_variables(into, v)
    np.testing.assert_array_equal(merged["params"]["backbone"]["layer1_0"]["conv1"]["kernel"],
                                  sd["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert "params/backbone/conv1_0/kernel" in initialised
