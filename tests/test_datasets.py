"""data.datasets: the dataset table (classes, colours, splits, aliases) and its palettes."""

import pytest

from mgd_jax.data import synthetic
from mgd_jax.data.datasets import (
    CITYSCAPES_LABELS,
    DATASETS,
    Dataset,
    DatasetInfo,
    as_dataset,
    palette_for,
    resolve,
)
from mgd_jax.runtime.errors import DataError

from conftest import need


def test_dataset_table():
    voc, city, syn = DATASETS["voc"], DATASETS["cityscapes"], DATASETS["synthetic"]
    assert (voc.num_classes, voc.builder, voc.train_split, voc.eval_split) == (
        21, "mgd_voc_aug", "train_aug", "val")
    assert voc.split_sizes == {"train_aug": 10582, "val": 1449}
    assert voc.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert (city.num_classes, city.split_sizes) == (19, {"train": 2975, "val": 500})
    assert city.palette[0] == (128, 64, 128)
    assert syn.num_classes == 5 and syn.config == "default"
    for info in (voc, city, syn):
        assert info.ignore_index == 255 and len(info.class_names) == info.num_classes
        lut = info.palette_array()
        assert lut.shape == (256, 3) and tuple(lut[255]) == (224, 224, 192)
        assert DatasetInfo.from_json(info.to_json()) == info
    assert resolve("mgd_voc_aug").info is voc and resolve("city").info is city
    assert resolve("synthetic/abc") == Dataset("synthetic/abc", syn, builder_config="abc")
    # a name that is no table entry is a dataset of the user's own, found by its sidecar
    assert resolve("coco") == Dataset("coco", None, own="coco")
    assert resolve("folder/coco").own == "coco"
    with pytest.raises(DataError, match="Unknown dataset"):
        resolve("coco/extra")
    with pytest.raises(DataError, match="Unknown dataset"):
        resolve("coco").table()
    assert as_dataset(resolve("voc")).info is voc


def test_cityscapes_tables_equal_the_official_label_table():
    need("cityscapesscripts")
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {lb.trainId: lb for lb in labels if 0 <= lb.trainId < 255}
    city = DATASETS["cityscapes"]
    assert city.class_names == tuple(by_train_id[i].name for i in range(19))
    assert city.palette == tuple(tuple(by_train_id[i].color) for i in range(19))
    assert CITYSCAPES_LABELS == tuple((lb.id, lb.name, lb.trainId) for lb in labels)


def test_cityscapes_label_ids_name_the_train_classes():
    train = {t: name for _, name, t in CITYSCAPES_LABELS if 0 <= t < 255}
    assert tuple(train[i] for i in range(19)) == DATASETS["cityscapes"].class_names
    assert [i for i, _, _ in CITYSCAPES_LABELS] == [*range(34), -1]


def test_synthetic_entry_is_the_default_spec():
    assert synthetic.dataset_info(synthetic.SyntheticSpec()) == DATASETS["synthetic"]


def test_palette_for_a_named_dataset():
    assert (palette_for(19, "cityscapes") == DATASETS["cityscapes"].palette_array()).all()
    with pytest.raises(DataError, match="21 classes, the network 19"):
        palette_for(19, "voc")
