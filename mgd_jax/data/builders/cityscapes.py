"""``mgd_cityscapes``: Cityscapes fine annotations, 19 trainIds + 255, splits ``train`` (2,975) and
``val`` (500), keys ``<city>_<seq>_<frame>``.

Sources, in order of preference, looked up independently for images and labels in the manual dir:

* extracted folders ``leftImg8bit/{train,val}/<city>/<key>_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/<key>_gtFine_labelIds.png`` (labelIds -> trainIds with the
  official table, ``datasets.CITYSCAPES_LABELS``);
* the official zips ``leftImg8bit_trainvaltest.zip`` / ``gtFine_trainvaltest.zip`` (read in place,
  each checked against its published md5 first, ``common.ARCHIVES``, unless told not to);
* the CPS / MGD ``DATA/city`` layout: ``images/{train,val}/<key>.png`` and
  ``segmentation/{train,val}/<key>_gtFine.png`` (already trainIds).

Images are stored as their original PNG bytes.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import tensorflow_datasets as tfds

from mgd_jax.data.builders.common import (
    CITYSCAPES_LABEL_IDS,
    INDEX_PNG,
    Entry,
    FileRef,
    MgdBuilder,
    verify_archive,
)
from mgd_jax.data.datasets import DATASETS
from mgd_jax.data.splits import read_list
from mgd_jax.runtime.errors import DataError

SPLITS = ("train", "val")

INSTRUCTIONS = """\
Put the Cityscapes files (https://www.cityscapes-dataset.com/downloads/, login required;
docs/data.md lists them) in the manual directory, as the two zips (read in place) or extracted:
  <manual_dir>/leftImg8bit_trainvaltest.zip   (11 GB)  or  <manual_dir>/leftImg8bit/{train,val}/
  <manual_dir>/gtFine_trainvaltest.zip        (241 MB) or  <manual_dir>/gtFine/{train,val}/
or the CPS / MGD layout (DATA/city): <manual_dir>/images/{train,val}/<key>.png and
  <manual_dir>/segmentation/{train,val}/<key>_gtFine.png (trainIds).
