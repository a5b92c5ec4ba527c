"""Labeled / unlabeled partitions of a training split.

Seeded (:func:`partition`), or the standard CPS / MGD partitions: built in for VOC and Cityscapes
(:func:`builtin_labeled`, package data in ``data/partitions/``, MIT-licensed, see the LICENSE
there), or read from a user's own list files (:func:`standard_lists`, :func:`read_list`):

* VOC: ``train_aug_labeled_1-{p}.txt`` / ``train_aug_unlabeled_1-{p}.txt``, one id per line
  (``2007_000032``; CRLF tolerated);
* Cityscapes: the same names under ``config_new/subset_train/``, each line
  ``/images/train/<key>.png<TAB>/segmentation/train/<key>_gtFine.png``; the key is the
  ``<city>_<seq>_<frame>`` stem of the image path.
"""

from __future__ import annotations

import collections
import functools
import importlib.resources
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from mgd_jax.data.datasets import Dataset, as_dataset
from mgd_jax.runtime.errors import DataError

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_KEY_SUFFIXES = ("_leftImg8bit", "_gtFine_labelIds", "_gtFine_labelTrainIds", "_gtFine")


def line_key(line: str) -> str:
    """The example key of one list line.

    ``2007_000032`` -> itself; ``/images/train/jena_000078_000019.png<TAB>...`` or
    ``JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`` -> the first field's file
    stem, without a Cityscapes ``_leftImg8bit`` / ``_gtFine*`` suffix.
    """
    first = line.strip().split()[0]
    if "/" in first or "\\" in first or first.lower().endswith(_IMAGE_SUFFIXES):
        first = first.replace("\\", "/").rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(first)
        if ext.lower() in _IMAGE_SUFFIXES:
            first = stem
        for suffix in _KEY_SUFFIXES:
            if first.endswith(suffix):
                first = first[: -len(suffix)]
                break
    return first


def read_list(path: str | os.PathLike) -> list[str]:
    """Keys listed in a split file (either format), in file order. Blank lines are skipped;
    duplicate keys are dropped with a warning."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split list ({e})") from e
    return parse_list(text, str(path))


def parse_list(text: str, where: str) -> list[str]:
    """`read_list` of a list file's text (`where` names it in the warning)."""
    keys, seen, dups = [], set(), []
    for line in text.splitlines():  # handles \n, \r\n and \r
        if not line.strip():
            continue
        key = line_key(line)
        if key in seen:
            dups.append(key)
            continue
        seen.add(key)
        keys.append(key)
    if dups:
        warnings.warn(f"{where}: {len(dups)} duplicate id(s) ignored, e.g. {dups[:5]}",
                      stacklevel=3)
    return keys


def labeled_count(num_examples: int, fraction: float | Fraction) -> int:
    """ceil(N * fraction): the sizes of the standard lists (VOC 1/16 of 10582 -> 662,
    Cityscapes 1/2 of 2975 -> 1488)."""
    frac = Fraction(fraction).limit_denominator(1 << 20)
    if not 0 < frac <= 1:
        raise ValueError(f"fraction={fraction}: expected 0 < fraction <= 1")
    return math.ceil(num_examples * frac)


