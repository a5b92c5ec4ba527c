"""The input pipeline: from a config to this host's train and eval streams (grain).

`create_streams(config, dataset, with_unlabeled=...)` is what the trainer calls; `train_dataset` and
`eval_dataset` are the grain pipelines it builds, usable on any `sources.Source`.

Everything up to batching is a grain `MapDataset` (random access, element = f(index)), so:

* the output does not depend on `num_workers`: `mp_prefetch` only distributes whole batches over
  worker processes (worker i computes batches i, i+k, ...), and a batch is the same wherever it is
  computed (per-element RNG = f(seed, element index));
* the iterator state is tiny (essentially the next batch index), see "Checkpointing" below;
* multi-host sharding is an index mapping, see "Sharding" below.

Training stream (`train_dataset`), per host and step: one labeled batch, two unlabeled batches and
one CutMix mask per batch slot (the layout is in `train_dataset`'s docstring). Each stream
is an *infinite* repeat of its split, reshuffled every epoch, and the streams advance independently.
The official code instead pads every list to `max_samples` (repeats plus random extra indices) so
the loaders have equal length and an "epoch" is `max_samples // batch` steps; an infinite
independent repeat per stream is the clean equivalent (every example is seen equally often, no list
padding), and the trainer counts epochs as steps (docs/method.md §4.2).

Pairing of the two unlabeled batches:
* "independent" (default, recommended by the spec): u0 and u1 follow two independent random orders.
* "official": u0[i] and u1[i] are the *same* unlabeled image with two independent augmentations,
  and the unlabeled order is one fixed permutation repeated every epoch (official loaders,
  docs/method.md §4.4).

Sharding (`process_index` / `process_count`): the pipeline first defines one *global* stream of
examples (global batch = batch_size * process_count); global step k holds global examples
[k*GB, (k+1)*GB) and host p takes the slots [p*B, (p+1)*B) of it. The augmentation RNG of an example
depends on its global index only, so the union over hosts of one global step, concatenated in
process order, is exactly the batch a single host with batch_size=GB would produce. Within an epoch
of a stream the hosts' examples are disjoint and together cover the split.

Checkpointing: a train iterator's position is saved and restored with the train state
(`checkpoint.Checkpointer`; in memory `it.get_state()` / `it.set_state(state)`). Restore with the
same arguments (sources, batch size, seed, process layout) and the same `num_workers` (the state
of a multi-worker iterator records the per-worker positions).

Worker processes are *spawned*: the transforms here are module-level picklable classes, the sources
must be picklable, and a script that uses `num_workers > 0` must guard its entry point with
`if __name__ == "__main__":` (spawned workers re-import the main module) and have absl flags parsed
(the tools' `cli.run` does that; elsewhere call `absl.flags.FLAGS.mark_as_parsed()`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from mgd_jax.data import augment, cutmix, splits
from mgd_jax.data.datasets import IGNORE_INDEX, Dataset, as_dataset
from mgd_jax.data.sources import Source, Subset, keys_to_indices, open_split
from mgd_jax.runtime import parallel
from mgd_jax.runtime.errors import ConfigError, DataError

PAIRINGS = ("independent", "official")  # of the two unlabeled streams (module doc)
# Where the labeled images come from: the standard split lists; a seeded random draw; or "masks":
# the images prepared with a mask (a dataset of your own), or those of `config.labeled_list`.
PARTITION_SOURCES = ("lists", "seeded", "masks")


# --------------------------------------------------------------------------------------------------
# Per-element transforms (module level so that spawned workers can unpickle them).


class Augment(grain.transforms.RandomMap):
    """Source example -> {"image" uint8, "valid" bool[, "label" uint8]} (official TrainPre).

    Unlabeled (`labeled=False`): any label in the source is ignored.
    """

    def __init__(self, crop_size: tuple[int, int], scales: Sequence[float], labeled: bool):
        self.crop_size = crop_size
        self.scales = tuple(float(s) for s in scales)
        self.labeled = labeled

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        key = element.get("key", "?")
        if self.labeled and element.get("label") is None:
            raise ValueError(f"labeled example {key!r} has no 'label'")
        image, valid, label = augment.train_augment(
            rng,
            element["image"],
            element["label"] if self.labeled else None,
            crop_size=self.crop_size,
            scales=self.scales,
            key=key,
        )
        if not self.labeled:
            return {"image": image, "valid": valid}
        # uint8 to the device (class ids < 255 = ignore): a quarter of int32's bytes.
        return {"image": image, "valid": valid, "label": label}


class AddCutMixMask(grain.transforms.RandomMap):
    """Adds "mask": uint8 (h, w) box mask (1 = take unlabeled_1) to a training slot."""

    def __init__(self, crop_size: tuple[int, int], mask_kwargs: dict[str, Any] | None = None):
        self.crop_size = crop_size
        self.mask_kwargs = dict(mask_kwargs or {})

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return {**element, "mask": cutmix.box_mask(rng, self.crop_size, **self.mask_kwargs)}


class EvalPad(grain.transforms.Map):
    """Whole image padded centred: {"image" uint8, "valid" bool, "label" int32 (255 on padding)}."""

    def __init__(self, pad_to: tuple[int, int]):
        self.pad_to = pad_to

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        image, valid, label = augment.eval_pad(
            element["image"], element["label"], self.pad_to, key=element.get("key", "?")
        )
        return {"image": image, "valid": valid, "label": label.astype(np.int32)}


def _limit_cv2_threads(worker_index: int, worker_count: int) -> None:
    # Each worker process is one unit of parallelism; OpenCV's own thread pool would oversubscribe.
    del worker_index, worker_count
    import cv2

    cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------------
# Small MapDataset nodes.


class _DictZip(grain.MapDataset):
    """Element i = {name: parents[name][i]} (all parents infinite streams)."""

    def __init__(self, parents: dict[str, grain.MapDataset]):
        super().__init__(list(parents.values()))
        self._names = tuple(parents)
        self._length = min(len(p) for p in self.parents)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return {name: p[index] for name, p in zip(self._names, self.parents, strict=True)}

    def __str__(self) -> str:
        return f"DictZip({', '.join(self._names)})"


class _PadWithInvalid(grain.MapDataset):
    """Extends a finite eval dataset to `length` with fully-invalid examples (label 255)."""

    def __init__(self, parent: grain.MapDataset, length: int, pad_to: tuple[int, int]):
        super().__init__(parent)
        if length < len(parent):
            raise ValueError(f"cannot pad {len(parent)} examples to {length}")
        self._length = length
        self._pad_to = pad_to

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index < len(self._parent):
            return {**self._parent[index], "index": np.int32(index)}
        h, w = self._pad_to
        return {
            "image": np.zeros((h, w, 3), np.uint8),
            "valid": np.zeros((h, w), np.bool_),
            "label": np.full((h, w), IGNORE_INDEX, np.int32),
            "index": np.int32(-1),
        }

    def __str__(self) -> str:
        return f"PadWithInvalid(length={self._length})"


def _seeds(seed: int, n: int) -> list[int]:
    # Explicit per-node seeds (not grain's position-dependent defaults), so adding a node never
    # reshuffles.
    return [
        int(s) for s in np.random.SeedSequence([int(seed), 0x6D6764]).generate_state(n, np.uint32)
    ]


def _host_batches(
    examples: grain.MapDataset, batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """Global example stream -> this host's batches (slots [p*B, (p+1)*B) of every global batch)."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    if batch_size <= 0:
        raise ValueError(f"batch_size (per host) must be positive, got {batch_size}")
    # Batches of B consecutive global examples; global step k = batches [k*P, (k+1)*P); host p takes
    # p::P.
    return examples.batch(batch_size, drop_remainder=True)[process_index::process_count]


