"""Procedural segmentation data: the embedded default dataset for the demo and the tests.

Each foreground class is a (shape, texture) pair, e.g. "disc+stripes" or "square+dots", chosen so
that every used shape appears with at least two textures and every used texture with at least two
shapes (once there are 3+ foreground classes): neither shape nor texture alone gives the class.
Objects get random colours (so colour carries no information), sizes, rotations, texture periods
and phases; the background is coloured value noise, sometimes with a faint full-image texture;
distractor objects (a shape/texture pair that is not a class, or a flat / noisy fill) are labelled
background. A one-pixel band along every label boundary is 255 (ignore), as in VOC.

Every example is a pure function of (seed, split, index) through its own numpy Generator, so the
dataset is identical on every host and in every run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import numpy as np
from PIL import Image

from mgd_jax.data.datasets import DATASETS, IGNORE_INDEX, DatasetInfo, voc_colormap

SHAPES = ("disc", "triangle", "square", "cross", "ring", "diamond")
TEXTURES = ("stripes", "dots", "checker", "grid")
DISTRACTOR_FILLS = ("flat", "noise")  # never a class: objects filled like this are background
SPLIT_CODES = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic dataset. The default builds in about a second."""

    num_classes: int = 5  # including background
    image_size: int = 64
    num_train: int = 400
    num_val: int = 100
    seed: int = 0
    boundary_ignore: bool = True  # 1-px 255 band along label boundaries
    max_distractors: int = 2  # non-class objects per image: 0..max_distractors
    object_size: int = 20  # mean object radius, % of the image size (radius ±30%)
    # Classes start at this pair of the class grid (`class_pairs`); the pairs before it never
    # appear, not even as distractors: a source task that shares no class with the default one
    # (the demo's stand-in for ImageNet pre-training).
    first_class: int = 0

    def __post_init__(self):
        if self.first_class < 0:
            raise ValueError(f"first_class={self.first_class}: expected >= 0")
        # keep >= 1 distractor pair
        max_classes = 1 + len(SHAPES) * len(TEXTURES) - 1 - self.first_class
        if not 2 <= self.num_classes <= max_classes:
            raise ValueError(f"num_classes={self.num_classes}: expected 2..{max_classes}")
        if self.image_size < 24:
            raise ValueError(f"image_size={self.image_size}: expected >= 24")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train={self.num_train}, num_val={self.num_val}: expected >= 1")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors={self.max_distractors}: expected >= 0")
        if not 5 <= self.object_size <= 45:
            raise ValueError(f"object_size={self.object_size}: expected 5..45 (% of the image)")

    @property
    def config_name(self) -> str:
        """tfds config name: "default" for the defaults, else the sizes spelled out."""
        if self == SyntheticSpec():
            return "default"
        name = (f"c{self.num_classes}_s{self.image_size}_n{self.num_train}_v{self.num_val}"
                f"_seed{self.seed}")
        if self.max_distractors != 2:
            name += f"_d{self.max_distractors}"
        if self.object_size != 20:
            name += f"_o{self.object_size}"
        if self.first_class:
            name += f"_f{self.first_class}"
        return name if self.boundary_ignore else name + "_nb"

    @classmethod
    def from_config_name(cls, name: str) -> SyntheticSpec:
        """Inverse of :attr:`config_name`."""
        if name == "default":
            return cls()
        m = re.fullmatch(
            r"c(\d+)_s(\d+)_n(\d+)_v(\d+)_seed(\d+)(?:_d(\d+))?(?:_o(\d+))?(?:_f(\d+))?(_nb)?",
            name,
        )
        if m is None:
            raise ValueError(f"{name!r} is not a synthetic config name")
        c, s, n, v, seed = (int(g) for g in m.groups()[:5])
        return cls(c, s, n, v, seed, boundary_ignore=m.group(9) is None,
                   max_distractors=int(m.group(6) or 2), object_size=int(m.group(7) or 20),
                   first_class=int(m.group(8) or 0))

    def cli_args(self) -> str:
        """The ``prepare synthetic`` options that build this spec."""
        default = SyntheticSpec()
        args = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == getattr(default, field.name):
                continue
            if isinstance(value, bool):  # absl boolean flags: --name / --noname
                args.append(f"--{'' if value else 'no'}{field.name}")
            else:
                args.append(f"--{field.name}={value}")
        return " ".join(args)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val}


def class_grid() -> list[tuple[str, str]]:
    """Every (shape, texture) pair in the order classes are taken: growing "square shells" of the
    shape x texture grid ((0,0); then (0,1), (1,0), (1,1); ...), so with 3+ classes each shape and
    each texture is shared by 2 classes."""
    grid = sorted(
        itertools.product(range(len(SHAPES)), range(len(TEXTURES))),
        key=lambda st: (max(st), st),
    )
    return [(SHAPES[s], TEXTURES[t]) for s, t in grid]


def class_pairs(num_classes: int, first_class: int = 0) -> list[tuple[str, str]]:
    """(shape, texture) of classes 1..num_classes-1."""
    return class_grid()[first_class: first_class + num_classes - 1]


