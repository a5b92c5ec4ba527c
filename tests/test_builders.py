"""The tfds builders on small fake raw trees: VOCdevkit + SBD (.mat) / SegmentationClassAug, the
CPS/MGD pascal_voc layout, Cityscapes zips and folders; the synthetic generator; bad inputs."""

import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mgd_jax.data import prepare, synthetic
from mgd_jax.data.builders import common
from mgd_jax.data.datasets import DATASETS, voc_colormap
from mgd_jax.data.sources import dataset_dir, open_split
from mgd_jax.runtime.errors import DataError
from mgd_jax.tools import prepare as prepare_main

# ----------------------------------------------------------------------------- fake VOC trees

H, W = 18, 22


def _rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _save_jpeg(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)


def _mask(seed, num_classes=21, h=H, w=W):
    m = np.random.default_rng(seed).integers(0, num_classes, (h, w)).astype(np.uint8)
    m[0, :] = 255  # VOC-style ignore border
    return m


def _save_palette_png(path, mask):
    """VOC SegmentationClass: mode 'P' with the VOC palette (index 255 -> (224, 224, 192))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask, mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:21] = voc_colormap(21)
    pal[255] = (224, 224, 192)
    im.putpalette(pal.ravel().tolist())
    im.save(path)


def _save_l_png(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, mode="L").save(path)


def _save_mat(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros(1),
                                      "CategoriesPresent": np.unique(mask)}})


def _write_lines(path, ids, crlf=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n" if crlf else "\n").join(ids).encode() + b"\n")


VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002"], ["2007_000003", "2007_000004"]
SBD_TRAIN, SBD_VAL = ["2007_000002", "2008_000005", "2008_000006"], ["2007_000003", "2008_000007"]
ALL_IDS = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
TRAIN_AUG = ["2007_000001", "2007_000002", "2008_000005", "2008_000006", "2008_000007"]


def make_devkit(root: Path, *, sbd=True, aug=False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """VOCdevkit/VOC2012 + benchmark_RELEASE/dataset (+ SegmentationClassAug); returns the
    expected (image, mask) per id."""
    voc = root / "VOCdevkit" / "VOC2012"
    truth = {}
    for i, k in enumerate(ALL_IDS):
        img, mask = _rgb(i), _mask(100 + i)
        _save_jpeg(voc / "JPEGImages" / f"{k}.jpg", img)
        truth[k] = (np.asarray(Image.open(voc / "JPEGImages" / f"{k}.jpg")), mask)
        if k in VOC_TRAIN + VOC_VAL:
            _save_palette_png(voc / "SegmentationClass" / f"{k}.png", mask)
        if sbd and k in SBD_TRAIN + SBD_VAL:
            _save_mat(root / "benchmark_RELEASE" / "dataset" / "cls" / f"{k}.mat", mask)
        if aug:
            _save_l_png(root / "SegmentationClassAug" / f"{k}.png", mask)
    sets = voc / "ImageSets" / "Segmentation"
    _write_lines(sets / "train.txt", VOC_TRAIN)
    _write_lines(sets / "val.txt", VOC_VAL, crlf=True)
    if sbd:
        _write_lines(root / "benchmark_RELEASE" / "dataset" / "train.txt", SBD_TRAIN)
        _write_lines(root / "benchmark_RELEASE" / "dataset" / "val.txt", SBD_VAL)
    return truth


def _check_split(src, truth, keys):
    assert src.keys == sorted(keys) and len(src) == len(keys)
    for i, k in enumerate(src.keys):
        ex = src[i]
        assert ex["key"] == k
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (H, W, 3)
        # cv2 and PIL decode the same JPEG within a level or two.
        assert np.abs(ex["image"].astype(int) - truth[k][0]).max() <= 3
        assert ex["label"].dtype == np.uint8
        np.testing.assert_array_equal(ex["label"], truth[k][1])


def test_voc_devkit_with_sbd_mat(tmp_path):
    truth = make_devkit(tmp_path / "raw")
    data = tmp_path / "data"
    prepare.prepare_voc(tmp_path / "raw", data, quiet=True, num_workers=2)
    train = open_split("voc", "train_aug", data)
    _check_split(train, truth, TRAIN_AUG)  # VOC train + SBD train/val - VOC val
    _check_split(open_split("voc", "val", data), truth, VOC_VAL)
    assert open_split("voc", "train", data).split == "train_aug"
    assert train.info.num_classes == 21 and train.info.class_names[15] == "person"
    assert train.info.palette[15] == (192, 128, 128)


def test_voc_palette_masks_are_indices_not_luminance(tmp_path):
    raw = tmp_path / "raw"
    make_devkit(raw)
    mask = np.full((H, W), 15, np.uint8)  # person: colour (192,128,128), luminance ~147
    mask[:, :4] = 255
    _save_palette_png(raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000003.png", mask)
    assert Image.open(raw / "VOCdevkit/VOC2012/SegmentationClass/2007_000003.png").mode == "P"
    prepare.prepare_voc(raw, tmp_path / "data", quiet=True)
    label = open_split("voc", "val", tmp_path / "data")[0]["label"]
    np.testing.assert_array_equal(label, mask)


def test_voc_segmentation_class_aug_only(tmp_path):
    truth = make_devkit(tmp_path / "raw", sbd=False, aug=True)
    prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)
    src = open_split("voc", "train_aug", tmp_path / "data")
    _check_split(src, truth, sorted(set(ALL_IDS) - set(VOC_VAL)))
    meta = (dataset_dir("voc", tmp_path / "data") / "mgd_dataset.json").read_text()
    assert "SegmentationClassAug" in meta


def test_voc_train_list_file(tmp_path):
    truth = make_devkit(tmp_path / "raw")
    lst = tmp_path / "my_train.txt"
    _write_lines(lst, ["2008_000006", "2007_000001"], crlf=True)
    prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", train_list=lst, quiet=True)
    _check_split(open_split("voc", "train_aug", tmp_path / "data"), truth,
                 ["2007_000001", "2008_000006"])


def test_voc_cps_layout(tmp_path):
    root = tmp_path / "DATA" / "pascal_voc"
    truth = {}
    for split, ids in (("train_aug", TRAIN_AUG), ("val", VOC_VAL)):
        for i, k in enumerate(ids):
            img, mask = _rgb(7 * i + len(split)), _mask(i + len(split))
            _save_jpeg(root / split / "image" / f"{k}.jpg", img)
            _save_l_png(root / split / "label" / f"{k}.png", mask)
            truth[k] = (np.asarray(Image.open(root / split / "image" / f"{k}.jpg")), mask)
    _write_lines(root / "train_aug.txt", TRAIN_AUG[:3])
    prepare.prepare_voc(tmp_path / "DATA", tmp_path / "data", quiet=True)
    _check_split(open_split("voc", "train_aug", tmp_path / "data"), truth, TRAIN_AUG[:3])
    _check_split(open_split("voc", "val", tmp_path / "data"), truth, VOC_VAL)


def make_voc_archives(root: Path, downloads: Path) -> dict:
    """The devkit tree of `make_devkit` packed as the two downloads: VOCtrainval_11-May-2012.tar
    (plain tar) and benchmark.tgz (gzip), with the official folder names inside."""
    truth = make_devkit(root)
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "VOCtrainval_11-May-2012.tar", "w") as tar:
        tar.add(root / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(downloads / "benchmark.tgz", "w:gz") as tar:
        tar.add(root / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return truth


def test_voc_archives_read_in_place(tmp_path, monkeypatch):
    truth = make_voc_archives(tmp_path / "raw", tmp_path / "dl")
    # With the archives' real md5 published (the tiny ones here are not the downloads):
    # checked and read in place, nothing extracted.
    for name in ("VOCtrainval_11-May-2012.tar", "benchmark.tgz"):
        monkeypatch.setitem(common.ARCHIVES, name,
                            (common.md5sum(tmp_path / "dl" / name), "", "this test"))
    data = tmp_path / "data"
    prepare.prepare_voc(tmp_path / "dl", data, quiet=True, num_workers=2)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "VOCtrainval_11-May-2012.tar", "benchmark.tgz"]
    _check_split(open_split("voc", "train_aug", data), truth, TRAIN_AUG)
    _check_split(open_split("voc", "val", data), truth, VOC_VAL)
    meta = (dataset_dir("voc", data) / "mgd_dataset.json").read_text()
    assert "benchmark.tgz:benchmark_RELEASE/dataset" in meta and '"SBD cls": 3' in meta


def test_voc_archive_with_another_checksum_is_one_error_line(tmp_path, capsys):
    make_voc_archives(tmp_path / "raw", tmp_path / "dl")
    argv = ["prepare_main", "--dataset=voc", f"--manual_dir={tmp_path / 'dl'}",
            f"--data_dir={tmp_path / 'data'}"]
    assert prepare_main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {tmp_path / 'dl' / 'VOCtrainval_11-May-2012.tar'}: md5 "), err
    assert "is not the published 6cd6e144f989b92b3379bac3b3de84fd" in err[0]
    assert "--skip_checksum" in err[0]
    assert not (tmp_path / "data" / "mgd_voc_aug").exists()
    assert prepare_main.main(argv + ["--skip_checksum"]) == 0  # the escape hatch
    assert len(open_split("voc", "train_aug", tmp_path / "data")) == len(TRAIN_AUG)


def test_voc_missing_manual_files_message(tmp_path):
    with pytest.raises(DataError, match="VOCtrainval_11-May-2012.tar"):
        prepare.prepare_voc(tmp_path, tmp_path / "data", quiet=True)
    make_devkit(tmp_path / "raw", sbd=False)
    with pytest.raises(DataError, match="no SBD annotations"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)


def test_prepare_cli_reports_errors_and_totals(tmp_path, capsys):
    def prepare_voc(manual_dir):
        return prepare_main.main(["prepare_main", "--dataset=voc", f"--manual_dir={manual_dir}",
                                  f"--data_dir={tmp_path}/d"])

    assert prepare_voc(tmp_path) == 2
    assert "benchmark.tgz" in capsys.readouterr().err
    make_devkit(tmp_path / "raw")
    rc = prepare_voc(tmp_path / "raw")
    out = capsys.readouterr()
    assert rc == 0
    assert "train_aug: 5 examples (official 10582)  WARNING" in out.out
    assert "val: 2 examples (official 1449)" in out.out
    # Second run: a no-op.
    assert prepare_voc(tmp_path / "raw") == 0
    assert "already prepared" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad inputs


def _assert_nothing_left(data: Path, dataset="voc"):
    with pytest.raises(DataError, match="not prepared"):
        open_split(dataset, "val", data)
    assert not dataset_dir(dataset, data).exists()
    leftovers = [p for p in data.rglob("*") if "incomplete" in p.name]
    assert not leftovers, leftovers


def test_bad_corrupt_image(tmp_path):
    make_devkit(tmp_path / "raw")
    bad = tmp_path / "raw/VOCdevkit/VOC2012/JPEGImages/2008_000006.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match=r"2008_000006\.jpg: corrupt or unreadable image"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)
    _assert_nothing_left(tmp_path / "data")


def test_bad_mask_size(tmp_path):
    make_devkit(tmp_path / "raw")
    _save_palette_png(tmp_path / "raw/VOCdevkit/VOC2012/SegmentationClass/2007_000004.png",
                      np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DataError, match=r"2007_000004\.png: mask is 22x19 .* is 22x18"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)
    _assert_nothing_left(tmp_path / "data")


def test_bad_label_values(tmp_path):
    make_devkit(tmp_path / "raw")
    mask = _mask(0)
    mask[3, 3] = 21
    mask[4, 4] = 200
    _save_mat(tmp_path / "raw/benchmark_RELEASE/dataset/cls/2008_000005.mat", mask)
    with pytest.raises(DataError, match=r"2008_000005\.mat: label values \[21, 200\] outside"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)
    _assert_nothing_left(tmp_path / "data")


def test_bad_colour_mask(tmp_path):
    make_devkit(tmp_path / "raw")
    path = tmp_path / "raw/VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError, match=r"2007_000001\.png: mask has PIL mode 'RGB'"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)


def test_bad_list_names_missing_id(tmp_path):
    make_devkit(tmp_path / "raw")
    lst = tmp_path / "train.txt"
    _write_lines(lst, ["2007_000001", "2099_123456"])
    with pytest.raises(DataError, match=r"1 of 2 listed ids have no image .*2099_123456"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", train_list=lst, quiet=True)
    (tmp_path / "raw/benchmark_RELEASE/dataset/cls/2008_000007.mat").unlink()
    with pytest.raises(DataError, match=r"have no mask .*2008_000007"):
        prepare.prepare_voc(tmp_path / "raw", tmp_path / "data", quiet=True)
    assert not (tmp_path / "data").exists()  # checked before anything is written


# ----------------------------------------------------------------------------- Cityscapes

# trainId -> labelId, as in the official loaders (MGD/CPS dataloader.py trans_labels).
TRAIN_TO_LABEL_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITY_FILES = {"train": ["aachen_000000_000019", "bochum_000000_000313"],
              "val": ["frankfurt_000000_000294"]}


def test_cityscapes_label_table_every_id():
    lut = common.cityscapes_lut()
    for label_id in range(34):
        expected = (TRAIN_TO_LABEL_ID.index(label_id) if label_id in TRAIN_TO_LABEL_ID else 255)
        assert lut[label_id] == expected, label_id
    assert (lut[34:] == -1).all()
    assert DATASETS["cityscapes"].class_names[0] == "road"
    assert DATASETS["cityscapes"].class_names[18] == "bicycle"


def _city_label_ids(seed, h=16, w=24):
    m = np.random.default_rng(seed).integers(0, 34, (h, w)).astype(np.uint8)
    m.ravel()[:34] = np.arange(34)  # every labelId occurs
    return m


def _expected_train_ids(label_ids):
    lut = np.full(256, 255, np.uint8)
    lut[TRAIN_TO_LABEL_ID] = np.arange(19)
    return lut[label_ids]


def make_cityscapes(root: Path, *, zipped: bool) -> dict:
    truth = {}
    files = {}
    for split, keys in CITY_FILES.items():
        for i, key in enumerate(keys):
            city = key.split("_")[0]
            img = _rgb(i + 10 * len(split), 16, 24)
            ids = _city_label_ids(i + len(split))
            for name, arr in ((f"leftImg8bit/{split}/{city}/{key}_leftImg8bit.png", img),
                              (f"gtFine/{split}/{city}/{key}_gtFine_labelIds.png", ids)):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                files[name] = buf.getvalue()
            truth[key] = (img, _expected_train_ids(ids))
    # Distractors the builder must ignore.
    files["gtFine/train/aachen/aachen_000000_000019_gtFine_color.png"] = b"not used"
    files["README"] = b"readme"
    root.mkdir(parents=True, exist_ok=True)
    if zipped:
        for archive, prefix in (("leftImg8bit_trainvaltest.zip", "leftImg8bit/"),
                                ("gtFine_trainvaltest.zip", "gtFine/")):
            with zipfile.ZipFile(root / archive, "w") as zf:
                for name, data in files.items():
                    if name.startswith(prefix) or name == "README":
                        zf.writestr(name, data)
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return truth


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "folder"])
def test_cityscapes(tmp_path, zipped):
    truth = make_cityscapes(tmp_path / "raw", zipped=zipped)
    if zipped:  # tiny zips of the official names: not the published md5
        with pytest.raises(DataError, match=r"leftImg8bit_trainvaltest\.zip: md5 [0-9a-f]{32} is "
                                            r"not the published 0a6e97e94b616a514066c9e2adb0c97f"):
            prepare.prepare_cityscapes(tmp_path / "raw", tmp_path / "data", quiet=True)
    prepare.prepare_cityscapes(tmp_path / "raw", tmp_path / "data", quiet=True,
                               skip_checksum=zipped)
    for split, keys in CITY_FILES.items():
        src = open_split("cityscapes", split, tmp_path / "data")
        assert src.keys == sorted(keys)
        for i, key in enumerate(src.keys):
            ex = src[i]
            np.testing.assert_array_equal(ex["image"], truth[key][0])  # PNG: lossless
            np.testing.assert_array_equal(ex["label"], truth[key][1])
    assert src.info.num_classes == 19


def test_cityscapes_cps_layout(tmp_path):
    root = tmp_path / "DATA" / "city"
    for split, keys in CITY_FILES.items():
        for i, key in enumerate(keys):
            _save_l_png(root / "segmentation" / split / f"{key}_gtFine.png",
                        _expected_train_ids(_city_label_ids(i)))
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(i, 16, 24)).save(root / "images" / split / f"{key}.png")
    prepare.prepare_cityscapes(tmp_path / "DATA", tmp_path / "data", quiet=True)
    src = open_split("cityscapes", "train", tmp_path / "data")
    np.testing.assert_array_equal(src[0]["label"], _expected_train_ids(_city_label_ids(0)))


def test_cityscapes_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="leftImg8bit_trainvaltest.zip"):
        prepare.prepare_cityscapes(tmp_path, tmp_path / "data", quiet=True)
    make_cityscapes(tmp_path / "raw", zipped=False)
    gt = tmp_path / "raw/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    Image.fromarray(np.full((16, 24), 40, np.uint8)).save(gt)
    with pytest.raises(DataError, match=r"frankfurt_000000_000294_gtFine_labelIds\.png: values "
                                        r"\[40\] are not Cityscapes labelIds"):
        prepare.prepare_cityscapes(tmp_path / "raw", tmp_path / "data", quiet=True)
    _assert_nothing_left(tmp_path / "data", "cityscapes")
    gt.unlink()
    with pytest.raises(DataError, match="no fine label .*frankfurt_000000_000294"):
        prepare.prepare_cityscapes(tmp_path / "raw", tmp_path / "data", quiet=True)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_builds_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    name = prepare.ensure_synthetic(tmp_path / "a")
    build_s = time.perf_counter() - t0
    assert name == "synthetic" and build_s < 20, build_s
    t0 = time.perf_counter()
    assert prepare.ensure_synthetic(tmp_path / "a") == "synthetic"
    assert time.perf_counter() - t0 < 0.5  # present: a file check
    src = open_split("synthetic", "train", tmp_path / "a")
    assert len(src) == 400 and len(open_split("synthetic", "val", tmp_path / "a")) == 100
    labels = np.stack([src[i]["label"] for i in range(0, 400, 8)])
    counts = np.bincount(labels.ravel(), minlength=256)
    assert (counts[:5] > 0).all() and counts[255] > 0 and counts[5:255].sum() == 0
    image, label = synthetic.render(synthetic.SyntheticSpec(), "train", 8)
    np.testing.assert_array_equal(src[8]["image"], image)
    np.testing.assert_array_equal(src[8]["label"], label)


def test_synthetic_custom_sizes(tmp_path):
    sizes = dict(num_classes=4, image_size=32, num_train=12, num_val=5, seed=1)
    name = prepare.ensure_synthetic(tmp_path / "a", **sizes)
    assert name == "synthetic/c4_s32_n12_v5_seed1"
    assert prepare.ensure_synthetic(tmp_path / "b", **sizes) == name
    a, b = (open_split(name, "train", tmp_path / d) for d in "ab")
    assert a.info.num_classes == 4 and a.info.class_names[1] == "disc+stripes"
    assert a[0]["image"].shape == (32, 32, 3)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["label"], b[i]["label"])
    other = synthetic.render(synthetic.SyntheticSpec(**{**sizes, "seed": 2}), "train", 0)[0]
    assert not np.array_equal(other, a[0]["image"])
    val0 = open_split(name, "val", tmp_path / "a")[0]["image"]
    assert not np.array_equal(val0, a[0]["image"])  # val is not a copy of train


def test_synthetic_class_design():
    # Neither shape nor texture alone decides the class (once there are 3+ classes).
    pairs = synthetic.class_pairs(5)
    assert len(set(pairs)) == 4
    for shape in {s for s, _ in pairs}:
        assert sum(s == shape for s, _ in pairs) >= 2
    for tex in {t for _, t in pairs}:
        assert sum(t == tex for _, t in pairs) >= 2
    assert len(synthetic.class_names(24)) == 24
    for spec in (synthetic.SyntheticSpec(), synthetic.SyntheticSpec(3, 32, 10, 4, 5, False),
                 synthetic.SyntheticSpec(3, 48, 10, 4, max_distractors=0, object_size=30),
                 synthetic.SyntheticSpec(4, 48, 10, 4, boundary_ignore=False, object_size=25)):
        assert synthetic.SyntheticSpec.from_config_name(spec.config_name) == spec
    assert synthetic.SyntheticSpec(num_train=7).cli_args() == "--num_train=7"
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.SyntheticSpec(num_classes=1)
    with pytest.raises(ValueError, match="first_class"):
        synthetic.SyntheticSpec(first_class=-1)


def test_synthetic_source_task_shares_nothing_with_the_target():
    """`first_class`: the demo's pre-training task has none of the target's classes, not even as
    a distractor object."""
    target = set(synthetic.class_pairs(3))
    source = synthetic.SyntheticSpec(5, 32, 10, 4, seed=1, first_class=2)
    assert not target & set(synthetic.class_pairs(5, 2))
    assert synthetic.dataset_info(source).class_names == (
        "background", "triangle+stripes", "triangle+dots", "disc+checker", "triangle+checker")
    rng = np.random.default_rng(0)
    drawn = {(shape, fill) for _ in range(400)
             for _, shape, fill in synthetic.object_kinds(source, rng)}
    assert not drawn & target and len(drawn) > 20
    assert synthetic.SyntheticSpec.from_config_name(source.config_name) == source
    assert source.cli_args().endswith("--first_class=2")


def test_synthetic_difficulty_knobs():
    """No distractors: every non-background object pixel belongs to a class object; larger
    objects cover more of the image."""
    def coverage(**kw):
        spec = synthetic.SyntheticSpec(num_classes=3, image_size=48, **kw)
        labels = [synthetic.render(spec, "train", i)[1] for i in range(24)]
        return np.mean([np.mean((lb > 0) & (lb < 255)) for lb in labels])

    assert coverage(object_size=30) > 1.5 * coverage(object_size=15)
    spec = synthetic.SyntheticSpec(num_classes=3, image_size=48, max_distractors=0)
    assert spec.config_name.endswith("_d0")


def test_multi_shard_order_and_no_shuffler(tmp_path, monkeypatch):
    """Shards are written in plan order, and tfds' shuffler (which spills to disk through
    tf.io.gfile past 1 GB, i.e. needs TensorFlow) is never used."""
    from tensorflow_datasets.core import shuffle

    from mgd_jax.data.builders.synthetic import MgdSynthetic

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1)
    monkeypatch.setattr(MgdSynthetic, "SHARD_EXAMPLES", 4)
    sizes = dict(image_size=32, num_train=11, num_val=3)
    name = prepare.ensure_synthetic(tmp_path, **sizes)
    shards = sorted(p.name for p in dataset_dir(name, tmp_path).glob("*train.array_record*"))
    assert len(shards) == 3, shards
    src = open_split(name, "train", tmp_path)
    assert src.keys == [f"train_{i:06d}" for i in range(11)]
    spec = synthetic.SyntheticSpec(**sizes)
    for i in range(11):
        assert src[i]["key"] == src.keys[i]
        np.testing.assert_array_equal(src[i]["image"], synthetic.render(spec, "train", i)[0])
