"""Sources: random access to example dicts. The reader of prepared splits (`open_split`), plus
in-memory (`ArraySource`) and subset (`Subset`) views; the input pipeline takes any `Source`.

A prepared dataset lives in `<data_dir>/<builder>/[<config>/]<version>/` (array_record shards,
tfds' `dataset_info.json` / `features.json`) plus our sidecar `mgd_dataset.json` holding the class
table and every split's keys in index order. The sidecar is written inside tfds' temporary
`incomplete.*` directory, so a directory that has it is complete.

`open_split(dataset, split, data_dir)` (``dataset``: a `datasets.Dataset` or its name) returns
a `PreparedSplit`: `len(src)`, `src[i] -> {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W),
"key": str}`, `src.keys`, `src.info`. It only reads JSON until the first example is requested,
and pickles without the open file handles (grain worker processes reopen them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mgd_jax.data import synthetic
from mgd_jax.data.datasets import (
    DATASETS,
    FOLDER_BUILDER,
    FOLDER_VERSION,
    PREPARE_COMMAND,
    Dataset,
    DatasetInfo,
    as_dataset,
)
from mgd_jax.runtime.errors import DataError

SIDECAR = "mgd_dataset.json"
SIDECAR_FORMAT = 1


class Source(Protocol):
    """What the input pipeline needs from a split: random access to example dicts
    {"image": uint8 (H, W, 3), "label": uint8 (H, W) (labeled sources), "key": str}."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
    """A picklable in-memory Source: lists/arrays of uint8 images (H,W,3) and labels (H,W).

    Handy for notebooks and tests. Images may differ in size. `labels=None` gives an unlabeled
    source (examples have no "label").
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None = None,
        keys: Sequence[str] | None = None,
        info: DatasetInfo | None = None,
    ):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"ArraySource: {len(images)} images but {len(labels)} labels")
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"ArraySource: {len(images)} images but {len(keys)} keys")
        self.images = list(images)
        self.labels = None if labels is None else list(labels)
        self.keys = [str(i) for i in range(len(images))] if keys is None else list(keys)
        self.info = info

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = {"image": self.images[index], "key": self.keys[index]}
        if self.labels is not None:
            ex["label"] = self.labels[index]
        return ex


class Subset:
    """A picklable view of a source restricted to some indices (grain-compatible)."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)
        self.info = getattr(source, "info", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[self.indices[index]]


def dataset_dir(dataset: str | Dataset, data_dir: str | os.PathLike) -> Path:
    """The version directory a prepared ``dataset`` occupies under ``data_dir``."""
    dataset = as_dataset(dataset)
    if dataset.own:
        return Path(data_dir).expanduser() / FOLDER_BUILDER / dataset.own / FOLDER_VERSION
    info = dataset.table()
    path = Path(data_dir).expanduser() / info.builder
    if dataset.builder_config:
        path = path / dataset.builder_config
    return path / info.version


def is_prepared(dataset: str | Dataset, data_dir: str | os.PathLike) -> bool:
    d = dataset_dir(dataset, data_dir)
    return (d / SIDECAR).is_file() and (d / "dataset_info.json").is_file()


def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SIDECAR
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the dataset sidecar ({e})") from e
    if meta.get("format") != SIDECAR_FORMAT:
        raise DataError(
            f"{path}: sidecar format {meta.get('format')!r}, expected {SIDECAR_FORMAT}; "
            "re-prepare the dataset with --overwrite"
        )
    return meta


def prepared_custom(data_dir: str | os.PathLike) -> list[str]:
    """The names of the user's own datasets prepared in ``data_dir``."""
    root = Path(data_dir).expanduser() / FOLDER_BUILDER
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{FOLDER_VERSION}")
                  if (p / SIDECAR).is_file())


def prepare_command(dataset: str | Dataset, data_dir: str | os.PathLike) -> str:
    """The command that prepares (with --overwrite: rebuilds) `dataset` in `data_dir`."""
    dataset = as_dataset(dataset)
    if dataset.own:
        return (f"{PREPARE_COMMAND} --dataset=folder --name={dataset.own} --data_dir={data_dir} "
                "<your image / mask options>")
    info = dataset.table()
    if info.name != "synthetic":
        return info.prepare_command.format(data_dir=data_dir)
    try:
        extra = synthetic.SyntheticSpec.from_config_name(dataset.builder_config).cli_args()
    except ValueError:
        extra = "<the size options of this config>"
    return f"{PREPARE_COMMAND} --dataset=synthetic --data_dir={data_dir} {extra}".rstrip()


def _not_prepared(dataset: Dataset, data_dir: str | os.PathLike, path: Path) -> DataError:
    if dataset.own:
        mine = prepared_custom(data_dir)
        return DataError(
            f"Dataset {dataset.name!r} is not prepared in {data_dir} (no complete dataset at "
            f"{path}): it is no built-in dataset ({', '.join(sorted(DATASETS))}) and no dataset "
            f"of your own prepared with `{PREPARE_COMMAND} --dataset=folder --name={dataset.own} "
            f"--data_dir={data_dir} ...`"
            + (f"; your datasets there: {mine}" if mine else "")
        )
    info = dataset.table()
    cmd = prepare_command(dataset, data_dir)
    found = ""
    builder_dir = Path(data_dir).expanduser() / info.builder
    if builder_dir.is_dir():
        present = sorted(
            str(p.parent.relative_to(builder_dir))
            for p in builder_dir.rglob(SIDECAR)
            if "incomplete" not in str(p)
        )
        if present:
            found = f" Prepared variants found under {builder_dir}: {present}."
    return DataError(
        f"Dataset {dataset.name!r} is not prepared in {data_dir} (no complete dataset at {path})."
        f"{found} Prepare it with: {cmd}"
    )


