"""Host-side per-example transforms (numpy + OpenCV, uint8 in and out); device-side normalisation.

The training recipe (official `TrainPre`, docs/method.md §4.4) is

    hflip (p=0.5) -> random scale s in {0.5, 0.75, 1, 1.5, 1.75, 2.0} -> normalise -> random crop
    -> centred pad (image with 0, label with 255).

Normalisation is per pixel and the image padding value 0 is the *normalised* value, so the host can
stop at uint8 and hand over a `valid` mask instead: `normalize(image, valid)` on device then gives
exactly "normalise, then pad with 0". Shipping uint8 instead of float32 is 4x less host work, IPC
and host->device transfer.

All randomness comes from an explicit `np.random.Generator` (grain hands one per element); the draws
happen in the official order (flip, scale, crop row, crop column), and a crop offset is only drawn
along an axis that is longer than the crop, as in `generate_random_crop_pos`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mgd_jax.data.datasets import IGNORE_INDEX
from mgd_jax.runtime.errors import DataError

# ImageNet statistics used by every official config (RGB order).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Official `train_scale_array` (note: no 1.25).
TRAIN_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)


def _official_table() -> np.ndarray:
    # The official code computes float32(x)/255 in float32, then subtracts / divides float64 mean /
    # std and casts back to float32 at the end. Tabulate those 3x256 values once so `exact=True` can
    # reproduce them.
    x = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    table = (x - np.asarray(MEAN, np.float64)) / np.asarray(STD, np.float64)
    return np.ascontiguousarray(table.astype(np.float32).T)  # (3, 256)


NORMALIZE_TABLE = _official_table()


def normalize(image: Any, valid: Any = None, *, exact: bool = False) -> Any:
    """uint8 RGB (..., H, W, 3) -> float32 `(x/255 - MEAN)/STD`, and 0 where `~valid` (..., H, W).

    Works on numpy arrays (returns numpy) and on jax arrays / tracers (returns jax), e.g. inside a
    jitted train step. This equals the recipe's "normalise, then pad with 0" because padding is
    exactly `~valid`.

    The default evaluates the formula in float32. The official code evaluates the subtraction and
    division in float64 and rounds once at the end, so about 2/3 of the 768 possible (channel,
    value) results differ from it by 1 ulp (<= 2.4e-7); XLA may also rewrite the division.
    `exact=True` looks the values up in `NORMALIZE_TABLE` instead (bit-identical to the official
    pipeline, a gather: use it for parity tests).
    """
    if isinstance(image, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp  # only needed on the device path

    if exact:
        table = xp.asarray(NORMALIZE_TABLE)
        out = table[xp.arange(3), image.astype(xp.int32)]
    else:
        x = image.astype(xp.float32) / xp.float32(255.0)
        out = (x - xp.asarray(MEAN, xp.float32)) / xp.asarray(STD, xp.float32)
    if valid is not None:
        out = xp.where(valid[..., None], out, xp.float32(0.0))
    return out


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An int size or an (h, w) pair as (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def centered_margins(size: int, target: int) -> tuple[int, int]:
    """(before, after) padding that centres `size` in `target` (official `pad_image_to_shape`)."""
    pad = max(target - size, 0)
    return pad // 2, pad // 2 + pad % 2


def _place(
    image: np.ndarray,
    label: np.ndarray | None,
    out_hw: tuple[int, int],
    y: int,
    x: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Crop `image[y:y+oh, x:x+ow]` (may be short at the border) and pad it centred to `out_hw`."""
    oh, ow = out_hw
    crop = image[y : y + oh, x : x + ow]
    ch, cw = crop.shape[:2]
    top, _ = centered_margins(ch, oh)
    left, _ = centered_margins(cw, ow)
    out_img = np.zeros((oh, ow, 3), np.uint8)
    out_img[top : top + ch, left : left + cw] = crop
    valid = np.zeros((oh, ow), np.bool_)
    valid[top : top + ch, left : left + cw] = True
    out_lbl = None
    if label is not None:
        out_lbl = np.full((oh, ow), IGNORE_INDEX, np.uint8)
        out_lbl[top : top + ch, left : left + cw] = label[y : y + oh, x : x + ow]
    return out_img, valid, out_lbl


def _check_example(image: np.ndarray, label: np.ndarray | None, where: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{where}: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}"
        )
    if label is not None and (label.dtype != np.uint8 or label.shape != image.shape[:2]):
        raise ValueError(
            f"{where}: expected a uint8 (H, W) label matching the image {image.shape[:2]}, "
            f"got {label.dtype} {label.shape}"
        )


def train_augment(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray | None = None,
    *,
    crop_size: tuple[int, int],
    scales: Sequence[float] = TRAIN_SCALES,
    key: str = "?",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Official TrainPre on uint8 -> (image uint8 (ch,cw,3), valid bool (ch,cw), label uint8|None).

    `label=None` is the unlabeled case (same transform, same random draws). `key` only names the
    example in error messages.
    """
    import cv2  # local: `normalize` runs inside the train step, on machines without OpenCV

    _check_example(image, label, f"example {key!r}")
    ch, cw = crop_size
    # 1. horizontal flip, p = 0.5 (`random.random() >= 0.5`).
    if rng.random() >= 0.5:
        image = cv2.flip(image, 1)
        if label is not None:
            label = cv2.flip(label, 1)
    # 2. random scale; sizes truncate like `int(h * s)`. cv2.resize is a copy when the size is
    # unchanged.
    s = float(scales[int(rng.integers(len(scales)))])
    h, w = image.shape[:2]
    sh, sw = int(h * s), int(w * s)
    if (sh, sw) != (h, w):
        image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, (sw, sh), interpolation=cv2.INTER_NEAREST)
    # 3. crop offset: `random.randint(0, h - crop + 1)` is inclusive at both ends, so the last
    # offset yields a crop one row/column short, which the centred padding then fills.
    y = int(rng.integers(0, sh - ch + 2)) if sh > ch else 0
    x = int(rng.integers(0, sw - cw + 2)) if sw > cw else 0
    # 4. crop + centred pad (image 0 after normalisation == ~valid, label 255).
    return _place(image, label, (ch, cw), y, x)


def eval_pad(
    image: np.ndarray,
    label: np.ndarray | None,
    pad_to: tuple[int, int],
    *,
    key: str = "?",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Whole image padded centred to the static `pad_to` (§4.7): (image, valid, label)."""
    _check_example(image, label, f"eval example {key!r}")
    h, w = image.shape[:2]
    if h > pad_to[0] or w > pad_to[1]:
        raise ValueError(
            f"eval example {key!r} is {h}x{w}, larger than the eval pad size "
            f"{pad_to[0]}x{pad_to[1]}; raise pad_to (it must cover the largest image of the split)"
        )
    return _place(image, label, pad_to, 0, 0)


def rgb8(image: Any, source: str) -> np.ndarray:
    """A decoded PIL image of any common form as uint8 (H, W, 3) RGB: 16-bit and 32-bit integer
    greyscale scaled down from their full range (PIL's own conversion clips them to white),
    palette and greyscale expanded, alpha dropped. Float images are refused, naming `source`."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{source}: {mode} image with values outside 0..65535 "
                            f"(min {values.min()}, max {values.max()})")
        gray = (values.astype(np.uint32) * 255 + 32767) // 65535
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "F":
        raise DataError(f"{source}: floating-point image (PIL mode F); expected 8- or 16-bit")
    return np.asarray(image.convert("RGB"), np.uint8)
