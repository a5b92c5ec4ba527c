"""Training a paper config (VOC, Cityscapes, or own data on the VOC recipe) with an empty init
field is refused, naming the field and the opt-out; `none` trains from random weights on
purpose; the synthetic dataset (tests, demo) needs neither, and the demo writes `none` out."""

import os

import jax
import numpy as np
import pytest

from mgd_jax import config_lib, main
from mgd_jax.methods import base
from mgd_jax.runtime.errors import ConfigError

from conftest import make_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg):
    from test_config import load as load_config

    return load_config(name, arg)


def refusal(field, dataset):
    return (f"config.{field}: is empty: training on {dataset!r} starts from an ImageNet backbone "
            f"(docs/weights.md: mgd-import --backbone_only); pass --config.{field}=DIR, or "
            f"--config.{field}=none to train from random weights deliberately")


@pytest.mark.parametrize("name, arg, field", [
    ("voc", "method=supervised", "student_init"),
    ("voc", "method=cps,teacher=wide_resnet50_2", "cps.init"),
    ("cityscapes", "method=supervised,student=mobilenet_v2", "student_init"),
    ("cityscapes", "method=cps", "cps.init"),
])
def test_an_empty_init_is_refused_unless_none_or_a_network(name, arg, field, tmp_path):
    c = load(name, arg)
    with pytest.raises(ConfigError) as refused:
        config_lib.validate(c, device_count=8)
    assert str(refused.value) == refusal(field, c.dataset)
    other = "cps.init" if field == "student_init" else "student_init"
    *parents, leaf = field.split(".")
    target = c.cps if parents else c
    target[leaf] = base.RANDOM_INIT
    config_lib.validate(c, device_count=8)  # deliberately from random weights
    target[leaf] = str(tmp_path)  # a network directory (its contents are read at the start)
    config_lib.validate(c, device_count=8)
    target[leaf] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"config.{field}: '.*missing' does not exist"):
        config_lib.validate(c, device_count=8)
    target[leaf] = ""
    if other == "student_init":
        c.student_init = base.RANDOM_INIT  # the other method's field does not count
    else:
        c.cps.init = base.RANDOM_INIT
    with pytest.raises(ConfigError, match=f"^config.{field}: is empty"):
        config_lib.validate(c, device_count=8)


def test_mgd_is_refused_after_its_teachers_are_named(tmp_path):
    c = load("voc", "method=mgd")
    c.teacher_deep.checkpoint = c.teacher_wide.checkpoint = str(tmp_path)
    with pytest.raises(ConfigError, match="^config.student_init: is empty"):
        config_lib.validate(c, device_count=8)


def test_synthetic_data_needs_no_init(synthetic_dir):
    for method in ("supervised", "cps", "mgd"):
        c = make_tiny_config(method, synthetic_dir)
        if method == "mgd":
            c.teacher_deep.checkpoint = c.teacher_wide.checkpoint = ROOT  # any directory
        assert (c.student_init, c.cps.init) == ("", "")
        config_lib.validate(c)


def test_the_command_line_refusal_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    argv = ["main", "--config=configs/voc.py:method=cps", f"--workdir={workdir}"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", argv)
    assert main.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: " + refusal("cps.init", "mgd_voc_aug")
    assert not workdir.exists()


class Model:
    """A stand-in network: its variables, without a compile of a real one."""

    def init(self, rng, x, train):
        del x, train
        return {"params": {"w": jax.random.normal(rng, (3,))}, "batch_stats": {}}


def test_none_is_the_fresh_initialisation(tiny_config, monkeypatch):
    from mgd_jax import network_dir

    def no_reading(directory):
        raise AssertionError(f"read {directory}")

    monkeypatch.setattr(network_dir, "load_variables", no_reading)
    config, key = tiny_config("supervised"), jax.random.key(0)
    fresh = base.init_network(key, Model(), config, "")
    none = base.init_network(key, Model(), config, base.RANDOM_INIT)
    np.testing.assert_array_equal(fresh["params"]["w"], none["params"]["w"])
    with pytest.raises(AssertionError, match="read /some/backbone"):
        base.init_network(key, Model(), config, "/some/backbone")


def test_the_demo_says_where_it_starts_from_scratch():
    from test_demo import demo_config

    from mgd_jax.workflows import demo

    c = demo_config(None)
    for stage in ("pretrain_deep", "student_supervised", "student_mgd"):
        assert demo.stage_config(c, stage, "/w").student_init == base.RANDOM_INIT, stage
    assert demo.stage_config(c, "teacher_deep", "/w").cps.init == "/w/pretrain_deep/export"
    without_pretraining = demo_config(None)
    without_pretraining.stages = "teacher_deep,teacher_wide,student_supervised,student_mgd"
    for stage in ("teacher_deep", "teacher_wide"):
        assert demo.stage_config(without_pretraining, stage, "/w").cps.init == base.RANDOM_INIT
