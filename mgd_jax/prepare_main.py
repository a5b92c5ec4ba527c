"""Data preparation: a dataset -> tfds array_record files under --data_dir (`data.prepare`).

    python -m mgd_jax.prepare_main --dataset=voc --manual_dir=/data/voc --data_dir=~/mgd_data
    python -m mgd_jax.prepare_main --dataset=cityscapes --manual_dir=/data/city --data_dir=DIR
    python -m mgd_jax.prepare_main --dataset=synthetic --data_dir=DIR [--num_train=400 ...]

Every listed id's image and mask are located and checked before anything is written; an
interrupted run never leaves a dataset that training accepts.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import cli
from mgd_jax.data import prepare, synthetic

FLAGS = flags.FlagValues()
_DATASET = flags.DEFINE_enum("dataset", None, ("voc", "cityscapes", "synthetic"),
                             "The dataset to prepare.", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", prepare.DEFAULT_DATA_DIR,
                                "Where the prepared dataset goes.", flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "voc / cityscapes: the folder with the "
                                  "downloaded files.", flag_values=FLAGS)
_TRAIN_LIST = flags.DEFINE_string("train_list", None, "Optional list of train ids (default: "
                                  "derived, see docs/data.md).", flag_values=FLAGS)
_VAL_LIST = flags.DEFINE_string("val_list", None, "Optional list of val ids.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild if already prepared.",
                               flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Decode/check threads (default: "
                                    "min(8, CPUs)).", flag_values=FLAGS)
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
    if not _MANUAL_DIR.value:
        raise cli.UserError(f"--dataset={_DATASET.value} needs --manual_dir (the downloads)")
    fn = prepare.prepare_voc if _DATASET.value == "voc" else prepare.prepare_cityscapes
    fn(_MANUAL_DIR.value, _DATA_DIR.value, train_list=_TRAIN_LIST.value,
       val_list=_VAL_LIST.value, overwrite=_OVERWRITE.value, num_workers=_NUM_WORKERS.value)


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _prepare)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