"""

_IMG_RE = re.compile(r"(?:^|/)leftImg8bit/(train|val)/[^/]+/([^/]+)_leftImg8bit\.png$")
_GT_RE = re.compile(r"(?:^|/)gtFine/(train|val)/[^/]+/([^/]+)_gtFine_labelIds\.png$")

# split -> key -> (file, label kind)
Index = dict[str, dict[str, tuple[FileRef, str]]]


def _index_folder(folder: Path, pattern: re.Pattern, kind: str) -> Index:
    out: Index = {s: {} for s in SPLITS}
    for split in SPLITS:
        base = folder / split
        if not base.is_dir():
            continue
        for city in sorted(os.listdir(base)):
            if not (base / city).is_dir():
                continue
            for name in os.listdir(base / city):
                m = pattern.search(f"{folder.name}/{split}/{city}/{name}")
                if m:
                    out[split][m.group(2)] = (FileRef(str(base / city / name)), kind)
    return out


def _index_zip(path: Path, pattern: re.Pattern, kind: str, verify: bool = True) -> Index:
    verify_archive(path, verify=verify)
    out: Index = {s: {} for s in SPLITS}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot open zip archive ({e})") from e
    for name in names:
        m = pattern.search(name)
        if m:
            out[m.group(1)][m.group(2)] = (FileRef(str(path), name), kind)
    return out


def _index_cps(folder: Path, suffix: str, kind: str) -> Index:
    out: Index = {s: {} for s in SPLITS}
    for split in SPLITS:
        base = folder / split
        if base.is_dir():
            for name in os.listdir(base):
                if name.endswith(suffix):
                    out[split][name[: -len(suffix)]] = (FileRef(str(base / name)), kind)
    return out


def _find(manual_dir: Path, verify: bool = True) -> tuple[Index, Index, dict]:
    m = manual_dir
    cps_roots = [m, m / "city", m / "DATA" / "city"]
    images = labels = None
    desc = {}
    for folder in (m / "leftImg8bit", m / "leftImg8bit_trainvaltest" / "leftImg8bit"):
        if (folder / "train").is_dir() or (folder / "val").is_dir():
            images, desc["images"] = _index_folder(folder, _IMG_RE, ""), str(folder)
            break
    if images is None and (m / "leftImg8bit_trainvaltest.zip").is_file():
        path = m / "leftImg8bit_trainvaltest.zip"
        images, desc["images"] = _index_zip(path, _IMG_RE, "", verify), str(path)
    if images is None:
        for r in cps_roots:
            if (r / "images" / "train").is_dir():
                images, desc["images"] = _index_cps(r / "images", ".png", ""), str(r / "images")
                break
    for folder in (m / "gtFine", m / "gtFine_trainvaltest" / "gtFine"):
        if (folder / "train").is_dir() or (folder / "val").is_dir():
            labels = _index_folder(folder, _GT_RE, CITYSCAPES_LABEL_IDS)
            desc["labels"] = str(folder)
            break
    if labels is None and (m / "gtFine_trainvaltest.zip").is_file():
        path = m / "gtFine_trainvaltest.zip"
        labels = _index_zip(path, _GT_RE, CITYSCAPES_LABEL_IDS, verify)
        desc["labels"] = str(path)
    if labels is None:
        for r in cps_roots:
            if (r / "segmentation" / "train").is_dir():
                labels = _index_cps(r / "segmentation", "_gtFine.png", INDEX_PNG)
                desc["labels"] = str(r / "segmentation")
                break
    if images is None or labels is None:
        found = (("images", images), ("fine labels", labels))
        what = " and ".join(w for w, x in found if x is None)
        raise DataError(f"No Cityscapes {what} found under {m}.\n{INSTRUCTIONS}")
    return images, labels, desc


def plan_cityscapes(manual_dir: str | os.PathLike, *, train_list: str | os.PathLike | None = None,
                    val_list: str | os.PathLike | None = None, progress: bool = True,
                    verify_checksums: bool = True) -> tuple[dict[str, list[Entry]], dict]:
    """Finds every split's image and label; raises :class:`DataError` naming the keys that lack
    either (or a zip whose md5 is not the published one), before anything is written. Returns
    (split -> entries sorted by key, summary)."""
    del progress  # listing is instantaneous
    m = Path(manual_dir).expanduser()
    if not m.is_dir():
        raise DataError(f"Cityscapes manual directory {m} does not exist.\n{INSTRUCTIONS}")
    images, labels, desc = _find(m, verify_checksums)
    lists = {"train": train_list, "val": val_list}
    plan: dict[str, list[Entry]] = {}
    for split in SPLITS:
        keys = sorted(set(read_list(lists[split])) if lists[split] else images[split])
        if not keys:
            raise DataError(f"No Cityscapes {split} images found in {desc['images']}.\n"
                            f"{INSTRUCTIONS}")
        for what, have, where in (("image", images[split], desc["images"]),
                                  ("fine label", labels[split], desc["labels"])):
            missing = [k for k in keys if k not in have]
            if missing:
                shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise DataError(f"Cityscapes {split}: {len(missing)} of {len(keys)} keys have no "
                                f"{what} in {where}: {shown}")
        plan[split] = [
            Entry(k, images[split][k][0], labels[split][k][0], labels[split][k][1]) for k in keys
        ]
    return plan, desc


class MgdCityscapes(MgdBuilder):
    """Cityscapes gtFine, 19 trainIds + 255, splits train / val."""

    VERSION = tfds.core.Version(DATASETS["cityscapes"].version)
    DATASET = "cityscapes"
    IMAGE_FORMAT = "png"
    SHARD_EXAMPLES = 128  # ~2.3 MB each: ~300 MB shards (a shard is buffered while written)
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def make_plan(self, dl_manager):
        plan, summary = plan_cityscapes(dl_manager.manual_dir)
        self._source_description = summary
        return plan
