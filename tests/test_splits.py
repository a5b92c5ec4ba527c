"""data.splits: list parsing (both formats), the standard lists' counts, seeded partitions."""

import warnings
from fractions import Fraction
from pathlib import Path

import pytest

from mgd_jax.data import splits
from mgd_jax.data.sources import DataError

# CI keeps a copy of shared/ beside the clone; the lists are reference data, never vendored.
SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"

VOC_COUNTS = {16: (662, 9920), 8: (1323, 9259), 4: (2646, 7936), 2: (5291, 5291)}
CITY_COUNTS = {16: (186, 2789), 8: (372, 2603), 4: (744, 2231), 2: (1488, 1487)}


@pytest.fixture(scope="module")
def split_dir():
    if not (SPLITS / "voc" / "train_aug.txt").is_file():
        raise FileNotFoundError(
            f"reference split lists missing at {SPLITS}: the tests expect a copy of shared/ "
            "beside the repository"
        )
    return SPLITS


def test_line_key_formats():
    assert splits.line_key("2007_000032") == "2007_000032"
    assert splits.line_key("2007_000032\r\n") == "2007_000032"
    city = "/images/train/jena_000078_000019.png\t/segmentation/train/jena_000078_000019_gtFine.png"
    assert splits.line_key(city) == "jena_000078_000019"
    assert splits.line_key("leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png") == (
        "lindau_000001_000019"
    )
    deeplab = "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png"
    assert splits.line_key(deeplab) == "2007_000032"


def test_read_list_crlf_blank_and_duplicates(tmp_path):
    p = tmp_path / "l.txt"
    p.write_bytes(b"a_1\r\nb_2\r\n\r\n  c_3  \r\nb_2\r\n")
    with pytest.warns(UserWarning, match="duplicate"):
        assert splits.read_list(p) == ["a_1", "b_2", "c_3"]
    with pytest.raises(DataError, match="nope.txt"):
        splits.read_list(tmp_path / "nope.txt")


@pytest.mark.parametrize("p", [16, 8, 4, 2])
def test_standard_voc_lists(split_dir, p):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the train_aug lists do not overlap
        lab, unl = splits.standard_lists("voc", p, split_dir / "voc")
    assert (len(lab), len(unl)) == VOC_COUNTS[p]
    train_aug = splits.read_list(split_dir / "voc" / "train_aug.txt")
    assert len(train_aug) == 10582
    splits.check_disjoint_cover(lab, unl, train_aug)
    assert splits.labeled_count(len(train_aug), Fraction(1, p)) == len(lab)


@pytest.mark.parametrize("p", [16, 8, 4, 2])
def test_standard_cityscapes_lists(split_dir, p):
    lab, unl = splits.standard_lists("cityscapes", p, split_dir / "cityscapes")
    assert (len(lab), len(unl)) == CITY_COUNTS[p]
    train = splits.read_list(split_dir / "cityscapes" / "train.txt")
    assert len(train) == 2975
    assert all(k.count("_") >= 2 and not k.endswith((".png", "_gtFine")) for k in lab)
    splits.check_disjoint_cover(lab, unl, train)
    assert splits.labeled_count(len(train), 1 / p) == len(lab)


def test_val_lists(split_dir):
    assert len(splits.read_list(split_dir / "voc" / "val.txt")) == 1449
    val = splits.read_list(split_dir / "cityscapes" / "val.txt")
    assert len(val) == 500 and val[0] == "frankfurt_000001_066574"


def test_pseudoseg_overlap_warns(split_dir):
    with pytest.warns(UserWarning, match="share 1 id"):
        lab, unl = splits.standard_lists("voc", 8, split_dir / "voc", prefix="pseudoseg")
    assert "\r" not in "".join(lab + unl)
    assert set(lab) | set(unl) <= set(splits.read_list(split_dir / "voc" / "train.txt"))


def test_standard_lists_cps_layout_and_missing(tmp_path):
    d = tmp_path / "DATA" / "city" / "config_new" / "subset_train"
    d.mkdir(parents=True)
    line = "/images/train/{0}.png\t/segmentation/train/{0}_gtFine.png\n"
    (d / "train_aug_labeled_1-8.txt").write_text(line.format("aachen_000000_000019"))
    (d / "train_aug_unlabeled_1-8.txt").write_text(line.format("aachen_000001_000019"))
    assert splits.standard_lists("cityscapes", 8, tmp_path / "DATA" / "city") == (
        ["aachen_000000_000019"], ["aachen_000001_000019"])
    assert splits.standard_lists("cityscapes", 8, tmp_path) == (
        ["aachen_000000_000019"], ["aachen_000001_000019"])
    with pytest.raises(DataError, match="train_aug_labeled_1-4.txt"):
        splits.standard_lists("cityscapes", 4, tmp_path)


KEYS = [f"img_{i:05d}" for i in range(10582)]


@pytest.mark.parametrize("p,expected", [(16, 662), (8, 1323), (4, 2646), (2, 5291)])
def test_partition_sizes_disjoint_covering(p, expected):
    lab, unl = splits.partition(KEYS, fraction=1 / p, seed=0)
    assert len(lab) == expected and len(unl) == len(KEYS) - expected
    splits.check_disjoint_cover(lab, unl, KEYS)
    assert lab == sorted(lab) and unl == sorted(unl)


def test_partition_deterministic_order_free_nested():
    a = splits.partition(KEYS, fraction=Fraction(1, 8), seed=3)
    b = splits.partition(list(reversed(KEYS)), fraction=0.125, seed=3)
    assert a == b
    assert splits.partition(KEYS, fraction=1 / 8, seed=4)[0] != a[0]
    small = splits.partition(KEYS, fraction=1 / 16, seed=3)[0]
    assert set(small) <= set(a[0])
    lab, unl = splits.partition(KEYS[:10], count=3, seed=0)
    assert len(lab) == 3 and len(unl) == 7
    assert splits.partition(KEYS[:10], fraction=1, seed=0) == (sorted(KEYS[:10]), [])


def test_partition_errors():
    with pytest.raises(ValueError, match="exactly one"):
        splits.partition(KEYS, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        splits.partition(KEYS, fraction=1.5, seed=0)
    with pytest.raises(DataError, match="not unique"):
        splits.partition(["a", "b", "a"], count=1, seed=0)
    with pytest.raises(DataError, match="in both"):
        splits.check_disjoint_cover(["a"], ["a", "b"], ["a", "b"])
    with pytest.raises(DataError, match="in neither"):
        splits.check_disjoint_cover(["a"], [], ["a", "b"])
