"""Shared pieces of the tfds builders: file references (plain files, zip or tar members), the
downloads' published checksums, folders on disk or inside archives read in place (`Tree`), strict
image / mask decoding with errors that name the file, and the base builder that writes the
``mgd_dataset.json`` sidecar inside tfds' temporary directory (so it is renamed into place
together with the data, or not at all)."""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm.auto import tqdm

from mgd_jax.data import augment
from mgd_jax.data.datasets import CITYSCAPES_LABELS, DATASETS, IGNORE_INDEX, DatasetInfo
from mgd_jax.data.sources import SIDECAR, SIDECAR_FORMAT
from mgd_jax.runtime.errors import DataError

# Label file kinds the builders understand.
INDEX_PNG = "index_png"  # class ids in a 'P' (palette: the indices) or 'L' PNG
SBD_MAT = "sbd_mat"  # SBD cls/*.mat: GTcls.Segmentation
CITYSCAPES_LABEL_IDS = "cityscapes_label_ids"  # *_gtFine_labelIds.png, mapped to trainIds


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file on disk, or a member of an archive: of a zip, or of an uncompressed tar (`span`:
    its data's byte offset and size), or one read from a compressed tar (`data`)."""

    path: str
    member: str | None = None
    span: tuple[int, int] | None = None
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    @property
    def name(self) -> str:
        return os.path.basename(self.member or self.path)


class ZipPool:
    """One open ZipFile per (archive, thread): ZipFile objects are not safe to share."""

    def __init__(self):
        self._local = threading.local()

    def read(self, ref: FileRef) -> bytes:
        if ref.data is not None:
            return ref.data
        if ref.member is None or ref.span is not None:
            with open(ref.path, "rb") as f:
                if ref.span is None:
                    return f.read()
                f.seek(ref.span[0])
                data = f.read(ref.span[1])
            if len(data) != ref.span[1]:
                raise OSError(f"the archive ends {ref.span[1] - len(data)} bytes early")
            return data
        cache = self._local.__dict__.setdefault("zips", {})
        zf = cache.get(ref.path)
        if zf is None:
            zf = cache[ref.path] = zipfile.ZipFile(ref.path)
        return zf.read(ref.member)


# The official downloads whose checksums are published: name -> (md5, size, where published).
ARCHIVES = {
    "VOCtrainval_11-May-2012.tar": (
        "6cd6e144f989b92b3379bac3b3de84fd", "2 GB",
        "torchvision.datasets.VOCSegmentation (torchvision/datasets/voc.py)"),
    "benchmark.tgz": (
        "82b4d87ceb2ed10f6038a1cba92111cb", "1.4 GB",
        "torchvision.datasets.SBDataset (torchvision/datasets/sbd.py)"),
    "leftImg8bit_trainvaltest.zip": (
        "0a6e97e94b616a514066c9e2adb0c97f", "11 GB",
        "the Cityscapes download page (www.cityscapes-dataset.com/downloads, packageID=3)"),
    "gtFine_trainvaltest.zip": (
        "4237c19de34c8a376e9ba46b495d6f66", "241 MB",
        "the Cityscapes download page (www.cityscapes-dataset.com/downloads, packageID=1)"),
}


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: str | os.PathLike, *, verify: bool = True) -> None:
    """Checks a download against its published md5 (`ARCHIVES`, by file name); archives of
    other names, and `verify=False`, pass unchecked."""
    path = Path(path)
    if not verify or path.name not in ARCHIVES:
        return
    want, _, where = ARCHIVES[path.name]
    got = md5sum(path)
    if got != want:
        raise DataError(f"{path}: md5 {got} is not the published {want} (from {where}): a "
                        "damaged or different download; download it again, or pass "
                        "--skip_checksum to use it anyway")


