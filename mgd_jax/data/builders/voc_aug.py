"""``mgd_voc_aug``: PASCAL VOC 2012 with the SBD "aug" annotations (splits ``train_aug`` = 10,582
and ``val`` = 1,449), from a manual directory in one of two layouts:

* VOCdevkit: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`` plus
  either SBD (``benchmark_RELEASE/dataset/{cls/*.mat, img/*.jpg, train.txt, val.txt}``) or the
  ``SegmentationClassAug`` index masks (or both). ``train_aug`` = VOC2012 seg train + SBD train +
  SBD val - VOC2012 seg val (or: every SegmentationClassAug mask not in val).
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

from mgd_jax.data.builders.common import INDEX_PNG, SBD_MAT, Entry, FileRef, MgdBuilder
from mgd_jax.data.datasets import DATASETS
from mgd_jax.data.splits import read_list
from mgd_jax.runtime.errors import DataError

INSTRUCTIONS = """\
Put the PASCAL VOC 2012 + SBD files in the manual directory, in either layout:

 (a) VOCdevkit layout (as the archives extract):
     <manual_dir>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}
         from VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)
     plus the SBD annotations, one or both of:
     <manual_dir>/benchmark_RELEASE/dataset/{cls,img,train.txt,val.txt}
         from benchmark.tgz (http://home.bharathh.info/pubs/codes/SBD/download.html)
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
    root: Path  # VOC2012 folder (devkit) or the pascal_voc folder (cps)
    sbd: Path | None = None  # folder holding cls/ (and img/, train.txt, val.txt)
    aug: Path | None = None  # SegmentationClassAug folder


def _first_dir(candidates: Iterable[Path], *required: str) -> Path | None:
    for c in candidates:
        if c.is_dir() and all((c / r).is_dir() for r in required):
            return c
    return None


def find_layout(manual_dir: str | os.PathLike) -> VocLayout:
    m = Path(manual_dir).expanduser()
    if not m.is_dir():
        raise DataError(f"VOC manual directory {m} does not exist.\n{INSTRUCTIONS}")
    cps = _first_dir([m, m / "pascal_voc", m / "DATA" / "pascal_voc"],
                     "train_aug/image", "val/image")
    if cps is not None:
        return VocLayout("cps", cps)
    voc = _first_dir(
        [m, m / "VOC2012", m / "VOCdevkit" / "VOC2012",
         m / "VOCtrainval_11-May-2012" / "VOCdevkit" / "VOC2012"],
        "JPEGImages",
    )
    if voc is None:
        raise DataError(f"No VOC2012 JPEGImages folder found under {m}.\n{INSTRUCTIONS}")
    sbd = _first_dir(
        [m / "benchmark_RELEASE" / "dataset", m / "benchmark_RELEASE", m / "SBD" / "dataset",
         m / "SBD", m / "sbd" / "dataset", m / "sbd", m / "dataset", m],
        "cls",
    )
    aug = _first_dir(
        [voc / "SegmentationClassAug", m / "SegmentationClassAug" / "SegmentationClassAug",
         m / "SegmentationClassAug", m / "VOCdevkit" / "SegmentationClassAug"],
    )
    return VocLayout("devkit", voc, sbd, aug)


def _stems(folder: Path, suffix: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {n[: -len(suffix)] for n in os.listdir(folder) if n.endswith(suffix)}


def _ids(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} not found (needed for the {what} ids).\n{INSTRUCTIONS}")
    return read_list(path)


def _split_ids(layout: VocLayout, train_list, val_list) -> dict[str, list[str]]:
    if layout.kind == "cps":
        r = layout.root
        val = (read_list(val_list) if val_list else
               read_list(r / "val.txt") if (r / "val.txt").is_file() else
               sorted(_stems(r / "val" / "image", ".jpg")))
        train = (read_list(train_list) if train_list else
                 read_list(r / "train_aug.txt") if (r / "train_aug.txt").is_file() else
                 sorted(_stems(r / "train_aug" / "image", ".jpg")))
        return {"train_aug": train, "val": val}

    sets = layout.root / "ImageSets" / "Segmentation"
    val = read_list(val_list) if val_list else _ids(sets / "val.txt", "val")
    if train_list:
        return {"train_aug": read_list(train_list), "val": val}
    voc_train = read_list(sets / "train.txt") if (sets / "train.txt").is_file() else []
    sbd = layout.sbd
    if sbd is not None and (sbd / "train.txt").is_file() and (sbd / "val.txt").is_file():
        pool = set(voc_train) | set(read_list(sbd / "train.txt")) | set(read_list(sbd / "val.txt"))
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
             ) -> tuple[dict[str, list[Entry]], dict]:
    """Finds every split's image and mask files; raises :class:`DataError` naming the ids that
    lack either, before anything is written. Returns (split -> entries sorted by id, summary)."""
    layout = find_layout(manual_dir)
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
                Entry(k, FileRef(str(folder / "image" / f"{k}.jpg")),
                      FileRef(str(folder / "label" / f"{k}.png")))
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
                    image = FileRef(str(voc / "JPEGImages" / f"{k}.jpg"))
                elif k in sbd_img:
                    image = FileRef(str(sbd / "img" / f"{k}.jpg"))
                else:
                    no_image.append(k)
                    continue
                if k in aug_png:
                    label, kind = FileRef(str(aug / f"{k}.png")), INDEX_PNG
                    s = "SegmentationClassAug"
                elif k in voc_png:
                    label, kind, s = (FileRef(str(voc / "SegmentationClass" / f"{k}.png")),
                                      INDEX_PNG, "SegmentationClass")
                elif k in sbd_mat:
                    label, kind, s = FileRef(str(sbd / "cls" / f"{k}.mat")), SBD_MAT, "SBD cls"
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