def class_names(num_classes: int, first_class: int = 0) -> tuple[str, ...]:
    return ("background",) + tuple(f"{s}+{t}" for s, t in class_pairs(num_classes, first_class))


def dataset_info(spec: SyntheticSpec) -> DatasetInfo:
    """The `DatasetInfo` of a synthetic spec (the table's "synthetic" entry, resized)."""
    return dataclasses.replace(
        DATASETS["synthetic"],
        num_classes=spec.num_classes,
        class_names=class_names(spec.num_classes, spec.first_class),
        palette=voc_colormap(spec.num_classes),
        split_sizes=spec.split_sizes,
        config=spec.config_name,
    )


def _rotated(x, y, angle):
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of a unit-radius shape in object coordinates (u, v)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1
        return (v <= 0.5) & (v >= -1.0 + np.sqrt(3.0) * np.abs(u))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(shape)


def _texture(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             scale: float) -> np.ndarray:
    """Binary pattern over the whole image, random period / orientation / phase."""
    if kind == "flat":
        return np.zeros(x.shape, bool)
    if kind == "noise":  # 2-px random cells
        cells = rng.random((x.shape[0] // 2 + 1, x.shape[1] // 2 + 1)) < 0.5
        return cells.repeat(2, 0).repeat(2, 1)[: x.shape[0], : x.shape[1]]
    period = rng.uniform(4.5, 7.0) * scale
    a, b = _rotated(x, y, rng.uniform(0.0, math.pi))
    a = a + rng.uniform(0.0, period)
    b = b + rng.uniform(0.0, period)
    if kind == "stripes":
        return np.mod(a, period) < period / 2
    if kind == "dots":
        p = period * 1.3
        da, db = np.mod(a, p) - p / 2, np.mod(b, p) - p / 2
        return da * da + db * db < (0.3 * p) ** 2
    if kind == "checker":
        return (np.floor(a / period) + np.floor(b / period)) % 2 == 0
    if kind == "grid":
        p = period * 1.2
        return (np.mod(a, p) < 0.3 * p) | (np.mod(b, p) < 0.3 * p)
    raise ValueError(kind)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart for the texture to be visible."""
    a = rng.uniform(0, 255, 3)
    while True:
        b = rng.uniform(0, 255, 3)
        if np.abs(a - b).mean() >= 60:
            return a, b


def _value_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    k = int(rng.integers(3, 7))
    coarse = Image.fromarray(rng.random((k, k)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float64)


def object_kinds(spec: SyntheticSpec, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(label, shape, fill) of one image's objects: 1-3 of classes, then 0..max_distractors
    distractors (label 0); the pairs before `spec.first_class` are never drawn."""
    pairs = class_pairs(spec.num_classes, spec.first_class)
    absent = set(class_grid()[: spec.first_class])
    distractor_pairs = [
        (s, t) for s in SHAPES for t in TEXTURES + DISTRACTOR_FILLS
        if (s, t) not in pairs and (s, t) not in absent
    ]
    objects = [(int(c), *pairs[c - 1]) for c in rng.integers(1, spec.num_classes,
                                                             int(rng.integers(1, 4)))]
    n_distractors = int(rng.integers(0, spec.max_distractors + 1))
    for j in rng.integers(0, len(distractor_pairs), n_distractors):
        objects.append((0, *distractor_pairs[j]))
    return objects


def render(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Example ``index`` of ``split``: (image uint8 (S, S, 3), label uint8 (S, S))."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLIT_CODES)}")
    rng = np.random.default_rng([spec.seed, SPLIT_CODES[split], index])
    size = spec.image_size
    scale = size / 64.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    # Background: two-colour value noise, sometimes under a faint texture of a class kind.
    c0, c1 = _colour_pair(rng)
    g = _value_noise(rng, size)[..., None]
    image = c0 * (1 - g) + c1 * g
    if rng.random() < 0.35:
        t = _texture(str(rng.choice(TEXTURES)), x, y, rng, scale)[..., None]
        image = image + (t - 0.5) * rng.uniform(15, 35)
    image = image + rng.normal(0.0, rng.uniform(3, 10), image.shape)
    label = np.zeros((size, size), np.uint8)

    # Objects drawn in random order (later ones occlude).
    objects = object_kinds(spec, rng)
    for k in rng.permutation(len(objects)):
        cls, shape, fill = objects[k]
        r = rng.uniform(0.7, 1.3) * spec.object_size / 100 * size
        cx, cy = rng.uniform(0.2 * r, size - 0.2 * r, 2)
        u, v = _rotated((x - cx) / r, (y - cy) / r, rng.uniform(0, 2 * math.pi))
        mask = _shape_mask(shape, u, v)
        a, b = _colour_pair(rng)
        t = _texture(fill, x, y, rng, scale)[..., None]
        pixels = np.where(t, a, b) + rng.normal(0.0, 4.0, image.shape)
        image = np.where(mask[..., None], pixels, image)
        label[mask] = cls

    if spec.boundary_ignore:
        edge = np.zeros(label.shape, bool)
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        label[edge] = IGNORE_INDEX
    image = image + rng.normal(0.0, 2.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
