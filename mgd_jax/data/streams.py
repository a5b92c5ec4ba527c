"""From a config to this host's data streams: sources, the labeled/unlabeled partition, the
train stream and the eval stream. The one place that reads data-related config fields."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections

from mgd_jax.data import pipeline, sources, splits


class Subset:
    """A picklable view of a source restricted to some indices (grain-compatible)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.indices[index]]


@dataclasses.dataclass
class Streams:
    train: Any  # grain IterDataset of per-host batches (checkpointable iterator)
    eval_batches: Callable[[], Iterable[dict]]  # a fresh deterministic pass per call
    info: Any  # sources.DatasetInfo
    num_labeled: int
    num_unlabeled: int
    description: str


def partition_keys(config: ml_collections.ConfigDict, keys: list[str]) -> tuple[list, list, str]:
    """(labeled, unlabeled, how) for the configured partition."""
    if config.partition_source == "lists":
        labeled, unlabeled = splits.standard_lists(
            config.dataset, config.partition, os.path.expanduser(config.split_dir)
        )
        how = f"standard lists 1/{config.partition} from {config.split_dir}"
    else:
        if config.labeled_count > 0:
            labeled, unlabeled = splits.partition(
                keys, count=config.labeled_count, seed=config.seed
            )
            how = f"seeded partition: {config.labeled_count} labeled (seed {config.seed})"
        else:
            labeled, unlabeled = splits.partition(
                keys, fraction=1.0 / config.partition, seed=config.seed
            )
            how = f"seeded partition 1/{config.partition} (seed {config.seed})"
        logging.warning("Using a %s, not the standard split lists.", how)
    return labeled, unlabeled, how


def _data_dir(config: ml_collections.ConfigDict) -> str:
    if not config.data_dir:
        raise ValueError(
            "config.data_dir is empty: where the prepared datasets live (the demo keeps them in "
            "<demo workdir>/data)"
        )
    return os.path.expanduser(config.data_dir)


def eval_source(config: ml_collections.ConfigDict) -> Any:
    """The config's eval split (a prefix of it when `eval.max_examples` > 0)."""
    source = sources.open_split(config.dataset, config.eval_split, _data_dir(config))
    if config.eval.max_examples > 0:
        source = Subset(source, range(min(config.eval.max_examples, len(source))))
    return source


def eval_batches(config: ml_collections.ConfigDict, source: Any) -> Iterable[dict]:
    """One deterministic pass over `source` as this host's padded eval batches."""
    process_count = jax.process_count()
    if config.eval.batch_size % process_count:
        raise ValueError(
            f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
            f"{process_count} hosts"
        )
    return pipeline.eval_dataset(
        source,
        batch_size=config.eval.batch_size // process_count,
        pad_to=tuple(config.eval.pad_to),
        process_index=jax.process_index(),
        process_count=process_count,
        num_workers=config.num_workers,
    )


def make(config: ml_collections.ConfigDict, *, with_unlabeled: bool) -> Streams:
    train_source = sources.open_split(config.dataset, config.train_split, _data_dir(config))
    val_source = eval_source(config)
    info = train_source.info
    if info.num_classes != config.num_classes:
        raise ValueError(
            f"config.num_classes={config.num_classes} but {config.dataset} has "
            f"{info.num_classes} classes"
        )
    labeled_keys, unlabeled_keys, how = partition_keys(config, list(train_source.keys))
    labeled = Subset(train_source, sources.keys_to_indices(train_source, labeled_keys))
    unlabeled = Subset(train_source, sources.keys_to_indices(train_source, unlabeled_keys))

    process_index, process_count = jax.process_index(), jax.process_count()
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by {process_count} hosts"
        )
    train = pipeline.train_dataset(
        labeled,
        unlabeled if with_unlabeled else None,
        batch_size=config.batch_size // process_count,
        crop_size=config.crop_size,
        scales=tuple(config.scales),
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
        pairing=config.pairing,
        num_workers=config.num_workers,
    )

    description = (
        f"{config.dataset}: {len(train_source)} train ({how}: {len(labeled)} labeled, "
        f"{len(unlabeled)} unlabeled{'' if with_unlabeled else ' unused'}), "
        f"{len(val_source)} {config.eval_split}"
    )
    return Streams(
        train=train,
        eval_batches=functools.partial(eval_batches, config, val_source),
        info=info,
        num_labeled=len(labeled),
        num_unlabeled=len(unlabeled),
        description=description,
    )
