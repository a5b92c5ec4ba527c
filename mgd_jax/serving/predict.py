"""Prediction: images of any size -> class-id maps (`Predictor`), and files -> palette PNGs,
overlays and a report (`predict_files`). The command line is `mgd-predict`.

Inference follows the official evaluator (`evaluate.predict_logits`):
- `sliding` (default): an image whose long side fits `crop` is padded centred to crop x crop
  (normalised 0) and takes one forward (the official whole branch, = the VOC protocol); bigger
  images are covered by crop-sized windows, stride ceil(crop * 2/3), summed logits (the
  Cityscapes protocol).
- `whole`: one forward on the padded image whatever its size (no windows).

Static shapes: every image is padded centred to a canvas (valid=False on the padding, normalised
to 0) — crop x crop when it fits the crop, `pad_to` when given and the image fits it, otherwise
its size rounded up to a multiple of `bucket` — and images of one canvas are batched; XLA
compiles one program per canvas. A large image on a bucketed canvas (not a multiple of the bucket)
gets its windows placed on the canvas, a small deviation from the official window positions;
`bucket=1` gives the exact official placement (one compile per distinct size).

`predict_files` writes `labels/<name>.png` (8-bit palette PNG of class ids), `overlays/<name>.jpg`
(the image blended with the colour prediction) and `predict_report.json` (what was written, what
failed and why). Directories are searched recursively for .jpg/.jpeg/.png files; sub-folders are
kept in the output names. An unreadable image (or a failed write) is reported with its file name
and skipped; everything else is still written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from mgd_jax.data import augment
from mgd_jax.data.augment import centered_margins
from mgd_jax.data.datasets import IGNORE_INDEX, lookup_table, palette_for
from mgd_jax.evaluation import evaluate
from mgd_jax.network_dir import Network
from mgd_jax.runtime.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
REPORT_FILE = "predict_report.json"


# ----------------------------------------------------------------------------------------------
# Colours


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[labels]


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5):
    """The image blended with the colour prediction (uint8 RGB)."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(labels, palette)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def save_palette_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray) -> None:
    img = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    img.putpalette(palette.reshape(-1).tolist())
    img.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------
# Inference


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB, EXIF orientation applied; errors name the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            array = augment.rgb8(img, str(path))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        raise DataError(f"{path}: decoded to an empty image {array.shape}")
    return array


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


def canvas_shape(h: int, w: int, *, crop: int, bucket: int = 128,
                 pad_to: tuple[int, int] | None = None) -> tuple[int, int]:
    """The static canvas an (h, w) image is padded to (see the module doc)."""
    if max(h, w) <= crop:
        return crop, crop
    if pad_to is not None and h <= pad_to[0] and w <= pad_to[1]:
        return tuple(pad_to)
    return _round_up(h, bucket), _round_up(w, bucket)


