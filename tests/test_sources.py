"""data.sources: open_split / PreparedSplit contract, keys_to_indices, errors."""

import pickle
import shutil

import numpy as np
import pytest

from mgd_jax.data import prepare
from mgd_jax.data.sources import SIDECAR, dataset_dir, keys_to_indices, open_split
from mgd_jax.runtime.errors import DataError

SIZES = dict(num_classes=3, image_size=32, num_train=10, num_val=4, seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare.ensure_synthetic(d, **SIZES)
    return d


NAME = "synthetic/c3_s32_n10_v4_seed5"


def test_source_contract(data_dir):
    src = open_split(NAME, "train", data_dir)
    assert len(src) == 10 and src.keys == [f"train_{i:06d}" for i in range(10)]
    assert src.info.num_classes == 3 and src.info.class_names == (
        "background", "disc+stripes", "disc+dots")
    ex = src[3]
    assert ex["key"] == "train_000003"
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == (32, 32) and ex["label"].dtype == np.uint8
    assert set(np.unique(ex["label"])) <= {0, 1, 2, 255}
    np.testing.assert_array_equal(src[-1]["image"], src[9]["image"])
    batch = src.__getitems__([1, 3])
    np.testing.assert_array_equal(batch[1]["label"], ex["label"])
    with pytest.raises(IndexError):
        src[10]
    assert [e["key"] for e in src] == src.keys


def test_source_pickles_without_handles(data_dir):
    src = open_split(NAME, "val", data_dir)
    first = src[0]  # opens the array_record files
    blob = pickle.dumps(src)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    assert clone._ds is None
    np.testing.assert_array_equal(clone[0]["image"], first["image"])


def test_grain_reads_a_source(data_dir):
    grain = pytest.importorskip("grain")
    src = open_split(NAME, "train", data_dir)
    ds = grain.MapDataset.source(src).map(lambda e: e["key"])
    assert [ds[i] for i in range(3)] == src.keys[:3]


def test_keys_to_indices(data_dir):
    src = open_split(NAME, "train", data_dir)
    np.testing.assert_array_equal(keys_to_indices(src, ["train_000007", "train_000002"]), [7, 2])
    with pytest.raises(DataError, match=r"2 id\(s\) not found in PreparedSplit\(synthetic:train.*"
                                        r"nope_1, nope_2"):
        keys_to_indices(src, ["train_000001", "nope_1", "nope_2"])
    assert keys_to_indices(["a", "b"], ["b"]).tolist() == [1]


def test_not_prepared_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"not prepared.*mgd-prepare "
                                        r"--dataset=voc --manual_dir="):
        open_split("voc", "val", tmp_path)
    with pytest.raises(DataError, match=r"Prepared variants found .*c3_s32_n10_v4_seed5"):
        open_split("synthetic", "train", data_dir)
    with pytest.raises(DataError, match=r"no split 'test'; available: \['train', 'val'\]"):
        open_split(NAME, "test", data_dir)


def test_directory_without_sidecar_is_not_a_dataset(tmp_path, data_dir):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    (dataset_dir(NAME, copy) / SIDECAR).unlink()
    with pytest.raises(DataError, match="not prepared"):
        open_split(NAME, "train", copy)
    with pytest.raises(DataError, match="exists but is not a complete"):
        prepare.prepare_synthetic(copy, quiet=True, **SIZES)
    prepare.prepare_synthetic(copy, quiet=True, overwrite=True, **SIZES)
    assert len(open_split(NAME, "train", copy)) == 10


def test_plain_tfds_api_also_writes_sidecar(tmp_path):
    import tensorflow_datasets as tfds

    import mgd_jax.data.builders  # noqa: F401  (registers the builders)

    builder = tfds.builder("mgd_synthetic", data_dir=tmp_path)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    src = open_split("synthetic", "val", tmp_path)
    assert len(src) == 100
    ds = tfds.data_source("mgd_synthetic", split="val", data_dir=tmp_path)
    assert ds[5]["key"].decode() == src.keys[5]
