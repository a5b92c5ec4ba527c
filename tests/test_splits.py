"""data.splits: the built-in standard partitions (the shipped data itself), list parsing (both
formats), user lists overriding the built-in ones, seeded partitions."""

import hashlib
import re
from fractions import Fraction

import pytest

from mgd_jax.data import splits
from mgd_jax.data.sources import DataError

VOC_COUNTS = {16: (662, 9920), 8: (1323, 9259), 4: (2646, 7936), 2: (5291, 5291)}
CITY_COUNTS = {16: (186, 2789), 8: (372, 2603), 4: (744, 2231), 2: (1488, 1487)}
SPLIT_SIZE = {"voc": 10582, "cityscapes": 2975}
COUNTS = {"voc": VOC_COUNTS, "cityscapes": CITY_COUNTS}
KEY_FORMAT = {"voc": r"\d{4}_\d{6}", "cityscapes": r"[a-z]+_\d{6}_\d{6}"}
# sha256 (first 16 hex digits) of the sorted labeled ids joined by newlines, computed from the CPS /
# MGD list files (train_aug_labeled_1-<p>.txt) when the package data was written from them.
CHECKSUMS = {
    ("voc", 16): "baa85754594fcd33", ("voc", 8): "c9ca45b4e688d408",
    ("voc", 4): "fd0e8dca3dac524c", ("voc", 2): "5338f277730143e0",
    ("cityscapes", 16): "1e5363dd012cdc46", ("cityscapes", 8): "6b3b52bab110157a",
    ("cityscapes", 4): "6856046a4415296a", ("cityscapes", 2): "2b3183629a3a9f1a",
}


def _train_keys(dataset, labeled_2):
    """A stand-in for a prepared train split: every 1/2 labeled id plus made-up ids up to the
    standard size."""
    fill = [f"zz_{i:06d}_000019" for i in range(SPLIT_SIZE[dataset] - len(labeled_2))]
    return list(labeled_2) + fill


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_builtin_partitions_are_the_standard_ones(dataset):
    assert splits.has_builtin(dataset) and not splits.has_builtin("synthetic")
    labeled = {p: splits.builtin_labeled(dataset, p) for p in splits.STANDARD_PARTITIONS}
    keys = _train_keys(dataset, labeled[2])
    for p, (n_lab, n_unl) in COUNTS[dataset].items():
        lab = labeled[p]
        assert lab == sorted(set(lab)), "sorted, no duplicates"
        assert all(re.fullmatch(KEY_FORMAT[dataset], k) for k in lab)
        digest = hashlib.sha256("\n".join(lab).encode()).hexdigest()[:16]
        assert digest == CHECKSUMS[dataset, p]
        assert len(lab) == splits.labeled_count(SPLIT_SIZE[dataset], Fraction(1, p)) == n_lab
        got_lab, unl = splits.builtin_partition(dataset, p, keys)
        assert got_lab == lab and len(unl) == n_unl
        splits.check_disjoint_cover(got_lab, unl, keys)
    for finer, coarser in zip((16, 8, 4), (8, 4, 2), strict=True):
        assert set(labeled[finer]) < set(labeled[coarser])
    # each id is listed once in the shipped file (the sections do not overlap)
    sections = splits._read_builtin(dataset)
    assert sum(map(len, sections.values())) == len(set().union(*sections.values()))


def test_builtin_partition_errors_and_warnings():
    lab = splits.builtin_labeled("cityscapes", 16)
    with pytest.raises(DataError, match=r"1/16: 1 of the 186 standard labeled ids.*" + lab[0]):
        splits.builtin_partition("cityscapes", 16, lab[1:] + ["x_000000_000000"])
    with pytest.warns(UserWarning, match="has 187 images, the standard one 2975"):
        assert splits.builtin_partition("city", 16, lab + ["x_000000_000000"]) == (
            lab, ["x_000000_000000"])
    with pytest.raises(DataError, match="not 1/3"):
        splits.builtin_labeled("voc", 3)
    with pytest.raises(DataError, match="no built-in standard partitions"):
        splits.builtin_labeled("synthetic", 8)


def test_user_lists_override_the_builtin_ones(tmp_path):
    """A user's list files in either format (here: the standard partition written out) give the
    same partition through config.split_dir as the built-in data."""
    from mgd_jax import config_lib
    from mgd_jax.data import input_pipeline

    lab = splits.builtin_labeled("cityscapes", 8)
    keys = _train_keys("cityscapes", splits.builtin_labeled("cityscapes", 2))
    unl = sorted(set(keys) - set(lab))
    line = "/images/train/{0}.png\t/segmentation/train/{0}_gtFine.png\r\n"
    folder = tmp_path / "config_new" / "subset_train"
    folder.mkdir(parents=True)
    (folder / "train_aug_labeled_1-8.txt").write_text("".join(map(line.format, lab[::-1])))
    (folder / "train_aug_unlabeled_1-8.txt").write_text("".join(map(line.format, unl)))
    c = config_lib.base_config()
    c.dataset, c.partition = "mgd_cityscapes", 8
    builtin = input_pipeline.partition_keys(c, keys)
    assert builtin[:2] == (lab, unl) and "built in" in builtin[2]
    c.split_dir = str(tmp_path)
    files = input_pipeline.partition_keys(c, keys)
    assert files[:2] == (lab, unl) and str(tmp_path) in files[2]
    # a user's own lists win: a different labeled set
    (folder / "train_aug_labeled_1-8.txt").write_text(line.format(unl[0]))
    (folder / "train_aug_unlabeled_1-8.txt").write_text("".join(map(line.format, lab)))
    assert input_pipeline.partition_keys(c, keys)[0] == [unl[0]]


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


def test_voc_lists_crlf_and_overlap_warns(tmp_path):
    """VOC-format lists; the CPS `pseudoseg` lists have CRLF ends and share one id per pair."""
    (tmp_path / "pseudoseg_labeled_1-8.txt").write_bytes(b"2007_000032\r\n2007_000039\r\n")
    (tmp_path / "pseudoseg_unlabeled_1-8.txt").write_bytes(b"2007_000039\r\n2007_000063\r\n")
    with pytest.warns(UserWarning, match="share 1 id"):
        lab, unl = splits.standard_lists("voc", 8, tmp_path, prefix="pseudoseg")
    assert (lab, unl) == (["2007_000032", "2007_000039"], ["2007_000039", "2007_000063"])


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