def _to_iter(
    ds: grain.MapDataset,
    num_workers: int,
    read_threads: int,
    prefetch: int,
    worker_init_fn: Callable[[int, int], None] | None,
) -> grain.IterDataset:
    # grain's default ReadOptions (16 threads, 500 prefetched elements) would buffer 500 *batches*.
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=prefetch if read_threads else 0
        )
    )
    if num_workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=worker_init_fn or _limit_cv2_threads,
        )
    return it


# --------------------------------------------------------------------------------------------------
# Public datasets.


def train_dataset(
    labeled: Source,
    unlabeled: Source | None = None,
    *,
    batch_size: int,
    crop_size: int | Sequence[int],
    scales: Sequence[float] = augment.TRAIN_SCALES,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    pairing: str = "independent",
    num_workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    mask_kwargs: dict[str, Any] | None = None,
    worker_init_fn: Callable[[int, int], None] | None = None,
) -> grain.IterDataset:
    """Infinite MGD training stream for this host (see the module docstring).

    Yields numpy dicts: {"labeled": {"image" uint8 (B,h,w,3), "valid" bool (B,h,w), "label" uint8
    (B,h,w)}, "unlabeled_0": {"image", "valid"}, "unlabeled_1": {"image", "valid"}, "mask" uint8
    (B,h,w)}; without `unlabeled` only "labeled". `batch_size` is per host. `read_threads` threads
    compute batches ahead in each process (0 = synchronously on `next`), `prefetch` batches are
    buffered per process; `num_workers` > 0 moves the work to that many spawned processes (same
    output). `mask_kwargs` are passed to `cutmix.box_mask` (default: the official box mask).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if len(labeled) == 0:
        raise ValueError("train_dataset: the labeled source is empty")
    if unlabeled is not None and len(unlabeled) == 0:
        raise ValueError("train_dataset: the unlabeled source is empty")
    crop = augment.as_pair(crop_size)
    (s_lab, s_u0, s_u1, a_lab, a_u0, a_u1, s_mask) = _seeds(seed, 7)

    def stream(src: Source, shuffle_seed: int, reshuffle: bool = True) -> grain.MapDataset:
        # Infinite repeat; with reshuffle each epoch is a new permutation (grain folds the epoch
        # into the shuffle seed), without it the first permutation repeats.
        return (
            grain.MapDataset.source(src)
            .shuffle(seed=shuffle_seed)
            .repeat(reseed_each_epoch=reshuffle)
        )

    augment_labeled = Augment(crop, scales, labeled=True)
    slots = {"labeled": stream(labeled, s_lab).random_map(augment_labeled, seed=a_lab)}
    if unlabeled is not None:
        if pairing == "official":
            # One fixed order shared by both streams: u0[i], u1[i] = one image, two augmentations.
            u0 = u1 = stream(unlabeled, s_u0, reshuffle=False)
        else:
            u0, u1 = stream(unlabeled, s_u0), stream(unlabeled, s_u1)
        slots["unlabeled_0"] = u0.random_map(Augment(crop, scales, labeled=False), seed=a_u0)
        slots["unlabeled_1"] = u1.random_map(Augment(crop, scales, labeled=False), seed=a_u1)
    examples = _DictZip(slots)
    if unlabeled is not None:
        examples = examples.random_map(AddCutMixMask(crop, mask_kwargs), seed=s_mask)
    batches = _host_batches(examples, batch_size, process_index, process_count)
    return _to_iter(batches, num_workers, read_threads, prefetch, worker_init_fn)


def eval_steps(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every host yields in one `eval_dataset` pass."""
    return math.ceil(num_examples / (batch_size * process_count))


