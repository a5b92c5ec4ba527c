"""Bad input, fuzzed (hypothesis, bounded and derandomized for CI): config arguments and
`--config.key` overrides, split lists, weight files and state dicts each fail with one error
naming the field or file; images of every common form read correctly or are refused by name."""

import io
import os
import shutil
import sys
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgd_jax import config_lib, main
from mgd_jax.data import sources, splits
from mgd_jax.pytorch import importer, weight_files
from mgd_jax.runtime.errors import ConfigError, DataError, WeightImportError
from mgd_jax.serving import predict

from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(config_lib.RECIPE_ARGS) + ["x", "", " "]),
                          st.sampled_from(["", "="]), TEXT), max_size=4))
def test_config_arguments_parse_or_name_the_argument(items):
    arg = ",".join(key + sep + value for key, sep, value in items)
    try:
        parsed = config_lib.parse_arg(arg, **config_lib.RECIPE_ARGS)
    except ConfigError as e:
        assert str(e).startswith("config argument ") and "\n" not in str(e)
    else:
        assert set(parsed) == set(config_lib.RECIPE_ARGS)


def run_main(argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads --config.* overrides there
    capsys.readouterr()
    code = main.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


FIELD = st.from_regex(r"[a-z][a-z_]{0,11}(\.[a-z][a-z_]{0,8})?", fullmatch=True)


@FUZZ
@example(key="batch_size", value="3").via("a known int field, a non-int value")
@example(key="model.nope", value="1").via("an unknown nested field")
@example(key="eval", value="1").via("a nested config set to a value")
@given(key=FIELD, value=st.from_regex(r"[A-Za-z0-9_.()-]{0,12}", fullmatch=True))
def test_unknown_or_malformed_config_overrides_give_one_line(key, value, capsys, monkeypatch,
                                                             tmp_path):
    config = config_lib.base_config()
    known = key.split(".")[0] in config and (
        "." not in key or (hasattr(config[key.split(".")[0]], "keys")
                           and key.split(".")[1] in config[key.split(".")[0]]))
    field = key if not known else "batch_size"
    value = value if not known else value + "x"  # never an int
    argv = ["main", "--config=configs/voc.py:method=supervised", f"--workdir={tmp_path}",
            f"--config.{field}={value}"]
    with monkeypatch.context() as patch:
        code, err = run_main(argv, capsys, patch)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and f"config.{field}" in err[0]
    assert not os.listdir(tmp_path)  # nothing written


def test_config_file_mistakes_give_one_line(capsys, monkeypatch, tmp_path):
    cases = {
        "--config=configs/nope.py": "--config: cannot load the config file: ",
        "--config=configs/voc.py:nope=1": "config argument 'nope' is unknown",
        "--config=configs/voc.py:partition=3": "partition=3: expected one of [2, 4, 8, 16]",
    }
    for arg, expected in cases.items():
        code, err = run_main(["main", arg, f"--workdir={tmp_path}"], capsys, monkeypatch)
        assert code == 2 and len(err) == 1 and expected in err[0], err


@FUZZ
@given(st.binary(max_size=200) | st.lists(TEXT, max_size=6).map(
    lambda lines: "\n".join(lines).encode()))
def test_split_lists_read_or_name_the_file(data):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train_aug_labeled_1-8.txt")
        with open(path, "wb") as f:
            f.write(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicate ids only warn
                keys = splits.read_list(path)
        except DataError as e:
            assert path in str(e)
            return
    assert len(keys) == len(set(keys)) and all(k and not k.isspace() for k in keys)


@pytest.mark.parametrize("labeled, unlabeled", [("", "b\n"), ("a\n", "  \n\n")])
def test_empty_split_lists_are_refused_by_name(tmp_path, labeled, unlabeled):
    (tmp_path / "train_aug_labeled_1-8.txt").write_text(labeled)
    (tmp_path / "train_aug_unlabeled_1-8.txt").write_text(unlabeled)
    with pytest.raises(DataError, match=f"{tmp_path}/train_aug_.*labeled_1-8.txt: the split list "
                                        "is empty"):
        splits.standard_lists("voc", 8, tmp_path)


def weight_file_bytes():
    """A small valid file of each format the torch-free reader takes."""
    arrays = {"backbone.conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "head.bias": np.ones(3, np.float32)}
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    from safetensors.numpy import save

    files = {".npz": npz.getvalue(), ".safetensors": save(arrays)}
    try:
        from torch_reference import torch
    except pytest.skip.Exception:  # torch missing (its `need`): no .pth case; under CI=true, fails
        return files
    pth = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, pth)
    files[".pth"] = pth.getvalue()
    return files


WEIGHT_FILES = weight_file_bytes()


@FUZZ
@given(suffix=st.sampled_from(sorted(WEIGHT_FILES)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
       garbage=st.booleans())
def test_damaged_weight_files_raise_weight_import_errors(suffix, cut, flips, garbage):
    data = bytearray(WEIGHT_FILES[suffix])
    data = data[: max(1, int(len(data) * cut))] if cut < 0.98 else data
    for where, mask in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= mask
    if garbage:
        data = bytes(reversed(data))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"weights{suffix}")
        with open(path, "wb") as f:
            f.write(bytes(data))
        try:
            loaded = weight_files.read(path)
        except WeightImportError as e:
            assert path in str(e) or "weights" in str(e)
            return
    assert isinstance(loaded, dict)  # some flips land in values: still a readable file


@FUZZ
@given(st.dictionaries(st.sampled_from(["backbone.conv1.weight", "backbone.bn1.weight",
                                        "head.classifier.weight", "classifier.bias", "x.y"]),
                       st.lists(st.integers(1, 4), max_size=4).map(tuple), max_size=4))
def test_state_dicts_of_the_wrong_shapes_raise_weight_import_errors(shapes):
    state_dict = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}
    with pytest.raises(WeightImportError):
        importer.from_torch(state_dict, "resnet18", 5, **TINY)


# Images: each form a PNG / JPEG can take, with the RGB a reader must give (numpy, not PIL).
def image_forms():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    p_image = Image.fromarray(index, mode="P")
    p_image.putpalette(palette.ravel().tolist())
    expect_gray = np.repeat(gray[..., None], 3, -1)
    return {
        "rgb": (Image.fromarray(rgb), rgb),
        "rgba": (Image.fromarray(np.dstack([rgb, alpha])), rgb),
        "gray": (Image.fromarray(gray), expect_gray),
        "gray_alpha": (Image.fromarray(np.dstack([gray, alpha]), mode="LA"), expect_gray),
        "gray16": (Image.fromarray(gray16),
                   np.repeat(np.round(gray16 / 257.0).astype(np.uint8)[..., None], 3, -1)),
        "palette": (p_image, palette[index]),
    }


@pytest.mark.parametrize("form", sorted(image_forms()))
def test_images_of_every_common_form_read_correctly(tmp_path, form):
    image, expected = image_forms()[form]
    path = tmp_path / f"{form}.png"
    image.save(path)
    np.testing.assert_array_equal(predict.read_image(path), expected)


def test_unreadable_images_are_refused_by_name(tmp_path):
    bad = {"corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(100), "empty.jpg": b"",
           "text.png": b"hello"}
    buffer = io.BytesIO()
    Image.fromarray(np.ones((4, 4), np.float32)).save(buffer, format="TIFF")
    bad["float.png"] = buffer.getvalue()
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good, format="PNG")
    bad["truncated.png"] = good.getvalue()[:60]
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"{tmp_path / name}: "):
            predict.read_image(tmp_path / name)


def test_zip_that_is_not_a_torch_file_is_named(tmp_path):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not weights")
    with pytest.raises(WeightImportError, match=str(path)):
        weight_files.read(path)


def test_damaged_prepared_data_names_the_file_and_the_rebuild_command(synthetic_dir, tmp_path):
    data_dir, name = synthetic_dir
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (record_file,) = copy.rglob("*-train.array_record-*")
    data = bytearray(record_file.read_bytes())
    for i in range(100, len(data) - 100, 97):
        data[i] ^= 0xFF
    record_file.write_bytes(bytes(data))
    split = sources.open_split(name, "train", str(copy))
    with pytest.raises(DataError) as error:
        split[len(split) // 2]
    message = str(error.value)
    assert str(record_file.parent) in message and record_file.name in message
    assert (f"rebuild them with mgd-prepare --dataset=synthetic "
            f"--data_dir={copy}") in message and message.endswith("--overwrite")