class PreparedSplit:
    """Random-access reader of one prepared split; decoded examples as numpy uint8."""

    def __init__(self, directory: str | os.PathLike, split: str, keys: Sequence[str],
                 info: DatasetInfo, rebuild: str = "", unlabeled_only: Sequence[str] = ()):
        self.directory = str(directory)
        self.rebuild = rebuild  # the command that rebuilds a damaged dataset
        self.split = split
        self.info = info
        self._keys = list(keys)
        # keys of images prepared without a mask (their label is all ignore): never labeled
        self.unlabeled_only = frozenset(unlabeled_only)
        self._ds = None  # never pickled: each worker process opens its own
        self._index: dict[str, int] | None = None
        # Opened here, in the constructing thread: tfds imports its modules under etils'
        # lazy_imports, which swaps `builtins.__import__` for the whole process; done first in a
        # prefetch thread it raced orbax's restore (a resumed run failed with "'LazyModule' object
        # is not callable").
        self._data()

    @property
    def keys(self) -> list[str]:
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _data(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(self.directory)
            ds = builder.as_data_source(split=self.split)
            if len(ds) != len(self._keys):
                raise DataError(
                    f"{self.directory}: split {self.split!r} has {len(ds)} records but "
                    f"{SIDECAR} lists {len(self._keys)} keys; re-prepare with --overwrite"
                )
            self._ds = ds
        return self._ds

    def _convert(self, index: int, ex: Mapping[str, Any]) -> dict[str, Any]:
        key = ex["key"]
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key != self._keys[index]:
            raise DataError(
                f"{self.directory}: record {index} of {self.split!r} is {key!r} but {SIDECAR} "
                f"says {self._keys[index]!r}; re-prepare with --overwrite"
            )
        label = ex["label"]
        if label.ndim == 3:
            label = label[..., 0]
        return {"image": np.asarray(ex["image"], np.uint8), "label": np.asarray(label, np.uint8),
                "key": key}

    def _check_index(self, index) -> int:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return i

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = [self._check_index(i) for i in indices]
        ds = self._data()
        try:
            records = (ds.__getitems__(idx) if hasattr(ds, "__getitems__")
                       else [ds[i] for i in idx])
        except Exception as e:  # riegeli / decoding errors of a damaged record file
            files = sorted(p.name for p in Path(self.directory).glob(f"*-{self.split}.*"))
            raise DataError(
                f"{self.directory}: records {idx[:4]} of split {self.split!r} cannot be read "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                f"; the dataset files {files[:3]} are damaged: rebuild them with "
                f"{self.rebuild or PREPARE_COMMAND} --overwrite") from e
        return [self._convert(i, ex) for i, ex in zip(idx, records, strict=True)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def index_of(self, key: str) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
        return self._index[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_index"] = None
        return state

    def __repr__(self) -> str:
        return (f"PreparedSplit({self.info.name}:{self.split}, {len(self)} examples, "
                f"{self.directory})")


def open_split(dataset: str | Dataset, split: str, data_dir: str | os.PathLike) -> PreparedSplit:
    """Opens a prepared split. ``dataset``: a `datasets.Dataset`, or its name: "voc" |
    "cityscapes" | "synthetic[/<config>]" (or the builder names), or the name of a dataset of the
    user's own; ``split``: e.g. "train_aug"/"val" (VOC; "train" is accepted for "train_aug"),
    "train"/"val" (the others)."""
    dataset = as_dataset(dataset)
    path = dataset_dir(dataset, data_dir)
    if not (path / SIDECAR).is_file() or not (path / "dataset_info.json").is_file():
        raise _not_prepared(dataset, data_dir, path)
    meta = read_sidecar(path)
    info = DatasetInfo.from_json(meta["info"])
    splits = meta["splits"]
    if split not in splits and split == "train" and info.train_split in splits:
        split = info.train_split
    if split not in splits:
        raise DataError(
            f"Dataset {dataset.name!r} at {path} has no split {split!r}; available: "
            f"{sorted(splits)}"
        )
    unlabeled = meta.get("source", {}).get("unlabeled_only", []) if split == info.train_split \
        else []
    return PreparedSplit(path, split, splits[split]["keys"], info,
                         rebuild=prepare_command(dataset, data_dir), unlabeled_only=unlabeled)


def keys_to_indices(source: PreparedSplit | Sequence[str], keys: Iterable[str]) -> np.ndarray:
    """Indices (int64, in the order of ``keys``) of ``keys`` in ``source``; raises
    :class:`DataError` naming the ids that the source does not contain."""
    if isinstance(source, PreparedSplit):
        lookup = source.index_of
        where = repr(source)
    else:
        table = {k: i for i, k in enumerate(source)}
        lookup = table.__getitem__
        where = f"the given {len(table)} keys"
    out, missing = [], []
    for k in keys:
        try:
            out.append(lookup(k))
        except KeyError:
            missing.append(k)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} id(s) not found in {where}: {shown}")
    return np.asarray(out, np.int64)