def eval_dataset(
    source: Source,
    *,
    batch_size: int,
    pad_to: int | Sequence[int],
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    read_threads: int = 1,
    prefetch: int = 2,
    with_index: bool = False,
) -> grain.IterDataset:
    """One deterministic pass over `source`, whole images padded centred to `pad_to` (static shape).

    Yields {"image" uint8 (B,H,W,3), "valid" bool (B,H,W), "label" int32 (B,H,W), 255 on padding} (+
    "index" int32 (B,): source index, -1 for filler, if `with_index`). The split is extended with
    fully-invalid filler examples to a multiple of the global batch, so every host yields
    `eval_steps(len(source), batch_size, process_count)` batches and every real pixel is seen
    exactly once over all hosts. `pad_to` must cover the largest image (the error names the key).
    """
    pad = augment.as_pair(pad_to)
    n = len(source)
    length = eval_steps(n, batch_size, process_count) * batch_size * process_count
    examples = _PadWithInvalid(grain.MapDataset.source(source).map(EvalPad(pad)), length, pad)
    if not with_index:
        examples = examples.map(_DropIndex())
    batches = _host_batches(examples, batch_size, process_index, process_count)
    return _to_iter(batches, num_workers, read_threads, prefetch, None)


class _DropIndex(grain.transforms.Map):
    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in element.items() if k != "index"}


# --------------------------------------------------------------------------------------------------
# From a config.


@dataclasses.dataclass
class Streams:
    """This host's data for one run."""

    train: grain.IterDataset  # per-host train batches (iterators are checkpointable)
    eval_batches: Callable[[], Iterable[dict]]  # a fresh deterministic pass per call
    num_eval_batches: int  # batches of one eval pass on this host
    info: Any  # datasets.DatasetInfo
    num_labeled: int
    num_unlabeled: int
    description: str


