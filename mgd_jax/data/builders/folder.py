"""``mgd_folder``: a dataset of your own, from a folder of images and a folder of index masks,
plus, optionally, a folder of unlabeled images (no masks).

Images and masks pair by file name: ``<images>/<sub>/<stem>.<ext>`` with
``<masks>/<sub>/<stem><mask_suffix>.png`` (sub-folders allowed; stems must be unique, they are the
example keys). A mask holds class ids, 0..C-1 for the C names of the class-names file, plus one
ignore value (default 255; another value is stored as 255). The val split is a second pair of
folders, or a seeded held-out fraction of the images. Unlabeled images join the train split with
an all-ignore mask, and the sidecar lists their keys (``source.unlabeled_only``) so that a run
never draws them as labeled. One tfds config per dataset name; the prepared directory's sidecar
records the class table, so configs name the dataset alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

from mgd_jax.data.builders.common import (
    INDEX_PNG,
    Entry,
    FileRef,
    MgdBuilder,
    default_workers,
    make_example,
    ordered_map,
)
from mgd_jax.data.datasets import (
    FOLDER_BUILDER,
    FOLDER_VERSION,
    IGNORE_INDEX,
    PREPARE_COMMAND,
    DatasetInfo,
    voc_colormap,
)
from mgd_jax.data.splits import partition
from mgd_jax.runtime.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless only
_LISTED = 10  # files named per error


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """One class name per line (line i = class id i); blank lines are skipped."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the class names ({e})") from e
    names = tuple(line.strip() for line in lines if line.strip())
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise DataError(f"{path}: class names {dups} appear more than once")
    if not 2 <= len(names) <= 255:
        raise DataError(f"{path}: {len(names)} class names; expected 2..255 (one per line)")
    return names


def read_palette(path: str | os.PathLike, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """One colour per class and line: ``R G B``, ``R,G,B`` or ``#RRGGBB``."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the palette ({e})") from e
    colours = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("#") and len(text) == 7:
                rgb = tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(v) for v in text.replace(",", " ").split())
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{number}: {text!r} is not a colour (R G B, R,G,B or "
                            "#RRGGBB, values 0..255)") from None
        colours.append(rgb)
    if len(colours) != num_classes:
        raise DataError(f"{path}: {len(colours)} colours for {num_classes} classes")
    return tuple(colours)


def _index(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """relative path without the suffix -> file, for every file with one of `suffixes`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: the {what} folder does not exist")
    found: dict[str, Path] = {}
    stems: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        rel = path.relative_to(folder).with_suffix("").as_posix()
        if rel in found:
            raise DataError(f"{found[rel]} and {path}: two {what} files of one name")
        if path.stem in stems:
            raise DataError(f"{stems[path.stem]} and {path}: two {what} files named "
                            f"{path.stem!r} (file names are the example keys: make them unique)")
        found[rel], stems[path.stem] = path, path
    if not found:
        raise DataError(f"{folder}: no {what} files ({', '.join(suffixes)})")
    return found


def _listing(paths: Sequence[str]) -> str:
    return ", ".join(paths[:_LISTED]) + (f" ... ({len(paths)} in all)"
                                         if len(paths) > _LISTED else "")


def pair_files(images: str | os.PathLike, masks: str | os.PathLike,
               mask_suffix: str = "") -> list[Entry]:
    """The (image, mask) pairs of two folders, sorted by key; a file without its partner is an
    error that names it."""
    images, masks = Path(images).expanduser(), Path(masks).expanduser()
    image_files = _index(images, IMAGE_SUFFIXES, "image")
    mask_files = _index(masks, MASK_SUFFIXES, "mask")
    by_image = {}
    for rel, mask in mask_files.items():
        if mask_suffix and not rel.endswith(mask_suffix):
            continue
        by_image[rel[: len(rel) - len(mask_suffix)] if mask_suffix else rel] = mask
    lonely = [str(image_files[r]) for r in image_files if r not in by_image]
    if lonely:
        raise DataError(f"{len(lonely)} image(s) have no mask <name>{mask_suffix}.png in "
                        f"{masks}: {_listing(lonely)}")
    orphans = [str(m) for r, m in by_image.items() if r not in image_files]
    if orphans:
        raise DataError(f"{len(orphans)} mask(s) have no image in {images}: "
                        f"{_listing(orphans)}")
    return sorted((Entry(Path(r).name, FileRef(str(image_files[r])), FileRef(str(by_image[r])),
                         INDEX_PNG) for r in image_files), key=lambda e: e.key)


def _size(entry: Entry) -> tuple[int, int]:
    """(h, w) of an image whose mask (if any) has the same size (headers only)."""
    sizes = []
    for ref in (entry.image, entry.label or entry.image):
        try:
            with Image.open(ref.path) as im:
                sizes.append(im.size)
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"{ref}: not a readable image ({type(e).__name__}: {e})") from e
    (w, h), (mw, mh) = sizes
    if (w, h) != (mw, mh):
        raise DataError(f"{entry.label}: mask is {mw}x{mh} (w x h) but its image {entry.image} "
                        f"is {w}x{h}")
    return h, w