class Archive:
    """The members of a tar (plain or compressed) read in place, by name. A plain tar's members
    are read by byte range when needed; a compressed one is read once, in order, keeping the
    bytes of the members `keep(name)` selects (the others are listed, not readable)."""

    def __init__(self, path: str | os.PathLike, keep=lambda name: True):
        self.path = Path(path)
        self.files: dict[str, FileRef | None] = {}
        self.dirs: dict[str, list[str]] = {"": []}
        try:
            with open(self.path, "rb") as f:
                compressed = f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))
            with tarfile.open(self.path, "r|*" if compressed else "r:") as tar:
                for info in tar:
                    if info.isfile():
                        self._add(info, tar, compressed, keep)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{self.path}: cannot read tar archive ({type(e).__name__}: "
                            f"{e})") from e

    def _add(self, info: tarfile.TarInfo, tar: tarfile.TarFile, compressed: bool, keep) -> None:
        name = posixpath.normpath(info.name).lstrip("/")  # "./a/b" -> "a/b"
        ref = None
        if not compressed:
            ref = FileRef(str(self.path), name, span=(info.offset_data, info.size))
        elif keep(name):
            ref = FileRef(str(self.path), name, data=tar.extractfile(info).read())
        self.files[name] = ref
        parent, base = posixpath.split(name)
        self.dirs.setdefault(parent, []).append(base)
        while parent:  # every ancestor is a folder (a tar need not list folders)
            parent = posixpath.dirname(parent)
            self.dirs.setdefault(parent, [])

    def ref(self, name: str) -> FileRef:
        ref = self.files.get(name)
        if ref is None:
            raise DataError(f"{self.path}:{name}: not read from the compressed archive; "
                            "extract the archive and point --manual_dir at the extracted folder")
        return ref


class Tree:
    """A folder on disk, or a folder inside an `Archive`: the few path operations the planners
    use (`/`, is_dir, is_file, names, ref, read_text)."""

    def __init__(self, path: str | os.PathLike, archive: Archive | None = None,
                 member: str = ""):
        self.path, self.archive, self.member = Path(path), archive, member

    def __truediv__(self, name: str) -> Tree:
        if self.archive is None:
            return Tree(self.path / name)
        return Tree(self.path, self.archive, posixpath.join(self.member, name))

    def __str__(self) -> str:
        return str(self.path) if self.archive is None else f"{self.path}:{self.member}"

    def is_dir(self) -> bool:
        return self.path.is_dir() if self.archive is None else self.member in self.archive.dirs

    def is_file(self) -> bool:
        return self.path.is_file() if self.archive is None else self.member in self.archive.files

    def names(self) -> list[str]:
        """The files directly inside (none when it is no folder)."""
        if self.archive is None:
            return os.listdir(self.path) if self.path.is_dir() else []
        return list(self.archive.dirs.get(self.member, []))

    def ref(self) -> FileRef:
        return FileRef(str(self.path)) if self.archive is None else self.archive.ref(self.member)

    def read_text(self) -> str:
        try:
            data = read_bytes(self.ref())
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{self}: not a text file ({e})") from e


@dataclasses.dataclass(frozen=True)
class Entry:
    """One example to write: its key, image file and label file (+ how to read the label);
    `label=None`: an unlabeled image (its stored mask is all `IGNORE_INDEX`)."""

    key: str
    image: FileRef
    label: FileRef | None
    label_kind: str = INDEX_PNG


def read_bytes(ref: FileRef, zips: ZipPool | None = None) -> bytes:
    try:
        return (zips or ZipPool()).read(ref)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{ref}: cannot read file ({e})") from e


def decode_image(ref: FileRef, data: bytes, store_format: str,
                 keep_modes: tuple[str, ...] = ("RGB", "L")) -> tuple[bytes, tuple[int, int]]:
    """Fully decodes ``data`` (catches corrupt / truncated files) and returns the bytes to store
    (the original file when it is a JPEG or PNG in one of `keep_modes`, else re-encoded as RGB)
    and (h, w)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in keep_modes or im.format not in ("JPEG", "PNG"):
                buf = io.BytesIO()
                rgb = Image.fromarray(augment.rgb8(im, str(ref)))
                rgb.save(buf, format="JPEG" if store_format == "jpeg" else "PNG",
                         **({"quality": 95} if store_format == "jpeg" else {}))
                data = buf.getvalue()
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{ref}: corrupt or unreadable image ({type(e).__name__}: {e})") from e
    return data, (size[1], size[0])


def decode_index_png(ref: FileRef, data: bytes) -> np.ndarray:
    """Class ids from a palette ('P': the palette indices, never luminance) or 'L' PNG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.array(im)
                if arr.min() < 0 or arr.max() > 255:
                    raise DataError(
                        f"{ref}: 16/32-bit mask with values outside 0..255 "
                        f"(min {arr.min()}, max {arr.max()})"
                    )
                return arr.astype(np.uint8)
            mode = im.mode
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{ref}: corrupt or unreadable mask ({type(e).__name__}: {e})") from e
    raise DataError(
        f"{ref}: mask has PIL mode {mode!r}; expected a single-channel index mask "
        "(palette 'P' or greyscale 'L' PNG holding class ids), not a colour image"
    )


