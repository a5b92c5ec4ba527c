"""The dataset table: what each dataset is (classes, colours, splits, label conventions),
independent of where or whether it has been prepared. Every other data module and the tools read
it; it imports nothing of the project but its error types.

A config names its dataset by a string; `resolve` turns the name into a `Dataset` once, at the
top of a run (`config_lib.validate`, the tools), and the data modules take that `Dataset`. Their
public functions also accept the name (resolved there, by `as_dataset`) for tools and notebooks.

Labels are class ids with `IGNORE_INDEX` (255) for "not counted" (VOC object boundaries,
Cityscapes void classes, padding), as in the official code (docs/method.md §6.2).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mgd_jax.runtime.errors import DataError

IGNORE_INDEX = 255
IGNORE_COLOUR = (224, 224, 192)  # VOC's boundary colour
PREPARE_COMMAND = "mgd-prepare"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is. `name` is the short name configs use ("voc"); `builder` the tfds name."""

    name: str
    builder: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # one RGB colour per class id
    split_sizes: Mapping[str, int]  # official (expected) number of examples per split
    train_split: str
    eval_split: str
    ignore_index: int = IGNORE_INDEX
    version: str = "1.0.0"  # tfds version directory of the prepared data
    config: str | None = None  # tfds builder config (synthetic only)
    prepare_command: str = ""  # how to prepare it, for error messages ({data_dir} filled in)

    def __post_init__(self):
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"DatasetInfo {self.name!r}: {self.num_classes} classes but "
                f"{len(self.class_names)} names and {len(self.palette)} palette colours"
            )

    def palette_array(self) -> np.ndarray:
        """(256, 3) uint8 lookup table: class id -> colour; the ignore index -> VOC's boundary."""
        return lookup_table(self.palette, self.ignore_index)

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
    """The PASCAL VOC colour map (bit-interleaved class id), first `n` entries."""
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


def lookup_table(colours, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(256, 3) uint8 colour table: class id -> colour, the ignore index -> VOC's boundary."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colours)] = np.asarray(colours, np.uint8).reshape(-1, 3)
    lut[ignore_index] = IGNORE_COLOUR
    return lut


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Cityscapes trainIds 0..18: name and colour of the official label table
# (cityscapesscripts.helpers.labels; a test checks this copy against it).
CITYSCAPES_CLASSES = (
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)), ("fence", (190, 153, 153)), ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
)  # fmt: skip

# The whole official label table as (labelId, name, trainId): the *_labelIds.png masks hold
# labelIds, the builder maps them to trainIds (255: not evaluated; license plate's -1 ids are
# in no mask). A test checks this copy against cityscapesscripts.helpers.labels too.
CITYSCAPES_LABELS = (
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18), (-1, "license plate", -1),
)  # fmt: skip

# The synthetic dataset's default spec (mgd_jax.data.synthetic.SyntheticSpec()); a prepared
# synthetic dataset records its own class table, this entry names the builder and its defaults.
SYNTHETIC_DEFAULT_CLASSES = (
    "background", "disc+stripes", "disc+dots", "triangle+stripes", "triangle+dots",
)

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
        prepare_command=f"{PREPARE_COMMAND} --dataset=voc "
        "--manual_dir=<folder with VOCdevkit + SBD> --data_dir={data_dir}",
    ),
    "cityscapes": DatasetInfo(
        name="cityscapes",
        builder="mgd_cityscapes",
        num_classes=19,
        class_names=tuple(name for name, _ in CITYSCAPES_CLASSES),
        palette=tuple(colour for _, colour in CITYSCAPES_CLASSES),
        split_sizes={"train": 2975, "val": 500},
        train_split="train",
        eval_split="val",
        prepare_command=f"{PREPARE_COMMAND} --dataset=cityscapes "
        "--manual_dir=<folder with the Cityscapes zips> --data_dir={data_dir}",
    ),
    "synthetic": DatasetInfo(
        name="synthetic",
        builder="mgd_synthetic",
        num_classes=len(SYNTHETIC_DEFAULT_CLASSES),
        class_names=SYNTHETIC_DEFAULT_CLASSES,
        palette=voc_colormap(len(SYNTHETIC_DEFAULT_CLASSES)),
        split_sizes={"train": 400, "val": 100},
        train_split="train",
        eval_split="val",
        config="default",
        prepare_command=f"{PREPARE_COMMAND} --dataset=synthetic --data_dir={{data_dir}}",
    ),
}

