"""Config files, argument parsing and validation (which must fail before anything compiles)."""

import os

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main.py uses)

from mgd_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def test_parse_arg_types_and_flags():
    c = config_lib.parse_arg("method=cps,partition=4,smoke", method="mgd", partition=8, smoke=False)
    assert (c.method, c.partition, c.smoke) == ("cps", 4, True)
    with pytest.raises(ValueError, match="'nope' is unknown"):
        config_lib.parse_arg("nope=1", method="mgd")
    with pytest.raises(ValueError, match="partition"):
        config_lib.parse_arg("partition", partition=8)
    # a tuple default takes a list; its further items follow as bare values
    c = config_lib.parse_arg("seeds=3,1,4,smoke", seeds=(0,), smoke=False)
    assert (c.seeds, c.smoke) == ((3, 1, 4), True)
    assert config_lib.parse_arg("", seeds=(0,)).seeds == (0,)
    with pytest.raises(ValueError, match="seeds='x': expected a int"):
        config_lib.parse_arg("seeds=1,x", seeds=(0,))


@pytest.mark.parametrize(
    "arg, lr, lam1, lam2, epochs",
    [
        ("method=mgd,student=resnet18,partition=8", 0.0025, 0.002, 100.0, 34),
        ("method=mgd,student=mobilenet_v2,partition=16", 0.0035, 0.0005, 50.0, 32),
        ("method=supervised,student=resnet18,partition=2", 0.0025, 0.002, 100.0, 60),
    ],
)
def test_voc_recipe_numbers(arg, lr, lam1, lam2, epochs):
    c = load("voc", arg)
    got = (c.lr, c.loss.lambda_image, c.loss.lambda_region, c.num_epochs)
    assert got == (lr, lam1, lam2, epochs)
    assert (c.batch_size, c.replica_batch, c.weight_decay, c.crop_size) == (8, 2, 4e-4, 512)
    assert c.num_classes == 21 and c.eval.mode == "whole"


def test_voc_teacher_and_cityscapes_recipes():
    wide = load("voc", "method=cps,teacher=wide_resnet34_2")
    assert wide.cps.backbone == "wide_resnet50_2" and wide.lr == 0.001
    city = load("cityscapes", "method=mgd,student=resnet18,partition=8")
    assert (city.batch_size, city.lr, city.weight_decay, city.num_epochs) == (16, 0.0025, 8e-4, 137)
    assert city.loss.ohem and city.loss.ohem_min_kept == 100000
    assert (city.loss.lambda_image, city.eval.mode, city.eval.crop) == (0.001, "sliding", 800)
    teacher = load("cityscapes", "method=cps,partition=8")
    assert (teacher.batch_size, teacher.replica_batch, teacher.cps.weight) == (8, 1, 5.0)
    assert teacher.loss.ohem_min_kept == 50000


def test_official_iteration_arithmetic():
    # docs/method.md §4.2: VOC 1/8 -> 1157 iterations per epoch, Cityscapes student 1/16 -> 174.
    assert config_lib.iters_per_epoch(10582, 8, 8) == 1157
    assert config_lib.iters_per_epoch(10582, 16, 8) == 1240
    assert config_lib.iters_per_epoch(2975, 16, 16) == 174
    assert config_lib.iters_per_epoch(2975, 8, 8) == 325


def valid_config(tmp_path):
    c = load("voc", "method=supervised")
    c.split_dir = str(tmp_path)
    c.student_init = "none"  # from random weights, deliberately (tests/test_refusals.py)
    return c


def test_validate_accepts_a_good_config(tmp_path):
    config_lib.validate(valid_config(tmp_path), device_count=8)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("method", "kd", "config.method"),
        ("batch_size", 6, "config.batch_size"),  # not divisible by 8 devices
        ("replica_batch", 3, "config.replica_batch"),
        ("pairing", "same", "config.pairing"),
        ("precision", "fp8", "config.precision"),
        ("resize", "bicubic", "config.resize"),
        ("lr", -1.0, "config.lr"),
        ("split_dir", "/does/not/exist", "config.split_dir"),
        ("student", "resnet50", "config.student"),
    ],
)
def test_validate_names_the_field(tmp_path, field, value, match):
    c = valid_config(tmp_path)
    c[field] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c, device_count=8)


def test_validate_mgd_needs_teachers(tmp_path):
    c = valid_config(tmp_path)
    c.method = "mgd"
    with pytest.raises(ValueError, match="config.teacher_deep.checkpoint"):
        config_lib.validate(c)
    c.teacher_deep.checkpoint = str(tmp_path)
    c.teacher_wide.checkpoint = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.teacher_wide.checkpoint.*does not exist"):
        config_lib.validate(c)


def test_validate_sliding_crop_larger_than_padded(tmp_path):
    c = valid_config(tmp_path)
    c.eval.mode = "sliding"
    c.eval.crop = 1024
    with pytest.raises(ValueError, match="config.eval.crop"):
        config_lib.validate(c)


def test_smoke_variant_is_small():
    c = load("voc", "method=mgd,smoke")
    assert c.num_train_steps == 3 and c.crop_size == 64 and c.eval.max_examples == 4


def test_standard_partitions_need_no_split_dir():
    """VOC and Cityscapes ship their standard partitions; other datasets need lists or seeded."""
    for name in ("voc", "cityscapes"):
        c = load(name, "method=supervised")
        c.student_init = "none"
        assert c.split_dir == "" and c.partition_source == "lists"
        config_lib.validate(c, device_count=8)
    c.dataset, c.num_classes = "mgd_synthetic", 5
    with pytest.raises(ValueError, match="config.split_dir: is empty and 'mgd_synthetic' has no"):
        config_lib.validate(c, device_count=8)
    c.partition_source = "seeded"
    config_lib.validate(c, device_count=8)