def decode_sbd_mat(ref: FileRef, data: bytes) -> np.ndarray:
    """SBD ``cls/<id>.mat``: the ``GTcls.Segmentation`` class-id array."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data))
        seg = mat["GTcls"][0, 0]["Segmentation"]
    except Exception as e:
        raise DataError(
            f"{ref}: cannot read SBD annotation GTcls.Segmentation ({type(e).__name__}: {e})"
        ) from e
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.min() < 0 or seg.max() > 255:
        raise DataError(f"{ref}: GTcls.Segmentation has shape {seg.shape}, "
                        f"values {seg.min()}..{seg.max()}; expected a 2-D class-id array")
    return seg.astype(np.uint8)


def cityscapes_lut() -> np.ndarray:
    """labelId -> trainId lookup (256 entries): the 19 evaluated classes -> 0..18, every other
    labelId -> 255. Entries for byte values that are not labelIds are -1 (rejected)."""
    lut = np.full(256, -1, np.int16)
    for label_id, _, train_id in CITYSCAPES_LABELS:
        if 0 <= label_id < 256:
            lut[label_id] = train_id if 0 <= train_id < 255 else IGNORE_INDEX
    return lut


_CITY_LUT = None


def map_cityscapes_label_ids(ref: FileRef, label_ids: np.ndarray) -> np.ndarray:
    global _CITY_LUT
    if _CITY_LUT is None:
        _CITY_LUT = cityscapes_lut()
    mapped = _CITY_LUT[label_ids]
    if (mapped < 0).any():
        bad = np.unique(label_ids[mapped < 0])
        raise DataError(f"{ref}: values {bad.tolist()[:10]} are not Cityscapes labelIds "
                        "(expected 0..33; is this a *_gtFine_labelIds.png?)")
    return mapped.astype(np.uint8)


def decode_label(ref: FileRef, data: bytes, kind: str) -> np.ndarray:
    if kind == INDEX_PNG:
        return decode_index_png(ref, data)
    if kind == SBD_MAT:
        return decode_sbd_mat(ref, data)
    if kind == CITYSCAPES_LABEL_IDS:
        return map_cityscapes_label_ids(ref, decode_index_png(ref, data))
    raise ValueError(f"unknown label kind {kind!r}")


def check_label_values(ref: FileRef, label: np.ndarray, num_classes: int,
                       ignore_value: int = IGNORE_INDEX) -> None:
    counts = np.bincount(label.ravel(), minlength=256)
    counts[:num_classes] = 0
    counts[ignore_value] = 0
    if counts.any():
        bad = np.flatnonzero(counts).tolist()
        raise DataError(
            f"{ref}: label values {bad[:10]} outside [0, {num_classes}) and the ignore "
            f"value {ignore_value}"
        )


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 (H, W) array ('L': single-channel, so OpenCV decodes class ids, where a
    palette PNG would decode as colour) or (H, W, 3) RGB array."""
    buf = io.BytesIO()
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_example(entry: Entry, num_classes: int, store_format: str,
                 zips: ZipPool | None = None, ignore_value: int = IGNORE_INDEX,
                 keep_modes: tuple[str, ...] = ("RGB", "L")) -> dict[str, Any]:
    """Reads, checks and converts one entry into the feature dict handed to tfds; a mask's
    `ignore_value` is stored as `IGNORE_INDEX` (see `decode_image` for `keep_modes`)."""
    image_bytes, (h, w) = decode_image(entry.image, read_bytes(entry.image, zips), store_format,
                                       keep_modes)
    if entry.label is None:  # an unlabeled image: every pixel ignored (a tiny constant PNG)
        label = np.full((h, w), IGNORE_INDEX, np.uint8)
        return {"image": image_bytes, "label": png_bytes(label), "key": entry.key}
    label = decode_label(entry.label, read_bytes(entry.label, zips), entry.label_kind)
    if label.shape != (h, w):
        raise DataError(
            f"{entry.label}: mask is {label.shape[1]}x{label.shape[0]} (w x h) but its image "
            f"{entry.image} is {w}x{h}"
        )
    check_label_values(entry.label, label, num_classes, ignore_value)
    if ignore_value != IGNORE_INDEX:  # the check above leaves IGNORE_INDEX free
        label = np.where(label == ignore_value, np.uint8(IGNORE_INDEX), label)
    return {"image": image_bytes, "label": png_bytes(label), "key": entry.key}


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
                window: int = 64) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool (PIL / zlib release the GIL), in order, with at most
    ``window`` results in flight so large images do not pile up in memory."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _SplitProgress:
    """One tqdm bar across all shards of a split."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self._args = dict(desc=desc, total=total, unit="img", mininterval=1.0,
                          disable=not enabled)
        self._bar = None

    def update(self) -> None:
        if self._bar is None:
            self._bar = tqdm(**self._args)
        self._bar.update()
        if self._bar.n >= self._bar.total:
            self._bar.close()


class MgdBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
    """Base of our builders: array_record shards written in plan order (tfds' shard-based path:
    no shuffler, so no TensorFlow and memory bounded by one shard) and the ``mgd_dataset.json``
    sidecar (class table + keys in index order) written with the data."""

    DATASET: str = ""  # key of DATASETS
    IMAGE_FORMAT: str = "png"
    SHARD_EXAMPLES: int = 1024  # examples per array_record shard (bounds memory while writing)
    HOMEPAGE: str = ""
    CITATION: str = ""

    def __init__(self, *, plan: Mapping[str, Sequence[Any]] | None = None,
                 num_workers: int | None = None,
                 source_description: Mapping[str, Any] | None = None,
                 progress: bool = True, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self._plan = plan
        self._num_workers = default_workers() if num_workers is None else num_workers
        self._source_description = dict(source_description or {})
        self._written: dict[str, list[str]] = {}
        self._zips = ZipPool()
        self._progress = progress
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds derives this via importlib.resources on the top-level package, which fails for
        # editable installs (a finder hook in the package path); the module file is what it needs.
        return epath.Path(sys.modules[cls.__module__].__file__)

    # --- what subclasses provide -------------------------------------------------------------
    def dataset_info(self) -> DatasetInfo:
        return DATASETS[self.DATASET]

    @abc.abstractmethod
    def make_plan(self, dl_manager) -> Mapping[str, Sequence[Any]]:
        """split -> items (Entries, or whatever ``encode`` takes), in index order."""

    def encode(self, split: str, item: Any) -> tuple[str, dict[str, Any]]:
        """(key, features) of one item; runs on worker threads."""
        example = make_example(item, self.dataset_info().num_classes, self.IMAGE_FORMAT,
                               self._zips)
        return item.key, example

    # --- tfds hooks ------------------------------------------------------------------------------
    def _info(self) -> tfds.core.DatasetInfo:
        info = self.dataset_info()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{info.name}: {info.num_classes} classes, labels are class ids with "
            f"{info.ignore_index} = ignore (mgd_jax).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3),
                                             encoding_format=self.IMAGE_FORMAT),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "key": tfds.features.Text(),
            }),
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
            disable_shuffling=True,  # index order = plan order (sorted keys)
        )

    def _shard_iterators_per_split(self, dl_manager):
        plan = self._plan if self._plan is not None else self.make_plan(dl_manager)
        out = {}
        for split, items in plan.items():
            items = list(items)
            keys = self._written.setdefault(split, [])
            keys.clear()
            progress = _SplitProgress(f"{self.name} {split}", len(items), self._progress)
            n = self.SHARD_EXAMPLES
            out[split] = [
                functools.partial(self._shard, split, items[i : i + n], keys, progress)
                for i in range(0, len(items), n)
            ]
        return out

    def _shard(self, split, items, keys, progress):
        for key, example in ordered_map(lambda item: self.encode(split, item), items,
                                        self._num_workers):
            keys.append(key)
            progress.update()
            yield key, example

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_path is still tfds' incomplete.* directory here.
        self.write_sidecar(self.data_path)

    def write_sidecar(self, directory) -> None:
        meta = {
            "format": SIDECAR_FORMAT,
            "info": self.dataset_info().to_json(),
            "source": self._source_description,
            "splits": {s: {"num_examples": len(k), "keys": k} for s, k in self._written.items()},
        }
        path = os.path.join(os.fspath(directory), SIDECAR)
        with open(path, "w") as f:
            json.dump(meta, f)


