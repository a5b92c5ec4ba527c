"""A dataset of your own, prepared with `mgd-prepare --dataset=folder --name=NAME`: the VOC recipe
(configs/voc.py, with its official unlabeled pairing and per-replica L_sup) on your images.

  python -m mgd_jax.main --config=configs/own.py:dataset=NAME,data_dir=DIR,method=supervised \
      --workdir=runs/NAME_sup
  python -m mgd_jax.main --config=configs/own.py:dataset=NAME,data_dir=DIR,method=cps ...
  python -m mgd_jax.main --config=configs/own.py:dataset=NAME,data_dir=DIR,method=mgd \
      --config.teacher_deep.checkpoint=DIR --config.teacher_wide.checkpoint=DIR

Arguments: dataset (the prepared name), data_dir (where it was prepared; default: mgd-prepare's
default), crop (the train crop, default 512), labeled_list (a file of image ids, one per line),
and those of configs/voc.py. The class count comes from the prepared dataset. The labeled images:

- with `labeled_list=FILE`: the listed ids (each must have a mask); every other train image is
  unlabeled (`partition_source=masks`, `config.labeled_list`);
- else, when the dataset was prepared with `--unlabeled_images`: every train image with a mask,
  the images without one unlabeled (`partition_source=masks`);
- else a seeded 1/partition of the train split (`partition_source=seeded`; no standard lists exist
  for your data: `--config.split_dir` with `--config.partition_source=lists` takes list files).

Evaluation pads each whole val image to the largest val image size, rounded up to a multiple of 32.
"""

import math
import os

from mgd_jax import config_lib
from mgd_jax.data import prepare, sources
from mgd_jax.runtime.errors import ConfigError


def _voc_config(arg: str):
    return config_lib.load_config_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"), arg)


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, dataset="", data_dir=prepare.DEFAULT_DATA_DIR, crop=512,
                             labeled_list="", **config_lib.RECIPE_ARGS)
    if not a.dataset:
        raise ConfigError("configs/own.py needs dataset=<the name given to mgd-prepare "
                          "--dataset=folder --name=...>")
    data_dir = os.path.expanduser(a.data_dir)
    val = sources.open_split(a.dataset, "val", data_dir)  # names the prepare command if missing
    source = sources.read_sidecar(val.directory).get("source", {})
    recipe = ",".join(f"{k}={a[k]}" for k in config_lib.RECIPE_ARGS if k != "smoke")
    c = _voc_config(recipe + (",smoke" if a.smoke else ""))
    c.dataset, c.data_dir, c.num_classes = a.dataset, data_dir, val.info.num_classes
    c.train_split, c.eval_split = val.info.train_split, val.info.eval_split
    labeled_list = os.path.expanduser(a.labeled_list) if a.labeled_list else ""
    if labeled_list and not os.path.isfile(labeled_list):
        raise ConfigError(f"configs/own.py labeled_list={a.labeled_list!r}: no such file (image "
                          "ids, one per line)")
    c.labeled_list = labeled_list  # read with partition_source=masks (input_pipeline)
    unlabeled_only = source.get("unlabeled_only", [])
    c.partition_source = "masks" if labeled_list or unlabeled_only else "seeded"
    if not a.smoke:
        c.crop_size = a.crop
    h, w = source.get("max_size", {}).get("val", (c.crop_size, c.crop_size))
    c.eval.mode = "whole"
    c.eval.pad_to = (32 * math.ceil(h / 32), 32 * math.ceil(w / 32))
    c.eval.crop = min(c.eval.pad_to)
    return c