def plan_folder(images: str | os.PathLike, masks: str | os.PathLike, *,
                val_images: str | os.PathLike | None = None,
                val_masks: str | os.PathLike | None = None, val_fraction: float = 0.1,
                val_seed: int = 0, mask_suffix: str = "",
                unlabeled_images: str | os.PathLike | None = None,
                num_workers: int | None = None) -> tuple[dict[str, list[Entry]], dict]:
    """The train / val entries and a summary (with each split's largest image size); every
    pair is found and its sizes compared before anything is written. `unlabeled_images`: a
    folder of images without masks, added to the train split (never to val)."""
    entries = pair_files(images, masks, mask_suffix)
    summary = {"images": str(images), "masks": str(masks), "mask_suffix": mask_suffix}
    if (val_images is None) != (val_masks is None):
        raise DataError("give both val_images and val_masks, or neither (a held-out fraction)")
    if val_images is not None:
        val = pair_files(val_images, val_masks, mask_suffix)
        both = sorted({e.key for e in val} & {e.key for e in entries})
        if both:
            raise DataError(f"{len(both)} key(s) are both in {images} and {val_images}: "
                            f"{_listing(both)}")
        plan = {"train": entries, "val": val}
        summary.update(val_images=str(val_images), val_masks=str(val_masks))
    else:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction}: expected 0 < fraction < 1")
        held, kept = partition([e.key for e in entries], fraction=val_fraction, seed=val_seed)
        if not kept:
            raise DataError(f"{images}: {len(entries)} image(s) leave none for training after "
                            f"holding out val_fraction={val_fraction}")
        held = set(held)
        plan = {"train": [e for e in entries if e.key not in held],
                "val": [e for e in entries if e.key in held]}
        summary.update(val_fraction=val_fraction, val_seed=val_seed)
    if unlabeled_images is not None:
        folder = Path(unlabeled_images).expanduser()
        files = _index(folder, IMAGE_SUFFIXES, "unlabeled image")
        unlabeled = [Entry(Path(rel).name, FileRef(str(path)), None)
                     for rel, path in files.items()]
        taken = {e.key: str(e.image) for items in plan.values() for e in items}
        both = sorted(f"{taken[e.key]} and {e.image}" for e in unlabeled if e.key in taken)
        if both:
            raise DataError(f"{len(both)} unlabeled image(s) have the name of a labeled one "
                            f"(file names are the example keys): {_listing(both)}")
        plan["train"] = sorted(plan["train"] + unlabeled, key=lambda e: e.key)
        summary.update(unlabeled_images=str(unlabeled_images),
                       unlabeled_only=sorted(e.key for e in unlabeled))
    workers = default_workers() if num_workers is None else num_workers
    summary["max_size"] = {}
    for split, items in plan.items():
        sizes = list(ordered_map(_size, items, workers))
        summary["max_size"][split] = [max(h for h, _ in sizes), max(w for _, w in sizes)]
    return plan, summary


def dataset_info(name: str, class_names: Sequence[str],
                 palette: Sequence[Sequence[int]] | None, split_sizes: dict[str, int],
                 ) -> DatasetInfo:
    """The class table a folder dataset records in its sidecar."""
    return DatasetInfo(
        name=name, builder=FOLDER_BUILDER, num_classes=len(class_names),
        class_names=tuple(class_names),
        palette=tuple(tuple(c) for c in palette) if palette else voc_colormap(len(class_names)),
        split_sizes=split_sizes, train_split="train", eval_split="val",
        version=FOLDER_VERSION, config=name,
        prepare_command=f"{PREPARE_COMMAND} --dataset=folder --name={name} ...",
    )


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    info: DatasetInfo | None = None
    ignore_value: int = IGNORE_INDEX


class MgdFolder(MgdBuilder):
    """A dataset of the user's own; the config (one per name) carries its class table."""

    VERSION = tfds.core.Version(FOLDER_VERSION)
    BUILDER_CONFIGS = [FolderConfig(name="example")]  # a placeholder: tfds wants one
    IMAGE_FORMAT = "png"  # RGB JPEG / PNG files are stored as they are; others as PNG
    SHARD_EXAMPLES = 256

    def dataset_info(self) -> DatasetInfo:
        return self.builder_config.info

    def make_plan(self, dl_manager):
        raise DataError("a folder dataset is planned by data.prepare.prepare_folder")

    def encode(self, split, item):
        config = self.builder_config
        # greyscale images are stored as RGB: the input pipeline takes 3 channels
        example = make_example(item, config.info.num_classes, self.IMAGE_FORMAT, self._zips,
                               ignore_value=config.ignore_value, keep_modes=("RGB",))
        return item.key, example