ALIASES = {
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


# A user's own dataset (`mgd-prepare --dataset=folder --name=<name>`) is no table entry: its
# prepared directory's sidecar records its DatasetInfo. Configs name it "<name>" or "folder/<name>".
FOLDER_BUILDER = "mgd_folder"
FOLDER_VERSION = "1.0.0"
CUSTOM_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def custom_name(dataset: str) -> str | None:
    """The name of a user's own dataset: "folder/<name>", or a bare name that is no built-in
    dataset or alias; None for the built-in datasets (and for names that cannot be one)."""
    head, _, tail = dataset.partition("/")
    name = tail if head == "folder" else (None if tail or head.lower() in ALIASES else head)
    return name if name and CUSTOM_NAME.fullmatch(name) else None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A config's dataset name, resolved (`resolve`): what the data modules need to find, build
    and describe it without reading the name again."""

    name: str  # as the config gives it (messages, reports)
    info: DatasetInfo | None  # the table's entry; None for a user's own dataset (its sidecar's)
    builder_config: str | None = None  # the tfds builder config (synthetic)
    own: str | None = None  # the name of a user's own dataset (`prepare_folder`)

    @property
    def builder_key(self) -> str:
        """Its builder's key in `data.builders.BUILDERS`."""
        return "folder" if self.own else self.table().name

    def table(self) -> DatasetInfo:
        """The table's entry; a user's own dataset has none (the error names the choices)."""
        if self.info is None:
            raise _unknown(self.name)
        return self.info


def _unknown(dataset: str) -> DataError:
    return DataError(
        f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)} "
        "(or 'synthetic/<config>'), or the name of your own prepared dataset"
    )


def resolve(dataset: str) -> Dataset:
    """`"voc"` / `"mgd_voc_aug"` / `"synthetic/<config>"` / a user's own dataset's name (bare
    or "folder/<name>") -> its `Dataset`; the one place a dataset name is read."""
    own = custom_name(dataset)
    if own:
        return Dataset(name=dataset, info=None, own=own)
    name, _, config = dataset.partition("/")
    key = ALIASES.get(name.lower())
    if key is None:
        raise _unknown(dataset)
    info = DATASETS[key]
    if config and info.config is None:
        raise DataError(f"Dataset {dataset!r}: {key} has no builder configs")
    return Dataset(name=dataset, info=info, builder_config=config or info.config)


def as_dataset(dataset: str | Dataset) -> Dataset:
    """`dataset` itself, or the name resolved (public entry points of the data modules)."""
    return dataset if isinstance(dataset, Dataset) else resolve(dataset)


def palette_for(num_classes: int, dataset: str | Dataset | None = None) -> np.ndarray:
    """(256, 3) uint8 colour table for predictions: the named dataset's; without a name, VOC's
    for 21 classes, Cityscapes' for 19, the VOC colour map otherwise."""
    if dataset:
        named = as_dataset(dataset)
        info = named.table()
        if info.num_classes != num_classes and info.name != "synthetic":
            raise DataError(
                f"dataset {named.name!r} has {info.num_classes} classes, the network {num_classes}"
            )
        if info.num_classes == num_classes:
            return info.palette_array()
    for info in DATASETS.values():
        if info.name != "synthetic" and info.num_classes == num_classes:
            return info.palette_array()
    return lookup_table(voc_colormap(num_classes))
