"""A saved network evaluated with the config's protocol (`evaluate.evaluate_checkpoint`, on an
in-memory source) and, end to end, `python -m mgd_jax.tools.evaluate` on a tiny prepared dataset."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import config_lib
from mgd_jax.data import augment, datasets, sources
from mgd_jax.evaluation import evaluate
from mgd_jax.runtime.errors import ConfigError, ExportError

from conftest import NUM_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_network):
    directory, model, variables = tiny_network
    return directory.parent, model, variables  # (workdir, ...)


def _config():
    c = config_lib.base_config()
    c.dataset = "synthetic"
    c.num_classes = NUM_CLASSES
    c.precision = "float32"
    c.eval.pad_to = (32, 32)
    c.eval.crop = 32
    c.eval.batch_size = 8
    return c


def _source(n=10):
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        h, w = 32 - (i % 3) * 5, 32 - (i % 4) * 3
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[:2] = 255  # ignored rows
        labels.append(label)
    return sources.ArraySource(images, labels)


def test_evaluate_checkpoint_matches_per_image_reference(tiny, tmp_path, capsys):
    workdir, model, variables = tiny
    source = _source()
    result = evaluate.evaluate_checkpoint(_config(), str(workdir), source=source,
                                           output_dir=str(tmp_path))

    # Reference: the VOC protocol image by image (pad centred to 32x32, one forward, crop back).
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    forward = jax.jit(lambda x: jnp.argmax(model.apply(variables, x, train=False).logits, -1))
    for i in range(len(source)):
        ex = source[i]
        img, valid, lab = augment.eval_pad(ex["image"], ex["label"], (32, 32))
        x = augment.normalize(img[None], valid[None])
        pred = forward(jnp.asarray(x))
        expected += np.asarray(evaluate.confusion_matrix(
            pred, jnp.asarray(lab[None], jnp.int32), NUM_CLASSES, valid=jnp.asarray(valid[None])))
    got = np.asarray(result["confusion"])
    assert got.sum() == expected.sum() == sum((s["label"] != 255).sum() for s in source)
    assert np.abs(got - expected).sum() <= 2  # float reassociation may flip a near-tie

    saved = json.loads((tmp_path / "eval_val.json").read_text())
    assert saved["miou"] == pytest.approx(evaluate.scores(got)["miou"])
    names = datasets.DATASETS["synthetic"].class_names
    assert list(saved["iou_per_class"]) == list(names)
    assert saved["tta"] == {"flip": False, "scales": [1.0]} and saved["num_images"] == 10
    out = capsys.readouterr().out
    assert "single scale, no flip" in out and "mIoU" in out and names[1] in out


def test_tta_is_reported(tiny, tmp_path, capsys):
    workdir = tiny[0]
    result = evaluate.evaluate_checkpoint(
        _config(), str(workdir / "export"), source=_source(4), flip=True, scales=(0.75, 1.0),
        output_dir=str(tmp_path),
    )
    assert result["json"].endswith("eval_val_flip_ms0.75-1.json") and os.path.isfile(result["json"])
    assert result["tta"] == {"flip": True, "scales": [0.75, 1.0]}
    assert "TTA: flip + scales 0.75,1" in capsys.readouterr().out


def test_config_from_training_workdir(tiny, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    os.symlink(tiny[0] / "export", workdir / "export")
    (workdir / "config.json").write_text(_config().to_json_best_effort(indent=2))
    config = config_lib.load_workdir_config(str(workdir))
    assert tuple(config.eval.pad_to) == (32, 32) and config.num_classes == NUM_CLASSES
    result = evaluate.evaluate_checkpoint(config, str(workdir), source=_source(3))
    assert result["json"] == str(workdir / "eval_val.json") and os.path.isfile(result["json"])


def test_errors_name_the_problem(tiny, tmp_path):
    c = _config()
    c.num_classes = 21
    with pytest.raises(ExportError, match="5 classes, config.num_classes is 21"):
        evaluate.evaluate_checkpoint(c, str(tiny[0]), source=_source(2))
    with pytest.raises(ConfigError, match="config.json"):
        config_lib.load_workdir_config(str(tmp_path))


def test_cli_end_to_end_on_synthetic_data(tiny, tmp_path):
    from mgd_jax.data import prepare

    data_dir = tmp_path / "data"
    name = prepare.ensure_synthetic(str(data_dir), num_train=2, num_val=5, image_size=32)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "mgd_jax.tools.evaluate", f"--checkpoint={tiny[0]}",
        "--config=configs/demo.py:stage=student_supervised", f"--config.data_dir={data_dir}",
        f"--config.dataset={name}", f"--config.num_classes={NUM_CLASSES}",
        "--config.eval.pad_to=(32, 32)", "--config.eval.crop=32",
        "--config.eval.batch_size=8", "--flip", f"--output={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TTA: flip" in proc.stdout and "background" in proc.stdout
    saved = json.loads((out / "eval_val_flip.json").read_text())
    assert saved["num_images"] == 5 and saved["dataset"] == name
    assert 0.0 <= saved["pixel_accuracy"] <= 1.0