def pad_centered(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(canvas uint8, valid bool, (top, left)): `image` centred in a zero canvas of `shape`."""
    h, w = image.shape[:2]
    top, _ = centered_margins(h, shape[0])
    left, _ = centered_margins(w, shape[1])
    canvas = np.zeros((*shape, 3), np.uint8)
    canvas[top:top + h, left:left + w] = image
    valid = np.zeros(shape, bool)
    valid[top:top + h, left:left + w] = True
    return canvas, valid, (top, left)


# Without a protocol in the network's meta (imported networks, format version 1).
DEFAULT_PROTOCOL = {"mode": "sliding", "crop": 512, "stride_rate": 2 / 3, "pad_to": None}


def protocol(network: Network, **given: Any) -> dict[str, Any]:
    """mode, crop, stride_rate, pad_to: `given` (not None), else the evaluation protocol the
    network's meta records, else `DEFAULT_PROTOCOL`."""
    recorded = network.meta.get("eval") or {}
    out = {}
    for key, default in DEFAULT_PROTOCOL.items():
        value = given.get(key)
        out[key] = value if value is not None else recorded.get(key, default)
    if out["pad_to"] is not None:
        out["pad_to"] = tuple(int(v) for v in augment.as_pair(out["pad_to"]))
    if isinstance(out["crop"], list | tuple):  # (h, w) crops: the windows are square here
        out["crop"] = int(min(out["crop"]))
    return out


def network_palette(network: Network, dataset: str | None = None) -> np.ndarray:
    """(256, 3) colours: the named dataset's, else the palette the meta records, else by class
    count (`datasets.palette_for`)."""
    recorded = (network.meta.get("dataset") or {}).get("palette")
    if dataset or not recorded:
        return palette_for(network.num_classes, dataset)
    ignore = (network.meta.get("dataset") or {}).get("ignore_index", IGNORE_INDEX)
    return lookup_table([tuple(c) for c in recorded], ignore)


class Predictor:
    """Class-id maps of uint8 RGB images of any size, batched per static canvas.

        predictor = Predictor(load_network(dir))   # the protocol the network's meta records
        labels = predictor(list_of_images)         # list of uint8 (h, w) maps

    mode, crop, stride_rate and pad_to default to the network's recorded evaluation protocol
    (`protocol`); given values override it.
    """

    def __init__(self, network: Network, *, mode: str | None = None, crop: int | None = None,
                 stride_rate: float | None = None, pad_to: tuple[int, int] | None = None,
                 bucket: int = 128, batch_size: int = 1, flip: bool = False,
                 scales: Sequence[float] = (1.0,), windows_per_call: int | None = None):
        p = protocol(network, mode=mode, crop=crop, stride_rate=stride_rate, pad_to=pad_to)
        mode, crop, stride_rate, pad_to = p["mode"], p["crop"], p["stride_rate"], p["pad_to"]
        self.protocol = p
        if mode not in evaluate.MODES:
            raise DataError(f"mode={mode!r}: expected one of {evaluate.MODES}")
        if crop < 1 or bucket < 1 or batch_size < 1:
            raise DataError(f"crop={crop}, bucket={bucket}, batch={batch_size}: must be >= 1")
        if network.num_classes > 255:
            raise DataError(f"{network.num_classes} classes do not fit an 8-bit palette PNG")
        self.network = network
        self.crop, self.pad_to, self.bucket = crop, pad_to, bucket
        self.batch_size = batch_size
        self.variables = jax.device_put(network.variables)
        self.canvases: set[tuple[int, int]] = set()  # one compiled program each
        model = network.model

        def labels_fn(variables, image, valid):
            def logits_fn(x):
                return model.apply(variables, x, train=False).logits

            scores = evaluate.predict_logits(
                logits_fn, image, valid, mode=mode, crop_size=crop, stride_rate=stride_rate,
                flip=flip, scales=tuple(scales), windows_per_call=windows_per_call,
            )
            return jnp.argmax(scores, axis=-1).astype(jnp.uint8)

        self._labels = jax.jit(labels_fn)  # traced once per canvas shape

    def canvas(self, h: int, w: int) -> tuple[int, int]:
        return canvas_shape(h, w, crop=self.crop, bucket=self.bucket, pad_to=self.pad_to)

    def predict_canvas_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images that share one canvas -> label maps; the batch is filled to `batch_size` with
        empty (fully invalid) canvases so that its shape stays static."""
        shape = self.canvas(*images[0].shape[:2])
        n = len(images)
        b = max(self.batch_size, n)
        canvas = np.zeros((b, *shape, 3), np.uint8)
        valid = np.zeros((b, *shape), bool)
        offsets = []
        for i, img in enumerate(images):
            if self.canvas(*img.shape[:2]) != shape:
                raise ValueError("predict_canvas_batch: images of different canvases")
            canvas[i], valid[i], offset = pad_centered(img, shape)
            offsets.append(offset)
        self.canvases.add(shape)
        labels = np.asarray(jax.device_get(self._labels(self.variables, canvas, valid)))
        return [
            labels[i, top:top + img.shape[0], left:left + img.shape[1]]
            for i, (img, (top, left)) in enumerate(zip(images, offsets, strict=True))
        ]

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.canvas(*img.shape[:2]), []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                for i, lab in zip(chunk, self.predict_canvas_batch([images[i] for i in chunk]),
                                  strict=True):
                    out[i] = lab
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Files


def list_inputs(inputs: Iterable[str]) -> list[tuple[Path, str]]:
    """(file, output stem) pairs: files as given (any extension), directories searched
    recursively for .jpg/.jpeg/.png. Stems keep sub-folders; stems that would collide (a.jpg and
    a.png) keep their extension (a_jpg, a_png)."""
    found: list[tuple[Path, str]] = []
    for given in inputs:
        root = Path(os.path.expanduser(given))
        if root.is_dir():
            files = sorted(p for p in root.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [(p, str(p.relative_to(root).with_suffix(""))) for p in files]
        elif root.exists():
            found.append((root, root.stem))
        else:
            raise DataError(f"input {given}: no such file or directory")
    counts: dict[str, int] = {}
    for _, stem in found:
        counts[stem] = counts.get(stem, 0) + 1
    named, used = [], set()
    for path, stem in found:
        if counts[stem] > 1:
            stem = f"{stem}_{path.suffix.lstrip('.').lower()}" if path.suffix else stem
        base, k = stem, 1
        while stem in used:  # the same file given twice, or a_jpg.jpg beside a.jpg
            k += 1
            stem = f"{base}_{k}"
        used.add(stem)
        named.append((path, stem))
    return named


@dataclasses.dataclass
class Report:
    written: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failed: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def fail(self, path: Path | str, error: str) -> None:
        self.failed.append({"input": str(path), "error": error})


def _write(item: tuple[Path, str], image: np.ndarray, labels: np.ndarray, output: Path,
           palette: np.ndarray, overlay: bool, alpha: float, report: Report) -> None:
    path, stem = item
    label_path = output / "labels" / f"{stem}.png"
    entry = {"input": str(path), "label": str(label_path), "size": list(image.shape[:2])}
    try:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        save_palette_png(label_path, labels, palette)
        if overlay:
            overlay_path = output / "overlays" / f"{stem}.jpg"
            overlay_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(blend(image, labels, palette, alpha)).save(overlay_path, quality=90)
            entry["overlay"] = str(overlay_path)
    except (OSError, ValueError) as e:
        report.fail(path, f"cannot write the outputs under {output}: {type(e).__name__}: {e}")
        return
    report.written.append(entry)


def _batches(items: Sequence[tuple[Path, str]], predictor: Predictor, report: Report
             ) -> Iterator[list[tuple[tuple[Path, str], np.ndarray]]]:
    """Reads images one by one and yields full batches per canvas (then the partial ones);
    unreadable files go straight to the report."""
    pending: dict[tuple[int, int], list] = {}
    for item in items:
        try:
            image = read_image(item[0])
        except ValueError as e:
            report.fail(item[0], str(e))
            continue
        shape = predictor.canvas(*image.shape[:2])
        pending.setdefault(shape, []).append((item, image))
        if len(pending[shape]) == predictor.batch_size:
            yield pending.pop(shape)
    for group in pending.values():
        if group:
            yield group


def predict_files(network: Network, inputs: Sequence[str], output: str | os.PathLike, *,
                  dataset: str | None = None, overlay: bool = True, alpha: float = 0.5,
                  **predictor_options: Any) -> Report:
    """Predicts every input image and writes labels/, overlays/ and the report under `output`."""
    items = list_inputs(inputs)
    if not items:
        raise DataError(f"input {' '.join(inputs)}: no .jpg/.jpeg/.png files found")
    output = Path(os.path.expanduser(output))
    output.mkdir(parents=True, exist_ok=True)
    palette = network_palette(network, dataset)
    predictor = Predictor(network, **predictor_options)
    report = Report()
    t0 = time.time()
    for group in _batches(items, predictor, report):
        try:
            labels = predictor.predict_canvas_batch([image for _, image in group])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on one huge canvas: go on
            for item, _ in group:
                report.fail(item[0], f"inference failed: {type(e).__name__}: {e}")
            continue
        for (item, image), lab in zip(group, labels, strict=True):
            _write(item, image, lab, output, palette, overlay, alpha, report)
        print(f"{len(report.written)}/{len(items)} written", flush=True)
    summary = {
        "checkpoint": network.directory,
        "network": network.describe(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in {**predictor_options, **predictor.protocol}.items()},
        "canvases": sorted(list(c) for c in predictor.canvases),
        "seconds": time.time() - t0,
        "written": report.written,
        "failed": report.failed,
    }
    with open(output / REPORT_FILE, "w") as f:
        json.dump(summary, f, indent=2)
    return report
