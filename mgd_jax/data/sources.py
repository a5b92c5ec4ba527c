"""Dataset descriptions and random-access sources over the prepared tfds datasets.

A prepared dataset lives in ``<data_dir>/<builder>/[<config>/]<version>/`` (array_record shards,
tfds' ``dataset_info.json`` / ``features.json``) plus our sidecar ``mgd_dataset.json`` holding the
class table and every split's keys in index order. The sidecar is written inside tfds' temporary
``incomplete.*`` directory, so a directory that has it is complete.

``open_split(dataset, split, data_dir)`` returns a :class:`Source`: ``len(src)``,
``src[i] -> {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W), "key": str}``, ``src.keys``,
``src.info``. It only reads JSON until the first example is requested, and pickles without the
open file handles (grain worker processes reopen them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIDECAR = "mgd_dataset.json"
SIDECAR_FORMAT = 1
IGNORE_INDEX = 255


class DataError(ValueError):
    """Bad or missing data: the message names the file / id and what was expected."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, independent of where (or whether) it has been prepared."""

    name: str  # short name used in configs: "voc", "cityscapes", "synthetic"
    builder: str  # tfds builder name: "mgd_voc_aug", ...
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # one RGB colour per class id
    split_sizes: Mapping[str, int]  # official (expected) number of examples per split
    train_split: str
    eval_split: str
    ignore_index: int = IGNORE_INDEX
    version: str = "1.0.0"  # tfds version directory of the prepared data
    config: str | None = None  # tfds builder config (synthetic only)
    prepare_command: str = ""  # how to prepare it, for error messages

    def __post_init__(self):
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"DatasetInfo {self.name!r}: {self.num_classes} classes but "
                f"{len(self.class_names)} names and {len(self.palette)} palette colours"
            )

    def palette_array(self) -> np.ndarray:
        """(256, 3) uint8 lookup table: class id -> colour; the ignore index -> (224, 224, 192)."""
        lut = np.zeros((256, 3), np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, np.uint8)
        lut[self.ignore_index] = (224, 224, 192)  # VOC's boundary colour
        return lut

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["split_sizes"] = dict(self.split_sizes)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DatasetInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["class_names"] = tuple(d["class_names"])
        d["palette"] = tuple(tuple(int(c) for c in rgb) for rgb in d["palette"])
        d["split_sizes"] = dict(d["split_sizes"])
        return cls(**d)


def voc_colormap(n: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (bit-interleaved class id), first ``n`` entries."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _cityscapes_classes() -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    # The official label table; trainIds 0..18 in order.
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {lb.trainId: lb for lb in labels if 0 <= lb.trainId < 255}
    ids = sorted(by_train_id)
    assert ids == list(range(19)), ids
    return (
        tuple(by_train_id[i].name for i in ids),
        tuple(tuple(by_train_id[i].color) for i in ids),
    )


_CITY_NAMES, _CITY_PALETTE = _cityscapes_classes()

_PREPARE = "python -m mgd_jax.data.prepare"

DATASETS: dict[str, DatasetInfo] = {
    "voc": DatasetInfo(
        name="voc",
        builder="mgd_voc_aug",
        num_classes=21,
        class_names=VOC_CLASSES,
        palette=voc_colormap(21),
        split_sizes={"train_aug": 10582, "val": 1449},
        train_split="train_aug",
        eval_split="val",
        prepare_command=f"{_PREPARE} voc --manual_dir=<folder with VOCdevkit + SBD> "
        "--data_dir={data_dir}",
    ),
    "cityscapes": DatasetInfo(
        name="cityscapes",
        builder="mgd_cityscapes",
        num_classes=19,
        class_names=_CITY_NAMES,
        palette=_CITY_PALETTE,
        split_sizes={"train": 2975, "val": 500},
        train_split="train",
        eval_split="val",
        prepare_command=f"{_PREPARE} cityscapes --manual_dir=<folder with the Cityscapes zips> "
        "--data_dir={data_dir}",
    ),
}


def _synthetic_default() -> DatasetInfo:
    from mgd_jax.data import synthetic

    return synthetic.dataset_info(synthetic.SyntheticSpec())


DATASETS["synthetic"] = _synthetic_default()

_ALIASES = {
    "voc": "voc",
    "voc_aug": "voc",
    "mgd_voc_aug": "voc",
    "pascal_voc": "voc",
    "cityscapes": "cityscapes",
    "city": "cityscapes",
    "mgd_cityscapes": "cityscapes",
    "synthetic": "synthetic",
    "mgd_synthetic": "synthetic",
}


def resolve(dataset: str) -> tuple[DatasetInfo, str | None]:
    """``"voc"`` / ``"mgd_voc_aug"`` / ``"synthetic/<config>"`` -> (base info, config name)."""
    name, _, config = dataset.partition("/")
    key = _ALIASES.get(name.lower())
    if key is None:
        raise DataError(
            f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)} "
            "(or 'synthetic/<config>')"
        )
    info = DATASETS[key]
    if config and info.config is None:
        raise DataError(f"Dataset {dataset!r}: {key} has no builder configs")
    return info, (config or info.config)


def dataset_dir(dataset: str, data_dir: str | os.PathLike) -> Path:
    """The version directory a prepared ``dataset`` occupies under ``data_dir``."""
    info, config = resolve(dataset)
    path = Path(data_dir).expanduser() / info.builder
    if config:
        path = path / config
    return path / info.version


def is_prepared(dataset: str, data_dir: str | os.PathLike) -> bool:
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


def _not_prepared(dataset: str, data_dir: str | os.PathLike, path: Path) -> DataError:
    info, config = resolve(dataset)
    if info.name == "synthetic":
        from mgd_jax.data.synthetic import SyntheticSpec

        try:
            extra = SyntheticSpec.from_config_name(config).cli_args()
        except ValueError:
            extra = "<the size options of this config>"
        cmd = f"{_PREPARE} synthetic --data_dir={data_dir} {extra}".rstrip()
    else:
        cmd = info.prepare_command.format(data_dir=data_dir)
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
        f"Dataset {dataset!r} is not prepared in {data_dir} (no complete dataset at {path})."
        f"{found} Prepare it with: {cmd}"
    )


class Source:
    """Random-access view of one prepared split; decoded examples as numpy uint8."""

    def __init__(self, directory: str | os.PathLike, split: str, keys: Sequence[str],
                 info: DatasetInfo):
        self.directory = str(directory)
        self.split = split
        self.info = info
        self._keys = list(keys)
        self._ds = None  # opened lazily; never pickled
        self._index: dict[str, int] | None = None

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
        i = self._check_index(index)
        return self._convert(i, self._data()[i])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = [self._check_index(i) for i in indices]
        ds = self._data()
        records = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
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
        return f"Source({self.info.name}:{self.split}, {len(self)} examples, {self.directory})"


def open_split(dataset: str, split: str, data_dir: str | os.PathLike) -> Source:
    """Opens a prepared split. ``dataset``: "voc" | "cityscapes" | "synthetic[/<config>]" (or
    the builder names); ``split``: e.g. "train_aug"/"val" (VOC; "train" is accepted for
    "train_aug"), "train"/"val" (Cityscapes, synthetic)."""
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
            f"Dataset {dataset!r} at {path} has no split {split!r}; available: {sorted(splits)}"
        )
    return Source(path, split, splits[split]["keys"], info)


def keys_to_indices(source: Source | Sequence[str], keys: Iterable[str]) -> np.ndarray:
    """Indices (int64, in the order of ``keys``) of ``keys`` in ``source``; raises
    :class:`DataError` naming the ids that the source does not contain."""
    if isinstance(source, Source):
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
