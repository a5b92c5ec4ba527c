"""Prepares the datasets as tfds array_record files (no TensorFlow); the command line is
`mgd-prepare` (`mgd_jax.tools.prepare`).

Every listed id's image and mask are located before anything is written; each example is then
decoded and checked (corrupt image, mask size, label values) while it is written. tfds writes
into ``<builder>/incomplete.*`` and renames it into place only on success, with our
``mgd_dataset.json`` sidecar inside, so an interrupted run never leaves a dataset that
:func:`mgd_jax.data.sources.open_split` accepts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

from mgd_jax.data import synthetic
from mgd_jax.data.datasets import IGNORE_INDEX, Dataset, DatasetInfo, custom_name, resolve
from mgd_jax.data.sources import dataset_dir, is_prepared, open_split, read_sidecar
from mgd_jax.runtime.errors import DataError

DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _say(quiet: bool, *args) -> None:
    if not quiet:
        print(*args, flush=True)


def _build(dataset: Dataset, data_dir: str | os.PathLike, *, plan=None, summary=None,
           config=None, overwrite: bool = False, num_workers: int | None = None,
           quiet: bool = False) -> Path:
    """Runs the dataset's builder into ``data_dir`` and checks the result; returns the dataset
    dir."""
    import tensorflow_datasets as tfds

    from mgd_jax.data.builders import BUILDERS

    target = dataset_dir(dataset, data_dir)
    if is_prepared(dataset, data_dir) and not overwrite:
        _say(quiet, f"{dataset.name} is already prepared at {target} (use --overwrite to rebuild).")
        return target
    if target.exists() and not overwrite:
        raise DataError(f"{target} exists but is not a complete mgd_jax dataset (no sidecar); "
                        "rerun with --overwrite to replace it")
    Path(data_dir).expanduser().mkdir(parents=True, exist_ok=True)
    leftovers = sorted(str(p) for p in target.parent.glob("incomplete.*"))
    if leftovers:
        _say(quiet, f"Note: {leftovers} are left from an interrupted run; they are ignored, and "
             "safe to delete once no other prepare is running.")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # tfds warns "Using custom data configuration" (expected)
    try:
        builder = BUILDERS[dataset.builder_key](
            data_dir=os.fspath(Path(data_dir).expanduser()), config=config, plan=plan,
            source_description=summary, num_workers=num_workers, progress=not quiet,
        )
    finally:
        absl_logger.setLevel(level)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    was_active = tfds.core.utils.tqdm_utils._active
    tfds.display_progress_bar(False)  # our own bars have totals
    _say(quiet, f"Writing {dataset.name} to {target} ...")
    try:
        # tfds prints "Downloading and preparing ..." banners; our own lines say what happens.
        with tempfile.TemporaryDirectory() as downloads, contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=downloads,
                download_config=tfds.download.DownloadConfig(
                    download_mode=mode,
                    compute_stats=tfds.download.ComputeStatsMode.SKIP,
                ),
            )
    except OSError:
        # Another process may have renamed its identical build into place first.
        if not is_prepared(dataset, data_dir):
            raise
    finally:
        tfds.display_progress_bar(was_active)
    _verify(dataset, data_dir, plan, quiet)
    return target


def _verify(dataset: Dataset, data_dir, plan, quiet: bool) -> None:
    """Reads back a sample of every split (keys in the planned order, decodable) and prints the
    totals next to the official counts (a dataset of your own: the planned counts)."""
    info = DatasetInfo.from_json(read_sidecar(dataset_dir(dataset, data_dir))["info"])
    expected = info.split_sizes
    word = "planned" if dataset.own else "official"
    lines = []
    for split in expected:
        src = open_split(dataset, split, data_dir)
        if plan is not None and split in plan:
            planned = [getattr(e, "key", None) for e in plan[split]]
            if planned and planned[0] is not None and planned != src.keys:
                raise DataError(f"{src}: written keys differ from the planned order")
        n = len(src)
        step = max(1, n // 16)
        for i in list(range(0, n, step))[:16] + [n - 1]:
            src[i]  # decodes and checks the key against the sidecar
        official = expected[split]
        note = "" if n == official else f"  WARNING: differs from the {word} {official}"
        lines.append(f"  {split}: {n} examples ({word} {official}){note}")
    _say(quiet, f"Prepared {dataset.name} at {dataset_dir(dataset, data_dir)}:\n"
         + "\n".join(lines))


def prepare_voc(manual_dir: str | os.PathLike, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *,
                train_list: str | os.PathLike | None = None,
                val_list: str | os.PathLike | None = None, overwrite: bool = False,
                num_workers: int | None = None, quiet: bool = False,
                skip_checksum: bool = False) -> Path:
    """VOC 2012 + SBD -> ``mgd_voc_aug`` (train_aug, val). See builders/voc_aug.py for layouts;
    the archives read in place are checked against their published md5 unless
    `skip_checksum`."""
    from mgd_jax.data.builders.voc_aug import plan_voc

    dataset = resolve("voc")
    if is_prepared(dataset, data_dir) and not overwrite:
        return _build(dataset, data_dir, quiet=quiet)
    _say(quiet, f"Reading {manual_dir} (an archive read in place is checked against its "
         "published md5 first: seconds per GB) ...")
    plan, summary = plan_voc(manual_dir, train_list=train_list, val_list=val_list,
                             progress=not quiet, verify_checksums=not skip_checksum)
    summary["manual_dir"] = str(manual_dir)
    _say(quiet, "VOC label sources: " + ", ".join(
        f"{s}: {c}" for s, c in summary["label_sources"].items()))
    return _build(dataset, data_dir, plan=plan, summary=summary, overwrite=overwrite,
                  num_workers=num_workers, quiet=quiet)


def prepare_cityscapes(manual_dir: str | os.PathLike,
                       data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *,
                       train_list: str | os.PathLike | None = None,
                       val_list: str | os.PathLike | None = None, overwrite: bool = False,
                       num_workers: int | None = None, quiet: bool = False,
                       skip_checksum: bool = False) -> Path:
    """Cityscapes zips / folders -> ``mgd_cityscapes`` (train, val; trainIds); the zips are
    checked against their published md5 unless `skip_checksum`."""
    from mgd_jax.data.builders.cityscapes import plan_cityscapes

    dataset = resolve("cityscapes")
    if is_prepared(dataset, data_dir) and not overwrite:
        return _build(dataset, data_dir, quiet=quiet)
    _say(quiet, f"Reading {manual_dir} (a zip read in place is checked against its published "
         "md5 first: seconds per GB) ...")
    plan, summary = plan_cityscapes(manual_dir, train_list=train_list, val_list=val_list,
                                    verify_checksums=not skip_checksum)
    summary["manual_dir"] = str(manual_dir)
    return _build(dataset, data_dir, plan=plan, summary=summary, overwrite=overwrite,
                  num_workers=num_workers, quiet=quiet)


def prepare_folder(name: str, images: str | os.PathLike, masks: str | os.PathLike,
                   classes: str | os.PathLike, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                   *, palette: str | os.PathLike | None = None, ignore_value: int = IGNORE_INDEX,
                   val_images: str | os.PathLike | None = None,
                   val_masks: str | os.PathLike | None = None, val_fraction: float = 0.1,
                   val_seed: int = 0, mask_suffix: str = "",
                   unlabeled_images: str | os.PathLike | None = None, overwrite: bool = False,
                   num_workers: int | None = None, quiet: bool = False) -> str:
    """A dataset of your own (folders of images and index masks, optionally a folder of
    unlabeled images; see builders/folder.py) -> ``mgd_folder/<name>``; returns the name
    configs use (``config.dataset``)."""
    from mgd_jax.data.builders.folder import (
        FolderConfig,
        dataset_info,
        plan_folder,
        read_class_names,
        read_palette,
    )

    if custom_name(name) != name:
        raise DataError(
            f"--name={name!r}: a dataset name is lower-case letters, digits and '_', starting "
            "with a letter, and not a built-in dataset's name or alias"
        )
    dataset = resolve(name)
    if is_prepared(dataset, data_dir) and not overwrite:
        _build(dataset, data_dir, quiet=quiet)
        return name
    class_names = read_class_names(classes)
    if not 0 <= ignore_value <= 255 or ignore_value < len(class_names):
        raise DataError(f"ignore value {ignore_value}: expected {len(class_names)}..255, above "
                        f"the class ids 0..{len(class_names) - 1} of {classes}")
    colours = read_palette(palette, len(class_names)) if palette else None
    plan, summary = plan_folder(images, masks, val_images=val_images, val_masks=val_masks,
                                val_fraction=val_fraction, val_seed=val_seed,
                                mask_suffix=mask_suffix, unlabeled_images=unlabeled_images,
                                num_workers=num_workers)
    summary.update(classes=str(classes), palette=str(palette) if palette else None,
                   ignore_value=ignore_value)
    info = dataset_info(name, class_names, colours,
                        {split: len(items) for split, items in plan.items()})
    config = FolderConfig(name=name, info=info, ignore_value=ignore_value,
                          description=f"{name}: {len(class_names)} classes from {images}")
    _build(dataset, data_dir, plan=plan, summary=summary, config=config, overwrite=overwrite,
           num_workers=num_workers, quiet=quiet)
    if summary.get("unlabeled_only"):
        _say(quiet, f"  of train: {len(summary['unlabeled_only'])} unlabeled images (no mask, "
             f"from {unlabeled_images}); a run labels only images with a mask")
    return name


def synthetic_name(**sizes) -> str:
    """The ``open_split`` dataset name of a synthetic spec: "synthetic" for the defaults, else
    "synthetic/<config>"."""
    spec = synthetic.SyntheticSpec(**sizes)
    return "synthetic" if spec.config_name == "default" else f"synthetic/{spec.config_name}"


def prepare_synthetic(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, overwrite: bool = False,
                      num_workers: int | None = None, quiet: bool = False, **sizes) -> str:
    """Generates the synthetic dataset (sizes: num_classes, image_size, num_train, num_val,
    seed, boundary_ignore); returns its ``open_split`` name."""
    from mgd_jax.data.builders.synthetic import SyntheticConfig

    spec = synthetic.SyntheticSpec(**sizes)
    name = synthetic_name(**sizes)
    # The default spec must be named, not passed: tfds refuses a second config called "default".
    config = "default" if spec.config_name == "default" else SyntheticConfig.from_spec(spec)
    _build(resolve(name), data_dir, config=config, overwrite=overwrite,
           num_workers=num_workers, quiet=quiet)
    return name


def ensure_synthetic(data_dir: str | os.PathLike, **sizes) -> str:
    """Builds the synthetic dataset unless it is already there (a cheap file check), quietly;
    returns the name to pass to ``open_split``."""
    name = synthetic_name(**sizes)
    if not is_prepared(name, data_dir):
        prepare_synthetic(data_dir, quiet=True, **sizes)
    return name
