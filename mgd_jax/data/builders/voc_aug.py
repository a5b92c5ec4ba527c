"""``mgd_voc_aug``: PASCAL VOC 2012 with the SBD "aug" annotations (splits ``train_aug`` = 10,582
and ``val`` = 1,449), from a manual directory in one of two layouts:

* VOCdevkit: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`` plus
  either SBD (``benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg, train.txt, val.txt}``) or the
  ``SegmentationClassAug`` index masks (or both); VOC and SBD either extracted or as the archives
  downloaded, read in place (``VOCtrainval_11-May-2012.tar``: members by byte range;
  ``benchmark.tgz``: one pass keeping its ``cls/*.mat`` and lists in memory), each checked against
  its published md5 (``common.ARCHIVES``) unless told not to.
  ``train_aug`` = VOC2012 seg train + SBD train + SBD val - VOC2012 seg val (or: every
  SegmentationClassAug mask not in val).
* CPS / MGD ``DATA/pascal_voc``: ``train_aug/{image,label}``, ``val/{image,label}``, with the ids
  from ``train_aug.txt`` / ``val.txt`` when present.

Masks: SegmentationClassAug first (what CPS/MGD train on), else VOC's palette ``SegmentationClass``
(decoded to palette indices), else SBD's ``GTcls.Segmentation``. 255 stays the ignore value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from mgd_jax.data.builders.common import (
    INDEX_PNG,
    SBD_MAT,
    Archive,
    Entry,
    MgdBuilder,
    Tree,
    verify_archive,
)
from mgd_jax.data.datasets import DATASETS
from mgd_jax.data.splits import parse_list, read_list
from mgd_jax.runtime.errors import DataError

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"

INSTRUCTIONS = """\
Put the PASCAL VOC 2012 + SBD files in the manual directory (docs/data.md lists the downloads),
in either layout:

 (a) VOCdevkit layout, the archives as downloaded (read in place) or extracted:
     <manual_dir>/VOCtrainval_11-May-2012.tar  or
     <manual_dir>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}
         (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)
     plus the SBD annotations, one or both of:
     <manual_dir>/benchmark.tgz  or
     <manual_dir>/benchmark_RELEASE/dataset/{cls,img,train.txt,val.txt}
         (http://home.bharathh.info/pubs/codes/SBD/download.html)
     <manual_dir>/SegmentationClassAug/*.png  (or VOCdevkit/VOC2012/SegmentationClassAug)
         the widely shared index-mask conversion of SBD (SegmentationClassAug.zip)
 (b) the CPS / MGD layout (DATA/pascal_voc of TorchSemiSeg / MGD-SSSS):
     <manual_dir>/train_aug/{image/<id>.jpg,label/<id>.png}
     <manual_dir>/val/{image/<id>.jpg,label/<id>.png}
     <manual_dir>/train_aug.txt, val.txt (optional: the ids; else every image in the folder)
"""


@dataclasses.dataclass(frozen=True)
class VocLayout:
    kind: str  # "devkit" | "cps"
    root: Tree  # VOC2012 folder (devkit) or the pascal_voc folder (cps)
    sbd: Tree | None = None  # folder holding cls/ (and img/, train.txt, val.txt)
    aug: Tree | None = None  # SegmentationClassAug folder


def _first_dir(candidates: Iterable[Tree], *required: str) -> Tree | None:
    for c in candidates:
        if c.is_dir() and all((c / r).is_dir() for r in required):
            return c
    return None


def _sbd_member(name: str) -> bool:
    """What a pass over benchmark.tgz keeps: the class masks and the split lists (its img/
    JPEGs are VOC2012's own, read from JPEGImages)."""
    return name.endswith(".txt") or ("/cls/" in name and name.endswith(".mat"))


def find_layout(manual_dir: str | os.PathLike, *, verify_checksums: bool = True) -> VocLayout:
    """The layout of the manual directory; an archive is read (and its md5 checked) only where
    no extracted folder stands for it."""
    path = Path(manual_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"VOC manual directory {path} does not exist.\n{INSTRUCTIONS}")
    m = Tree(path)
    cps = _first_dir([m, m / "pascal_voc", m / "DATA" / "pascal_voc"],
                     "train_aug/image", "val/image")
    if cps is not None:
        return VocLayout("cps", cps)
    voc = _first_dir(
        [m, m / "VOC2012", m / "VOCdevkit" / "VOC2012",
         m / "VOCtrainval_11-May-2012" / "VOCdevkit" / "VOC2012"],
        "JPEGImages",
    )
    if voc is None and (path / VOC_ARCHIVE).is_file():
        verify_archive(path / VOC_ARCHIVE, verify=verify_checksums)
        voc = _first_dir([Tree(path / VOC_ARCHIVE, Archive(path / VOC_ARCHIVE))
                          / "VOCdevkit" / "VOC2012"], "JPEGImages")
    if voc is None:
        raise DataError(f"No VOC2012 JPEGImages folder found under {path}.\n{INSTRUCTIONS}")
    sbd = _first_dir(
        [m / "benchmark_RELEASE" / "dataset", m / "benchmark_RELEASE", m / "SBD" / "dataset",
         m / "SBD", m / "sbd" / "dataset", m / "sbd", m / "dataset", m],
        "cls",
    )
    if sbd is None and (path / SBD_ARCHIVE).is_file():
        verify_archive(path / SBD_ARCHIVE, verify=verify_checksums)
        archive = Archive(path / SBD_ARCHIVE, keep=_sbd_member)
        sbd = _first_dir([Tree(path / SBD_ARCHIVE, archive) / "benchmark_RELEASE" / "dataset"],
                         "cls")
    aug = _first_dir(
        [voc / "SegmentationClassAug", m / "SegmentationClassAug" / "SegmentationClassAug",
         m / "SegmentationClassAug", m / "VOCdevkit" / "SegmentationClassAug"],
    )
    return VocLayout("devkit", voc, sbd, aug)


def _stems(folder: Tree, suffix: str) -> set[str]:
    return {n[: -len(suffix)] for n in folder.names() if n.endswith(suffix)}


def _read(file: Tree) -> list[str]:
    return parse_list(file.read_text(), str(file))


def _ids(file: Tree, what: str) -> list[str]:
    if not file.is_file():
        raise DataError(f"{file} not found (needed for the {what} ids).\n{INSTRUCTIONS}")
    return _read(file)


def _split_ids(layout: VocLayout, train_list, val_list) -> dict[str, list[str]]:
    if layout.kind == "cps":
        r = layout.root
        val = (read_list(val_list) if val_list else
               _read(r / "val.txt") if (r / "val.txt").is_file() else
               sorted(_stems(r / "val" / "image", ".jpg")))
        train = (read_list(train_list) if train_list else
                 _read(r / "train_aug.txt") if (r / "train_aug.txt").is_file() else
                 sorted(_stems(r / "train_aug" / "image", ".jpg")))
        return {"train_aug": train, "val": val}

    sets = layout.root / "ImageSets" / "Segmentation"
    val = read_list(val_list) if val_list else _ids(sets / "val.txt", "val")
    if train_list:
        return {"train_aug": read_list(train_list), "val": val}
    voc_train = _read(sets / "train.txt") if (sets / "train.txt").is_file() else []
    sbd = layout.sbd
    if sbd is not None and (sbd / "train.txt").is_file() and (sbd / "val.txt").is_file():
        pool = set(voc_train) | set(_read(sbd / "train.txt")) | set(_read(sbd / "val.txt"))
    elif layout.aug is not None:
        pool = set(voc_train) | _stems(layout.aug, ".png")
    else:
        raise DataError(
            f"Found VOC2012 at {layout.root} but no SBD annotations (neither "
            f"benchmark_RELEASE/dataset with cls/, train.txt, val.txt nor SegmentationClassAug), "
            f"so train_aug cannot be built.\n{INSTRUCTIONS}"
        )
    return {"train_aug": sorted(pool - set(val)), "val": val}


def _missing_error(split: str, what: str, missing: list[str], total: int, looked: str):
    shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
    return DataError(
        f"VOC {split}: {len(missing)} of {total} listed ids have no {what} "
        f"(looked for {looked}): {shown}"
    )


def plan_voc(manual_dir: str | os.PathLike, *, train_list: str | os.PathLike | None = None,
             val_list: str | os.PathLike | None = None, progress: bool = True,
             verify_checksums: bool = True) -> tuple[dict[str, list[Entry]], dict]:
    """Finds every split's image and mask files; raises :class:`DataError` naming the ids that
    lack either (or an archive whose md5 is not the published one), before anything is written.
    Returns (split -> entries sorted by id, summary)."""
    layout = find_layout(manual_dir, verify_checksums=verify_checksums)
    ids = _split_ids(layout, train_list, val_list)
    plan: dict[str, list[Entry]] = {}
    counts: dict[str, dict[str, int]] = {}

    if layout.kind == "cps":
        for split, keys in ids.items():
            folder = layout.root / split
            images, labels = _stems(folder / "image", ".jpg"), _stems(folder / "label", ".png")
            keys = sorted(set(keys))
            for what, have, looked in (("image", images, f"{folder}/image/<id>.jpg"),
                                       ("mask", labels, f"{folder}/label/<id>.png")):
                missing = [k for k in keys if k not in have]
                if missing:
                    raise _missing_error(split, what, missing, len(keys), looked)
            plan[split] = [
                Entry(k, (folder / "image" / f"{k}.jpg").ref(),
                      (folder / "label" / f"{k}.png").ref())
                for k in keys
            ]
            counts[split] = {"label": len(keys)}
    else:
        voc, sbd, aug = layout.root, layout.sbd, layout.aug
        jpeg = _stems(voc / "JPEGImages", ".jpg")
        sbd_img = _stems(sbd / "img", ".jpg") if sbd else set()
        aug_png = _stems(aug, ".png") if aug else set()
        voc_png = _stems(voc / "SegmentationClass", ".png")
        sbd_mat = _stems(sbd / "cls", ".mat") if sbd else set()
        for split, keys in ids.items():
            keys = sorted(set(keys))
            entries, no_image, no_mask = [], [], []
            src = {"SegmentationClassAug": 0, "SegmentationClass": 0, "SBD cls": 0}
            for k in tqdm(keys, desc=f"checking VOC {split}", disable=not progress,
                          mininterval=1.0):
                if k in jpeg:
                    image = (voc / "JPEGImages" / f"{k}.jpg").ref()
                elif k in sbd_img:
                    image = (sbd / "img" / f"{k}.jpg").ref()
                else:
                    no_image.append(k)
                    continue
                if k in aug_png:
                    label, kind = (aug / f"{k}.png").ref(), INDEX_PNG
                    s = "SegmentationClassAug"
                elif k in voc_png:
                    label, kind, s = ((voc / "SegmentationClass" / f"{k}.png").ref(),
                                      INDEX_PNG, "SegmentationClass")
                elif k in sbd_mat:
                    label, kind, s = (sbd / "cls" / f"{k}.mat").ref(), SBD_MAT, "SBD cls"
                else:
                    no_mask.append(k)
                    continue
                src[s] += 1
                entries.append(Entry(k, image, label, kind))
            if no_image:
                looked = f"{voc}/JPEGImages" + (f", {sbd}/img" if sbd else "")
                raise _missing_error(split, "image", no_image, len(keys), looked)
            if no_mask:
                looked = ", ".join(
                    str(p) for p in (aug, voc / "SegmentationClass", sbd and sbd / "cls") if p
                )
                raise _missing_error(split, "mask", no_mask, len(keys), looked)
            plan[split] = entries
            counts[split] = src
    summary = {
        "layout": layout.kind,
        "root": str(layout.root),
        "sbd": str(layout.sbd) if layout.sbd else None,
        "segmentation_class_aug": str(layout.aug) if layout.aug else None,
        "label_sources": counts,
    }
    return plan, summary


class MgdVocAug(MgdBuilder):
    """PASCAL VOC 2012 + SBD ("aug"), 21 classes, splits train_aug / val."""

    VERSION = tfds.core.Version(DATASETS["voc"].version)
    DATASET = "voc"
    IMAGE_FORMAT = "jpeg"  # the original JPEG bytes are stored, never re-encoded
    SHARD_EXAMPLES = 1024  # ~120 KB each
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def make_plan(self, dl_manager):
        plan, summary = plan_voc(dl_manager.manual_dir)
        self._source_description = summary
        return plan
