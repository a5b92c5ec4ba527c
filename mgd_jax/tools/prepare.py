r"""Data preparation: a dataset -> tfds array_record files under --data_dir (`data.prepare`).

    mgd-prepare --dataset=voc --manual_dir=/data/voc --data_dir=~/mgd_data   # [--skip_checksum]
    mgd-prepare --dataset=cityscapes --manual_dir=/data/city --data_dir=DIR
    mgd-prepare --dataset=synthetic --data_dir=DIR [--num_train=400 ...]
    mgd-prepare --dataset=folder --name=mine --images=DIR --masks=DIR \
        --classes=classes.txt [--unlabeled_images=DIR --palette=FILE --ignore_value=255 \
        --val_images=DIR --val_masks=DIR]

Every listed id's image and mask are located and checked before anything is written; an
interrupted run never leaves a dataset that training accepts.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax.data import prepare, synthetic
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
_DATASET = flags.DEFINE_enum("dataset", None, ("voc", "cityscapes", "synthetic", "folder"),
                             "The dataset to prepare (folder: your own, see docs/data.md).",
                             flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", prepare.DEFAULT_DATA_DIR,
                                "Where the prepared dataset goes.", flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "voc / cityscapes: the folder with the "
                                  "downloaded files.", flag_values=FLAGS)
_TRAIN_LIST = flags.DEFINE_string("train_list", None, "Optional list of train ids (default: "
                                  "derived, see docs/data.md).", flag_values=FLAGS)
_VAL_LIST = flags.DEFINE_string("val_list", None, "Optional list of val ids.", flag_values=FLAGS)
_SKIP_CHECKSUM = flags.DEFINE_bool(
    "skip_checksum", False, "voc / cityscapes: read a downloaded archive even when its md5 is not "
    "the published one (docs/data.md).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild if already prepared.",
                               flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Decode/check threads (default: "
                                    "min(8, CPUs)).", flag_values=FLAGS)
_NAME = flags.DEFINE_string("name", None, "folder: the dataset's name (config.dataset).",
                            flag_values=FLAGS)
_IMAGES = flags.DEFINE_string("images", None, "folder: the folder of images (train, or all "
                              "when val is held out).", flag_values=FLAGS)
_MASKS = flags.DEFINE_string("masks", None, "folder: the folder of index masks, <name>.png per "
                             "image <name>.<ext>.", flag_values=FLAGS)
_CLASSES = flags.DEFINE_string("classes", None, "folder: the class names file, one per line "
                               "(line i = class id i).", flag_values=FLAGS)
_PALETTE = flags.DEFINE_string("palette", None, "folder: optional colours, one per class and "
                               "line (R G B or #RRGGBB); default: the VOC colour map.",
                               flag_values=FLAGS)
_IGNORE_VALUE = flags.DEFINE_integer("ignore_value", 255, "folder: the mask value that means "
                                     "'not labelled' (stored as 255).", flag_values=FLAGS)
_VAL_IMAGES = flags.DEFINE_string("val_images", None, "folder: the val images (with "
                                  "--val_masks); default: hold out --val_fraction.",
                                  flag_values=FLAGS)
_VAL_MASKS = flags.DEFINE_string("val_masks", None, "folder: the val masks.", flag_values=FLAGS)
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.1, "folder: the fraction of --images held "
                                   "out for val when no --val_images are given.",
                                   flag_values=FLAGS)
_VAL_SEED = flags.DEFINE_integer("val_seed", 0, "folder: the seed of the held-out val images.",
                                 flag_values=FLAGS)
_UNLABELED = flags.DEFINE_string("unlabeled_images", None, "folder: a folder of images without "
                                 "masks, added to the train split as unlabeled images.",
                                 flag_values=FLAGS)
_MASK_SUFFIX = flags.DEFINE_string("mask_suffix", "", "folder: the mask of image <name>.<ext> "
                                   "is <name><mask_suffix>.png.", flag_values=FLAGS)
_SPEC = synthetic.SyntheticSpec()
_SIZES = {
    field.name: (flags.DEFINE_bool if isinstance(getattr(_SPEC, field.name), bool)
                 else flags.DEFINE_integer)(
        field.name, getattr(_SPEC, field.name), f"synthetic: {field.name}", flag_values=FLAGS)
    for field in dataclasses.fields(synthetic.SyntheticSpec)
}
flags.mark_flag_as_required("dataset", flag_values=FLAGS)


def _prepare() -> None:
    if _DATASET.value == "synthetic":
        sizes = {name: flag.value for name, flag in _SIZES.items()}
        name = prepare.prepare_synthetic(_DATA_DIR.value, overwrite=_OVERWRITE.value,
                                         num_workers=_NUM_WORKERS.value, **sizes)
        print(f"Open it with open_split({name!r}, 'train', {_DATA_DIR.value!r})")
        return
    if _DATASET.value == "folder":
        missing = [f"--{f.name}" for f in (_NAME, _IMAGES, _MASKS, _CLASSES) if not f.value]
        if missing:
            raise cli.UserError(f"--dataset=folder needs {', '.join(missing)}")
        name = prepare.prepare_folder(
            _NAME.value, _IMAGES.value, _MASKS.value, _CLASSES.value, _DATA_DIR.value,
            palette=_PALETTE.value, ignore_value=_IGNORE_VALUE.value,
            val_images=_VAL_IMAGES.value, val_masks=_VAL_MASKS.value,
            val_fraction=_VAL_FRACTION.value, val_seed=_VAL_SEED.value,
            mask_suffix=_MASK_SUFFIX.value, unlabeled_images=_UNLABELED.value,
            overwrite=_OVERWRITE.value,
            num_workers=_NUM_WORKERS.value)
        print(f"Train on it with --config=configs/own.py:dataset={name},data_dir={_DATA_DIR.value}"
              f" (or --config.dataset={name} --config.data_dir={_DATA_DIR.value})")
        return
    if not _MANUAL_DIR.value:
        raise cli.UserError(f"--dataset={_DATASET.value} needs --manual_dir (the downloads)")
    fn = prepare.prepare_voc if _DATASET.value == "voc" else prepare.prepare_cityscapes
    fn(_MANUAL_DIR.value, _DATA_DIR.value, train_list=_TRAIN_LIST.value,
       val_list=_VAL_LIST.value, overwrite=_OVERWRITE.value, num_workers=_NUM_WORKERS.value,
       skip_checksum=_SKIP_CHECKSUM.value)


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _prepare)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
