"""A dataset of your own: `mgd-prepare --dataset=folder` from folders of images and index masks
(class names, palette, ignore value, val given or held out by seed), the errors that name the
file, and training on it by name (configs/own.py, `config.dataset=<name>`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgd_jax import config_lib
from mgd_jax.data import prepare, sources, splits
from mgd_jax.data.datasets import custom_name
from mgd_jax.runtime.errors import ConfigError, DataError
from mgd_jax.tools import prepare as prepare_main

from conftest import NUM_CLASSES

CLASSES = ["background", "cat", "dog", "bird", "fish"]
ROOT = Path(__file__).resolve().parent.parent


def _make_folder(root, n=16, *, size=32, ignore=255, seed=0):
    """n JPEG images (one greyscale PNG, one in a sub-folder) and index masks with `ignore`."""
    rng = np.random.default_rng(seed)
    (root / "images" / "sub").mkdir(parents=True)
    (root / "masks" / "sub").mkdir(parents=True)
    labels = {}
    for i in range(n):
        h, w = size - (i % 3), size
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label[0, :4] = ignore
        sub = "sub/" if i == 3 else ""
        if i == 5:
            Image.fromarray(image[..., 1]).save(root / "images" / f"{sub}img{i:02d}.png")
        else:
            Image.fromarray(image).save(root / "images" / f"{sub}img{i:02d}.jpg", quality=95)
        Image.fromarray(label).save(root / "masks" / f"{sub}img{i:02d}.png")
        labels[f"img{i:02d}"] = label
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return labels


def test_prepare_folder_held_out_val_and_reading_back(tmp_path, capsys):
    labels = _make_folder(tmp_path, ignore=7)
    (tmp_path / "palette.txt").write_text("0 0 0\n#ff0000\n0,255,0\n0 0 255\n255 255 0\n")
    data_dir = tmp_path / "data"
    args = ["prepare_main", "--dataset=folder", "--name=pets", f"--images={tmp_path / 'images'}",
            f"--masks={tmp_path / 'masks'}", f"--classes={tmp_path / 'classes.txt'}",
            f"--palette={tmp_path / 'palette.txt'}", "--ignore_value=7", "--val_fraction=0.25",
            "--val_seed=3", f"--data_dir={data_dir}"]
    assert prepare_main.main(args) == 0
    assert "--config=configs/own.py:dataset=pets" in capsys.readouterr().out
    val_keys, train_keys = splits.partition(sorted(labels), fraction=0.25, seed=3)
    for split, keys in (("train", train_keys), ("val", val_keys)):
        src = sources.open_split("pets", split, data_dir)
        assert src.keys == keys and src.info.class_names == tuple(CLASSES)
        assert src.info.palette[1] == (255, 0, 0) and src.info.palette[2] == (0, 255, 0)
        for i, key in enumerate(keys):
            ex = src[i]
            want = np.where(labels[key] == 7, 255, labels[key])  # the ignore value -> 255
            np.testing.assert_array_equal(ex["label"], want)
            assert ex["image"].shape == (*want.shape, 3) and ex["image"].dtype == np.uint8
    assert sources.open_split("folder/pets", "val", data_dir).keys == val_keys
    meta = sources.read_sidecar(sources.dataset_dir("pets", data_dir))
    assert meta["source"]["max_size"]["val"] == [32, 32]
    # unknown names say how to prepare them and list what is there
    with pytest.raises(DataError, match=r"'cats' is not prepared.*--name=cats.*\['pets'\]"):
        sources.open_split("cats", "train", data_dir)


def test_prepare_folder_given_val_and_names(tmp_path):
    _make_folder(tmp_path / "train", n=6)
    _make_folder(tmp_path / "val", n=3, seed=1)
    for folder in ("images", "masks"):  # val keys must differ from train keys
        for path in sorted((tmp_path / "val" / folder).rglob("img*")):
            path.rename(path.with_name("v" + path.name))
    name = prepare.prepare_folder(
        "mine2", tmp_path / "train" / "images", tmp_path / "train" / "masks",
        tmp_path / "train" / "classes.txt", tmp_path / "data",
        val_images=tmp_path / "val" / "images", val_masks=tmp_path / "val" / "masks", quiet=True)
    assert sources.open_split(name, "val", tmp_path / "data").keys == ["vimg00", "vimg01",
                                                                      "vimg02"]
    assert custom_name("voc") is None and custom_name("folder/voc") == "voc"
    with pytest.raises(DataError, match="--name='voc'"):
        prepare.prepare_folder("voc", tmp_path, tmp_path, tmp_path / "train" / "classes.txt")


def _error(tmp_path, **kwargs):
    args = dict(images=tmp_path / "images", masks=tmp_path / "masks",
                classes=tmp_path / "classes.txt", data_dir=tmp_path / "data", quiet=True)
    args.update(kwargs)
    with pytest.raises(DataError) as info:
        prepare.prepare_folder("bad", args.pop("images"), args.pop("masks"), args.pop("classes"),
                               args.pop("data_dir"), **args)
    return str(info.value)


def test_errors_name_the_file(tmp_path):
    _make_folder(tmp_path, n=6)
    images, masks = tmp_path / "images", tmp_path / "masks"
    # an image without its mask, a mask without its image
    (masks / "img01.png").rename(tmp_path / "img01.png")
    assert f"1 image(s) have no mask <name>.png in {masks}: {images / 'img01.jpg'}" in \
        _error(tmp_path)
    (tmp_path / "img01.png").rename(masks / "img01.png")
    (masks / "extra.png").write_bytes((masks / "img01.png").read_bytes())
    assert f"1 mask(s) have no image in {images}: {masks / 'extra.png'}" in _error(tmp_path)
    (masks / "extra.png").unlink()
    # a mask of another size
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(masks / "img02.png")
    assert _error(tmp_path) == (f"{masks / 'img02.png'}: mask is 9x9 (w x h) but its image "
                                f"{images / 'img02.jpg'} is 32x30")
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(masks / "img02.png")
    # a label value outside the classes (found while writing)
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(masks / "img00.png")
    assert _error(tmp_path).endswith(f"{masks / 'img00.png'}: label values [9] outside [0, 5) "
                                     "and the ignore value 255")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "img00.png")
    # the class names, palette and ignore value files
    (tmp_path / "pal.txt").write_text("1 2 3\n1 2\n")
    assert f"{tmp_path / 'pal.txt'}:2: '1 2' is not a colour" in _error(
        tmp_path, palette=tmp_path / "pal.txt")
    assert "ignore value 3: expected 5..255" in _error(tmp_path, ignore_value=3)
    (tmp_path / "two.txt").write_text("a\nb\na\n")
    assert "two.txt: class names ['a'] appear more than once" in _error(
        tmp_path, classes=tmp_path / "two.txt")
    # two files with one stem (the stems are the keys)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "sub" / "img00.jpg")
    assert "two image files named 'img00'" in _error(tmp_path)
    assert not (tmp_path / "data" / "mgd_folder" / "bad" / "1.0.0").exists()


def test_configs_read_it_by_name(tmp_path, tiny_config):
    """configs/own.py and `config.dataset=<name>` give the trainer its data: the class count and
    names, a seeded partition, train batches and eval passes. (A full `python -m mgd_jax.main`
    run on it takes minutes on CI's CPUs; the loop itself is tested on synthetic data.)"""
    from mgd_jax import config_lib
    from mgd_jax.data import input_pipeline
    from mgd_jax.evaluation import evaluate

    _make_folder(tmp_path, n=24)
    data_dir = str(tmp_path / "data")
    prepare.prepare_folder("toys", tmp_path / "images", tmp_path / "masks",
                           tmp_path / "classes.txt", data_dir, quiet=True)
    own = config_lib.load_config_file(ROOT / "configs" / "own.py",
                                      f"dataset=toys,data_dir={data_dir},method=cps,partition=4")
    assert (own.dataset, own.num_classes, own.partition_source) == ("toys", 5, "seeded")
    assert tuple(own.eval.pad_to) == (32, 32) and own.crop_size == 512
    with pytest.raises(ConfigError, match="config.cps.init: is empty"):  # no ImageNet start
        config_lib.validate(own, device_count=8)
    own.cps.init = "none"  # from random weights, deliberately
    config_lib.validate(own, device_count=8)

    config = tiny_config("cps", (data_dir, "toys"))
    streams = input_pipeline.create_streams(config, with_unlabeled=True)
    assert (streams.num_labeled, streams.num_unlabeled) == (6, 15)  # 21 train, 3 val held out
    assert streams.info.class_names == tuple(CLASSES)
    batch = next(iter(streams.train))
    assert batch["labeled"]["image"].shape == (8, 32, 32, 3)
    assert set(np.unique(batch["labeled"]["label"])) <= {*range(NUM_CLASSES), 255}
    passes = list(streams.eval_batches())
    assert sum(int(b["valid"].any(axis=(1, 2)).sum()) for b in passes) == 3
    names = evaluate.class_names(input_pipeline.eval_source(config), config)
    assert names == CLASSES


def _own_config(data_dir, name, arg=""):
    return config_lib.load_config_file(ROOT / "configs" / "own.py",
                                       f"dataset={name},data_dir={data_dir},method=cps{arg}")


def test_unlabeled_images_without_masks_and_a_labeled_list(tmp_path, tiny_config):
    """A folder of unlabeled images (no masks) joins the train split; a run labels the images
    with masks (or those of a list file) and never one without a mask (UniMatch issues #33,
    #72, #79 ask for exactly this)."""
    from mgd_jax import config_lib
    from mgd_jax.data import input_pipeline
    from mgd_jax.runtime.errors import ConfigError

    _make_folder(tmp_path, n=8)
    rng = np.random.default_rng(5)
    (tmp_path / "unlabeled" / "more").mkdir(parents=True)
    for i in range(10):
        image = rng.integers(0, 256, (30 + i, 32, 3), np.uint8)
        sub = "more/" if i == 4 else ""
        Image.fromarray(image).save(tmp_path / "unlabeled" / f"{sub}u{i:02d}.jpg", quality=95)
    data_dir = tmp_path / "data"
    assert prepare_main.main([
        "prepare_main", "--dataset=folder", "--name=mixed", f"--images={tmp_path / 'images'}",
        f"--masks={tmp_path / 'masks'}", f"--classes={tmp_path / 'classes.txt'}",
        f"--unlabeled_images={tmp_path / 'unlabeled'}", "--val_fraction=0.25",
        f"--data_dir={data_dir}"]) == 0
    unlabeled = [f"u{i:02d}" for i in range(10)]
    train = sources.open_split("mixed", "train", data_dir)
    val = sources.open_split("mixed", "val", data_dir)
    assert len(train) == 6 + 10 and len(val) == 2  # val is held out of the masked images only
    assert train.unlabeled_only == set(unlabeled) and not val.unlabeled_only
    assert not set(val.keys) & set(unlabeled)
    for key in unlabeled:
        ex = train[train.index_of(key)]
        assert (ex["label"] == 255).all() and ex["image"].shape[:2] == ex["label"].shape
    masked = sorted(set(train.keys) - set(unlabeled))

    own = _own_config(data_dir, "mixed")
    assert own.partition_source == "masks" and own.labeled_list == ""
    own.cps.init = "none"
    config_lib.validate(own)
    config = tiny_config("cps", (str(data_dir), "mixed"), partition_source="masks")
    streams = input_pipeline.create_streams(config, with_unlabeled=True)
    assert (streams.num_labeled, streams.num_unlabeled) == (6, 10)
    batch = next(iter(streams.train))
    assert (batch["labeled"]["label"] != 255).any()

    # a list file of labeled ids: those only; every other train image is unlabeled
    (tmp_path / "labeled.txt").write_text("\n".join(masked[:3]) + "\n")
    own = _own_config(data_dir, "mixed", f",labeled_list={tmp_path / 'labeled.txt'}")
    assert own.partition_source == "masks"
    config.labeled_list = own.labeled_list
    labeled, rest, how = input_pipeline.partition_keys(config, train.keys,
                                                       unlabeled_only=train.unlabeled_only)
    assert labeled == masked[:3] and rest == sorted(masked[3:] + unlabeled)
    assert "labeled.txt" in how
    streams = input_pipeline.create_streams(config, with_unlabeled=True)
    assert (streams.num_labeled, streams.num_unlabeled) == (3, 13)

    # a seeded draw never labels an image without a mask
    config.labeled_list, config.partition_source, config.partition = "", "seeded", 2
    labeled, rest, _ = input_pipeline.partition_keys(config, train.keys,
                                                     unlabeled_only=train.unlabeled_only)
    assert len(labeled) == 3 and set(labeled) <= set(masked) and set(unlabeled) <= set(rest)

    # refusals, each naming what is wrong
    config.partition_source = "masks"
    for ids, message in (([masked[0], "u03"], "prepared without a mask.*u03"),
                         (["nope"], "not in the train split: nope")):
        (tmp_path / "bad.txt").write_text("\n".join(ids) + "\n")
        config.labeled_list = str(tmp_path / "bad.txt")
        with pytest.raises(DataError, match=message):
            input_pipeline.partition_keys(config, train.keys, unlabeled_only=train.unlabeled_only)
    config.partition_source = "seeded"
    with pytest.raises(ConfigError, match="labeled_list=.* is read with partition_source=masks"):
        input_pipeline.partition_keys(config, train.keys)
    with pytest.raises(ConfigError, match="labeled_list='missing.txt': no such file"):
        _own_config(data_dir, "mixed", ",labeled_list=missing.txt")
    # an unlabeled image named like a labeled one
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "unlabeled" / "img01.png")
    with pytest.raises(DataError, match=r"1 unlabeled image\(s\) have the name of a labeled one"):
        prepare.prepare_folder("clash", tmp_path / "images", tmp_path / "masks",
                               tmp_path / "classes.txt", data_dir, quiet=True,
                               unlabeled_images=tmp_path / "unlabeled")