def partition(keys: Sequence[str], *, fraction: float | Fraction | None = None,
              count: int | None = None, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of ``keys`` into (labeled, unlabeled): disjoint, covering, each sorted.

    Give ``fraction`` (e.g. 1/8: ceil(N/8) labeled) or ``count``. The result depends only on the
    set of keys and the seed (not on their order), and for one seed the labeled sets are nested
    (the 1/16 set is inside the 1/8 set) because they are prefixes of one permutation.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction= or count=")
    ordered = sorted(keys)
    n = len(ordered)
    if len(set(ordered)) != n:
        dup = sorted(k for k, c in collections.Counter(ordered).items() if c > 1)[:5]
        raise DataError(f"partition: keys are not unique (e.g. {dup})")
    k = labeled_count(n, fraction) if fraction is not None else int(count)
    if not 0 <= k <= n:
        raise ValueError(f"count={count}: expected 0..{n}")
    perm = np.random.default_rng(seed).permutation(n)
    chosen = np.zeros(n, bool)
    chosen[perm[:k]] = True
    labeled = [key for key, c in zip(ordered, chosen, strict=True) if c]
    unlabeled = [key for key, c in zip(ordered, chosen, strict=True) if not c]
    return labeled, unlabeled


def _list_folders(dataset: str, list_dir: Path) -> list[Path]:
    if dataset == "cityscapes":
        subs = ["", "subset_train", "config_new/subset_train", "city/config_new/subset_train",
                "DATA/city/config_new/subset_train"]
    else:
        subs = ["", "subset_train_aug", "pascal_voc/subset_train_aug",
                "DATA/pascal_voc/subset_train_aug"]
    return [list_dir / s if s else list_dir for s in subs]


def standard_lists(dataset: str | Dataset, partition: int, list_dir: str | os.PathLike, *,
                   prefix: str = "train_aug") -> tuple[list[str], list[str]]:
    """Reads ``{prefix}_labeled_1-{partition}.txt`` and ``{prefix}_unlabeled_1-{partition}.txt``.

    ``list_dir`` is the folder holding them, or a parent in the CPS / MGD layout (VOC:
    ``subset_train_aug/``; Cityscapes: ``config_new/subset_train/``). Overlapping lists only warn
    (the ``pseudoseg`` lists share one id per pair).
    """
    dataset = as_dataset(dataset)
    info = dataset.table()
    root = Path(list_dir).expanduser()
    names = (f"{prefix}_labeled_1-{partition}.txt", f"{prefix}_unlabeled_1-{partition}.txt")
    folders = _list_folders(info.name, root)
    for folder in folders:
        if all((folder / n).is_file() for n in names):
            lab_path, unl_path = folder / names[0], folder / names[1]
            break
    else:
        raise DataError(
            f"{dataset.name} 1/{partition} split lists {names[0]} and {names[1]} not found in any "
            f"of {[str(f) for f in folders]}. Point the list folder at the CPS/MGD split files "
            "(e.g. DATA/pascal_voc/subset_train_aug or DATA/city/config_new/subset_train)."
        )
    labeled, unlabeled = read_list(lab_path), read_list(unl_path)
    for path, keys in ((lab_path, labeled), (unl_path, unlabeled)):
        if not keys:
            raise DataError(f"{path}: the split list is empty")
    overlap = set(labeled) & set(unlabeled)
    if overlap:
        warnings.warn(
            f"{lab_path} and {unl_path} share {len(overlap)} id(s), e.g. {sorted(overlap)[:5]}",
            stacklevel=2,
        )
    return labeled, unlabeled


STANDARD_PARTITIONS = (16, 8, 4, 2)  # 1/p of the train split labeled


def _partition_file(name: str):
    return importlib.resources.files("mgd_jax.data") / "partitions" / f"{name}.txt"


def has_builtin(dataset: str | Dataset) -> bool:
    """Whether the package ships the standard partitions of ``dataset`` (VOC, Cityscapes)."""
    try:
        info = as_dataset(dataset).table()
    except DataError:  # a user's own dataset
        return False
    return _partition_file(info.name).is_file()


@functools.lru_cache(maxsize=4)
def _read_builtin(name: str) -> dict[int, tuple[str, ...]]:
    """The shipped file's sections: partition p -> the ids labeled first at 1/p.

    Compact form (see the file's header): each id once, under ``[1/p]`` for the finest partition
    that labels it; the partitions are nested."""
    file = _partition_file(name)
    sections: dict[int, list[str]] = {}
    current = None
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[1/") and line.endswith("]"):
            current = sections.setdefault(int(line[3:-1]), [])
        elif current is None:
            raise DataError(f"{file}:{number}: an id before the first [1/p] section")
        else:
            current.append(line)
    return {p: tuple(ids) for p, ids in sections.items()}


def builtin_labeled(dataset: str | Dataset, partition: int) -> list[str]:
    """The labeled ids (sorted) of the standard 1/``partition`` split of ``dataset``, from the
    package data: VOC ``train_aug`` (662 / 1,323 / 2,646 / 5,291 of 10,582) and Cityscapes
    ``train`` (186 / 372 / 744 / 1,488 of 2,975). The unlabeled ids are the rest of the split."""
    dataset = as_dataset(dataset)
    info = dataset.table()
    if not has_builtin(dataset):
        raise DataError(f"{dataset.name}: no built-in standard partitions (only "
                        "voc and cityscapes); give split lists or a seeded partition")
    sections = _read_builtin(info.name)
    if partition not in sections:
        raise DataError(f"{dataset.name}: the standard partitions are 1/{sorted(sections)}, "
                        f"not 1/{partition}")
    return sorted(k for p, ids in sections.items() if p >= partition for k in ids)


def builtin_partition(dataset: str | Dataset, partition: int,
                      keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) of the prepared train split's ``keys`` under the built-in standard
    partition; both sorted. Raises :class:`DataError` naming labeled ids the split lacks."""
    dataset = as_dataset(dataset)
    labeled = builtin_labeled(dataset, partition)
    present = set(keys)
    missing = [k for k in labeled if k not in present]
    if missing:
        raise DataError(
            f"{dataset.name} 1/{partition}: {len(missing)} of the {len(labeled)} standard labeled "
            f"ids are not in the prepared train split of {len(present)} images (e.g. "
            f"{missing[:5]}); was it prepared from the standard train split?"
        )
    official = dataset.table()
    expected = official.split_sizes.get(official.train_split)
    if expected is not None and len(present) != expected:
        warnings.warn(
            f"{dataset.name}: the prepared train split has {len(present)} images, the standard one "
            f"{expected}; the unlabeled set (the rest of the split) is not the standard one",
            stacklevel=2,
        )
    chosen = set(labeled)
    return labeled, sorted(k for k in present if k not in chosen)


def check_disjoint_cover(labeled: Iterable[str], unlabeled: Iterable[str],
                         keys: Iterable[str]) -> None:
    """Raises :class:`DataError` unless labeled and unlabeled are disjoint and cover ``keys``."""
    lab, unl, all_keys = set(labeled), set(unlabeled), set(keys)
    problems = []
    if lab & unl:
        problems.append(f"{len(lab & unl)} ids in both (e.g. {sorted(lab & unl)[:5]})")
    if (lab | unl) - all_keys:
        extra = sorted((lab | unl) - all_keys)
        problems.append(f"{len(extra)} ids not in the split (e.g. {extra[:5]})")
    if all_keys - (lab | unl):
        miss = sorted(all_keys - (lab | unl))
        problems.append(f"{len(miss)} ids of the split in neither (e.g. {miss[:5]})")
    if problems:
        raise DataError("labeled/unlabeled partition: " + "; ".join(problems))