def partition_keys(config: ml_collections.ConfigDict, keys: list[str],
                   dataset: Dataset | None = None, unlabeled_only: Collection[str] = (),
                   ) -> tuple[list, list, str]:
    """(labeled, unlabeled, how) for the configured partition (`dataset`: the config's, resolved;
    else its name is). `unlabeled_only`: keys prepared without a mask; they are never labeled
    (a seeded draw leaves them out, a list that names one is refused) and always unlabeled."""
    dataset = config.dataset if dataset is None else dataset
    unlabeled_only = set(unlabeled_only)
    masked = [k for k in keys if k not in unlabeled_only]
    labeled_list = config.get("labeled_list", "")
    if labeled_list and config.partition_source != "masks":
        raise ConfigError(f"config.labeled_list={labeled_list!r} is read with "
                          f"partition_source=masks, not {config.partition_source!r}")
    if labeled_list:
        labeled = sorted(splits.read_list(os.path.expanduser(labeled_list)))
        present = set(keys)
        unknown = [k for k in labeled if k not in present]
        if unknown:
            raise DataError(f"{labeled_list}: {len(unknown)} listed id(s) are not in the train "
                            f"split: {', '.join(unknown[:10])}")
        unlabeled = sorted(set(keys) - set(labeled))
        how = f"labeled ids from {labeled_list}"
    elif config.partition_source == "masks":
        labeled, unlabeled = sorted(masked), sorted(unlabeled_only)
        how = "the images prepared with a mask"
    elif config.partition_source == "lists" and config.split_dir:
        labeled, unlabeled = splits.standard_lists(
            dataset, config.partition, os.path.expanduser(config.split_dir)
        )
        # sorted: the same partition gives the same run whichever list order the files have
        labeled, unlabeled = sorted(labeled), sorted(unlabeled)
        how = f"standard lists 1/{config.partition} from {config.split_dir}"
    elif config.partition_source == "lists":
        labeled, unlabeled = splits.builtin_partition(dataset, config.partition, keys)
        how = f"standard partition 1/{config.partition} (built in)"
    else:
        if config.labeled_count > 0:
            labeled, unlabeled = splits.partition(
                masked, count=config.labeled_count, seed=config.seed
            )
            how = f"seeded partition: {config.labeled_count} labeled (seed {config.seed})"
        else:
            labeled, unlabeled = splits.partition(
                masked, fraction=1.0 / config.partition, seed=config.seed
            )
            how = f"seeded partition 1/{config.partition} (seed {config.seed})"
        unlabeled = sorted(unlabeled + sorted(unlabeled_only))
        logging.warning("Using a %s, not the standard split lists.", how)
    maskless = [k for k in labeled if k in unlabeled_only]
    if maskless:
        where = labeled_list or config.split_dir or "the labeled ids"
        raise DataError(f"{where}: {len(maskless)} labeled id(s) were prepared without a mask "
                        f"(unlabeled images): {', '.join(maskless[:10])}")
    return labeled, unlabeled, how


def _data_dir(config: ml_collections.ConfigDict) -> str:
    if not config.data_dir:
        raise ConfigError(
            "config.data_dir is empty: where the prepared datasets live (the demo keeps them in "
            "<demo workdir>/data)"
        )
    return os.path.expanduser(config.data_dir)


def eval_source(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Any:
    """The config's eval split (a prefix of it when `eval.max_examples` > 0); `dataset`: the
    config's, resolved (else its name is)."""
    source = open_split(config.dataset if dataset is None else dataset, config.eval_split,
                        _data_dir(config))
    if config.eval.max_examples > 0:
        source = Subset(source, range(min(config.eval.max_examples, len(source))))
    return source


def num_eval_batches(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """The batches `eval_batches` yields on this host for `num_examples` examples."""
    return eval_steps(num_examples, parallel.process_share(config.eval.batch_size,
                                                           "eval.batch_size"),
                      jax.process_count())


def eval_batches(config: ml_collections.ConfigDict, source: Any) -> Iterable[dict]:
    """One deterministic pass over `source` as this host's padded eval batches."""
    return eval_dataset(
        source,
        batch_size=parallel.process_share(config.eval.batch_size, "eval.batch_size"),
        pad_to=tuple(config.eval.pad_to),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.num_workers,
    )


def create_streams(config: ml_collections.ConfigDict, dataset: Dataset | None = None, *,
                   with_unlabeled: bool) -> Streams:
    """This host's train stream and eval passes for `config` (the trainer's one data call);
    `dataset`: the config's, resolved (else its name is)."""
    dataset = as_dataset(config.dataset if dataset is None else dataset)
    train_source = open_split(dataset, config.train_split, _data_dir(config))
    val_source = eval_source(config, dataset)
    info = train_source.info
    if info.num_classes != config.num_classes:
        raise ConfigError(
            f"config.num_classes={config.num_classes} but {config.dataset} has "
            f"{info.num_classes} classes"
        )
    labeled_keys, unlabeled_keys, how = partition_keys(
        config, list(train_source.keys), dataset,
        unlabeled_only=getattr(train_source, "unlabeled_only", ()))
    for what, chosen in (("labeled", labeled_keys), ("unlabeled", unlabeled_keys)):
        if not chosen and (what == "labeled" or with_unlabeled):
            raise DataError(f"{config.dataset}: {how} leaves no {what} image in the train split "
                            f"of {len(train_source)}")
    labeled = Subset(train_source, keys_to_indices(train_source, labeled_keys))
    unlabeled = Subset(train_source, keys_to_indices(train_source, unlabeled_keys))

    train = train_dataset(
        labeled,
        unlabeled if with_unlabeled else None,
        batch_size=parallel.process_share(config.batch_size, "batch_size"),
        crop_size=config.crop_size,
        scales=tuple(config.scales),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
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
        num_eval_batches=num_eval_batches(config, len(val_source)),
        info=info,
        num_labeled=len(labeled),
        num_unlabeled=len(unlabeled),
        description=description,
    )
