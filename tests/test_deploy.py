"""Deployable exports (mgd_jax.serving.deploy, `mgd-export --format=jax,onnx`): the serialized
StableHLO runs in a second process that never imports mgd_jax, the ONNX graph runs in onnxruntime,
and both give the Flax network's logits, for any batch size, at each exported size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import models, network_dir
from mgd_jax.data.augment import normalize
from mgd_jax.runtime.errors import ExportError
from mgd_jax.serving import deploy, onnx_export
from mgd_jax.serving.predict import pad_centered
from mgd_jax.tools import export as export_main

from conftest import NUM_CLASSES, need

SIZES = ((32, 32), (48, 64))


def _flax_logits(model, variables, images):
    return np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False).logits)(images))


def _assert_close(got, want):
    # float32 rounding of a different but equivalent computation, relative to the logits' scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _onnxruntime():
    need("onnx", "onnxruntime")
    import onnxruntime

    return onnxruntime


def _images(rng, batch, size):
    return normalize(rng.integers(0, 256, (batch, *size, 3), np.uint8))


def test_jax_export_runs_without_the_project(tiny_network, tmp_path, capsys):
    directory, model, variables = tiny_network
    out = tmp_path / "deploy"
    assert export_main.main(["export_main", f"--checkpoint={directory}", "--format=jax",
                             "--sizes=48x64,32x32", f"--output={out}"]) == 0
    assert "32x32.jax, 48x64.jax" in capsys.readouterr().out
    manifest = json.loads((out / deploy.MANIFEST).read_text())
    assert manifest["sizes"] == [[32, 32], [48, 64]] and manifest["num_classes"] == NUM_CLASSES
    assert manifest["jax_platforms"] == ["cpu", "cuda", "tpu"]

    # batch 3 at both sizes and batch 1 at one; the first 48x64 image is the canvas of a
    # 30x40 image padded centred, which the Python runner below produces
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), np.uint8)
    canvas, valid, (top, left) = pad_centered(image, (48, 64))
    inputs = {"32x32": _images(rng, 3, (32, 32)), "48x64": _images(rng, 3, (48, 64))}
    inputs["48x64"][0] = normalize(canvas, valid)
    want = {k: _flax_logits(model, variables, x) for k, x in inputs.items()}
    inputs["32x32_1"], want["32x32_1"] = inputs["32x32"][1:2], want["32x32"][1:2]
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        inputs = np.load({str(tmp_path / 'inputs.npz')!r})
        out = {{}}
        for name in inputs.files:
            with open({str(out)!r} + "/" + name.split("_")[0] + ".jax", "rb") as f:
                exported = jax.export.deserialize(bytearray(f.read()))
            out[name] = np.asarray(exported.call(inputs[name]))
        np.savez({str(tmp_path / 'outputs.npz')!r}, **out)
        assert not any(m.startswith("mgd_jax") for m in sys.modules), "imported mgd_jax"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300,
                   env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    outputs = np.load(tmp_path / "outputs.npz")
    for key, x in inputs.items():
        assert outputs[key].shape == (*x.shape[:3], NUM_CLASSES)
        _assert_close(outputs[key], want[key])

    # the Python runner: an image is padded centred onto the smallest size that holds it
    runner = deploy.load(out)
    _assert_close(runner.logits(image), want["48x64"][0, top:top + 30, left:left + 40])
    with pytest.raises(ExportError, match="fits none of the exported sizes"):
        runner.logits(np.zeros((50, 20, 3), np.uint8))
    with pytest.raises(ExportError, match="already exists"):
        deploy.export_deployable(network_dir.load_network(str(directory)), out, sizes=[(32, 32)])


def _random_network(backbone, **options):
    model = models.build(backbone, NUM_CLASSES, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    rng = np.random.default_rng(1)

    def fill(path, leaf):  # scales that keep activations varied (see conftest)
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
        if "var" in name or "scale" in name:
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0, 0.1, leaf.shape)

    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: fill(p, s).astype(np.float32), shapes)
    return network_dir.Network(model, variables, {"backbone": backbone}, "<test>")


@pytest.mark.parametrize("backbone, options", [
    ("resnet18", {"width": 0.125, "depths": (1, 1, 1, 1)}),
    ("mobilenet_v2", {"width": 0.25, "depths": (1, 1, 1, 1, 1, 1, 1)}),
])
def test_onnx_matches_flax_in_onnxruntime(backbone, options, tmp_path):
    """Both students (grouped and dilated convolutions, ReLU6, max pool, align-corners
    resizes) as ONNX, run by onnxruntime on CPU, for two batch sizes."""
    onnxruntime = _onnxruntime()
    network = _random_network(backbone, **options)
    network.meta["num_classes"] = NUM_CLASSES
    deploy.export_deployable(network, tmp_path / "d", sizes=[(48, 64)], formats=["onnx"])
    session = onnxruntime.InferenceSession(str(tmp_path / "d" / "48x64.onnx"),
                                           providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, outp.name) == ("images", ["batch", 48, 64, 3], "logits")
    x = _images(np.random.default_rng(2), 2, (48, 64))
    want = _flax_logits(network.model, network.variables, x)
    assert want.std(axis=(1, 2)).min() > 1e-3  # the logits depend on the pixels
    _assert_close(session.run(None, {"images": x})[0], want)
    _assert_close(session.run(None, {"images": x[1:]})[0], want[1:])  # another batch size


def test_onnx_dot_general_matches_jax_in_onnxruntime():
    """dot_general with batch and contracting dimensions on both sides (ONNX Einsum)."""
    onnxruntime = _onnxruntime()
    w = np.random.default_rng(0).normal(size=(5, 3, 7)).astype(np.float32)

    def fn(x):  # x: (batch, 3, 5, 4); contract 3 and 5 with w's, batch over the 4s
        y = jax.lax.dot_general(x, jnp.asarray(w), (((1, 2), (1, 0)), ((), ())))  # (b, 4, 7)
        z = jnp.einsum("bij,bkj->bik", y, y)  # a batch dimension on both sides
        return z

    model = onnx_export.to_onnx(fn, (3, 5, 4))
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 4)).astype(np.float32)
    _assert_close(session.run(None, {"images": x})[0], np.asarray(fn(x)))


def test_onnx_refuses_what_it_does_not_know():
    need("onnx")
    with pytest.raises(ExportError, match="primitive 'sort' is not supported"):
        onnx_export.to_onnx(lambda x: jnp.sort(x, axis=-1), (4, 4, 3))


def test_export_main_errors(tiny_network, tmp_path, capsys):
    directory, _, _ = tiny_network
    base = ["export_main", f"--checkpoint={directory}", f"--output={tmp_path / 'x'}"]
    assert export_main.main(base + ["--format=network,jax"]) == 2
    assert "different --output directories" in capsys.readouterr().err
    assert export_main.main(base + ["--format=jax", "--sizes=512"]) == 2
    assert "size '512': expected HEIGHTxWIDTH" in capsys.readouterr().err
    assert export_main.main(base + ["--format=onnx", "--precision=bfloat16"]) == 2
    assert "ONNX export needs a float32 network" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
