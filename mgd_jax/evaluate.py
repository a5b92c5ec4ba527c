"""Evaluation: inference modes of the official `furnace/engine/evaluator.py` + confusion counting.

`logits_fn(images) -> logits` maps ImageNet-normalised NHWC float images to NHWC logits at the input
size (e.g. a jitted `model.apply` in eval mode). Batches are the pipeline's eval batches
{"image": uint8 (B,H,W,3), "valid": bool (B,H,W), "label": int (B,H,W)} with static (H, W).

Modes (`mgd-method.md` §4.7):

- "whole": one forward on the canvas as given. For VOC the pipeline pads every image centred to the
  crop (512x512, `valid` False on the pad, normalised to 0): that is the official
  `long side <= crop` branch (normalise, pad with 0, one forward, crop back).
- "sliding": the official `scale_process` on images of the static size (Cityscapes 1024x2048,
  crop 800, stride ceil(800 * 2/3) = 534 -> 2 x 4 windows, the last one aligned to the border).
  Raw logits of overlapping windows are SUMMED (not averaged, not softmaxed). An image whose long
  side fits the crop takes the whole branch (normalise, pad with 0 to the crop, one forward).
  When one side is shorter than the crop the official pads the *raw* image with 0 before
  normalising (so the pad is -mean/std, not 0); this is reproduced. All windows of a batch are
  batched through `logits_fn` (in chunks of `windows_per_call` windows if given).
- Optional test-time augmentation (off by default, as in the official configs): `flip` adds the
  horizontally flipped prediction of every forward (the official `is_flip`); `scales` sums the
  predictions of the image resized by each scale (bilinear, half-pixel, no antialias, rounded back
  to uint8 values like cv2 `INTER_LINEAR`), each resized back to (H, W) bilinearly. For "sliding"
  mode on full-size images this follows the official `sliding_eval`; for "whole" mode the padded
  canvas is resized as a whole (one forward per scale) — an approximation of the official, which
  would rescale the unpadded image and switch to sliding windows when it outgrows the crop.

Then argmax over classes and a confusion matrix over the pixels with `valid` and a label in [0, C).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax import metrics
from mgd_jax.data.augment import centered_margins, normalize

LogitsFn = Callable[[jax.Array], jax.Array]
MODES = ("whole", "sliding")


class SlidingPlan(NamedTuple):
    """Window placement of the official sliding branch for an (h, w) image.

    margins: (top, bottom, left, right) zero padding that brings the image up to the crop size
    (centred); padded: the padded (H, W); windows: top-left (y, x) of every crop-sized window in the
    padded image, row-major; whole: True when the long side fits the crop (one padded forward).
    """

    margins: tuple[int, int, int, int]
    padded: tuple[int, int]
    windows: tuple[tuple[int, int], ...]
    whole: bool


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _starts(length: int, crop: int, stride: int) -> list[int]:
    # Official: n = ceil((L - crop) / stride) + 1 windows; start i = min(i*stride + crop, L) - crop.
    n = int(math.ceil((length - crop) / stride)) + 1
    return [min(i * stride + crop, length) - crop for i in range(n)]


def sliding_plan(
    height: int, width: int, crop_size: int | Sequence[int], stride_rate: float = 2 / 3
) -> SlidingPlan:
    """Where the official evaluator puts its windows on an (height, width) image (static ints)."""
    ch, cw = _pair(crop_size)
    top, bottom = centered_margins(height, ch)
    left, right = centered_margins(width, cw)
    margins = (top, bottom, left, right)
    if max(height, width) <= min(ch, cw):
        return SlidingPlan(margins, (height + top + bottom, width + left + right), ((0, 0),), True)
    stride_y = int(math.ceil(ch * stride_rate))
    stride_x = int(math.ceil(cw * stride_rate))
    ph, pw = height + top + bottom, width + left + right
    windows = tuple((y, x) for y in _starts(ph, ch, stride_y) for x in _starts(pw, cw, stride_x))
    return SlidingPlan(margins, (ph, pw), windows, False)


def _forward(logits_fn: LogitsFn, x: jax.Array, flip: bool) -> jax.Array:
    """logits_fn(x) in float32 (+ the flipped prediction of the flipped input when `flip`)."""
    out = jnp.asarray(logits_fn(x), jnp.float32)
    if out.shape[:3] != x.shape[:3]:
        raise ValueError(
            f"evaluate: logits_fn returned {out.shape} for input {x.shape}; expected NHWC logits "
            "at the input resolution"
        )
    if flip:
        out = out + jnp.flip(jnp.asarray(logits_fn(jnp.flip(x, axis=2)), jnp.float32), axis=2)
    return out


def _sliding_logits(
    logits_fn: LogitsFn,
    image: jax.Array,
    valid: jax.Array,
    crop_size: int | Sequence[int],
    stride_rate: float,
    flip: bool,
    windows_per_call: int | None,
) -> jax.Array:
    """Official `scale_process` on a uint8 batch: summed window logits (B, h, w, C), float32."""
    b, h, w, _ = image.shape
    ch, cw = _pair(crop_size)
    plan = sliding_plan(h, w, (ch, cw), stride_rate)
    top, bottom, left, right = plan.margins
    pad = ((0, 0), (top, bottom), (left, right))
    if plan.whole:
        # normalise, then pad with (normalised) 0 to the crop, one forward, crop back.
        x = jnp.pad(normalize(image, valid), pad + ((0, 0),))
        return _forward(logits_fn, x, flip)[:, top : top + h, left : left + w]

    # The official pads the raw image with 0 *before* normalising: pad pixels count as valid.
    x = normalize(jnp.pad(image, pad + ((0, 0),)), jnp.pad(valid, pad, constant_values=True))
    crops = jnp.stack([x[:, y : y + ch, z : z + cw] for y, z in plan.windows])  # (nw, B, ch, cw, 3)
    n = len(plan.windows)
    chunk = n if windows_per_call is None else max(1, int(windows_per_call))
    parts = []
    for i in range(0, n, chunk):
        part = crops[i : i + chunk]
        k = part.shape[0]
        out = _forward(logits_fn, part.reshape((k * b,) + part.shape[2:]), flip)
        parts.append(out.reshape((k, b) + out.shape[1:]))
    logits = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    ph, pw = plan.padded
    total = jnp.zeros((b, ph, pw, logits.shape[-1]), jnp.float32)
    for i, (y, z) in enumerate(plan.windows):
        total = total.at[:, y : y + ch, z : z + cw].add(logits[i])
    return total[:, top : top + h, left : left + w]


def _resize_uint8(image: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear (half-pixel, no antialias) resize of uint8 NHWC, rounded back to 0..255."""
    out = jax.image.resize(
        image.astype(jnp.float32),
        (image.shape[0], *size, image.shape[3]),
        "linear",
        antialias=False,
    )
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def predict_logits(
    logits_fn: LogitsFn,
    image: jax.Array,
    valid: jax.Array,
    *,
    mode: str = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride_rate: float = 2 / 3,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    windows_per_call: int | None = None,
) -> jax.Array:
    """Summed class scores (B, H, W, C) float32 of a uint8 batch; argmax gives the prediction.

    Args:
      logits_fn: normalised NHWC images -> NHWC logits at the input size.
      image: uint8 (B, H, W, 3) RGB. valid: bool (B, H, W), False on padding.
      mode: "whole" or "sliding" (see module doc); "sliding" needs `crop_size`.
      crop_size: sliding window size, int or (h, w) (VOC 512, Cityscapes 800).
      stride_rate: window stride as a fraction of the crop (2/3 -> ceil(crop * 2/3)).
      flip: add the horizontally flipped prediction (TTA, off in the official configs).
      scales: sum the predictions at these image scales (TTA; official [1]).
      windows_per_call: max windows per `logits_fn` call in sliding mode (None = all at once).
    """
    if mode not in MODES:
        raise ValueError(f"evaluate: mode must be one of {MODES}, got {mode!r}")
    if mode == "sliding" and crop_size is None:
        raise ValueError("evaluate: mode='sliding' needs crop_size (e.g. 800 for Cityscapes)")
    _, h, w, _ = image.shape

    def at_scale(img: jax.Array, val: jax.Array) -> jax.Array:
        if mode == "whole":
            return _forward(logits_fn, normalize(img, val), flip)
        return _sliding_logits(logits_fn, img, val, crop_size, stride_rate, flip, windows_per_call)

    total = None
    for s in scales:
        if float(s) == 1.0:
            out = at_scale(image, valid)
        else:
            # cv2.resize(fx=s) size: round half to even, like np.rint.
            size = (int(np.rint(h * s)), int(np.rint(w * s)))
            val = jax.image.resize(valid.astype(jnp.float32), (valid.shape[0], *size), "nearest")
            out = at_scale(_resize_uint8(image, size), val > 0.5)
            out = jax.image.resize(
                out, (out.shape[0], h, w, out.shape[3]), "linear", antialias=False
            )
        total = out if total is None else total + out
    return total


def confusion_for_batch(
    logits_fn: LogitsFn,
    batch: Mapping[str, Any],
    num_classes: int,
    *,
    ignore_index: int = 255,
    **predict_kwargs,
) -> jax.Array:
    """int32 (C, C) confusion matrix (rows = ground truth) of one eval batch; jittable.

    Pixels count where `batch["valid"]` is True and the label is in [0, C) (255 ignored), so fully
    invalid padding examples count nothing. `predict_kwargs` go to `predict_logits` (mode,
    crop_size, stride_rate, flip, scales, windows_per_call).
    """
    image = jnp.asarray(batch["image"])
    valid = jnp.asarray(batch["valid"], bool)
    label = jnp.asarray(batch["label"])
    scores = predict_logits(logits_fn, image, valid, **predict_kwargs)
    pred = jnp.argmax(scores, axis=-1)
    return metrics.confusion_matrix(pred, label, num_classes, ignore_index, valid=valid)


def evaluate_dataset(
    logits_fn: LogitsFn,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int,
    *,
    ignore_index: int = 255,
    **predict_kwargs,
) -> np.ndarray:
    """Confusion matrix (np.int64 (C, C), rows = ground truth) over all `batches` (one process).

    `predict_kwargs` go to `predict_logits` (mode, crop_size, stride_rate, flip, scales,
    windows_per_call).

    Counts accumulate on device in int32 and are moved into an int64 host total before they could
    reach 2**31 (each batch counts at most B*H*W pixels), so no overflow can pass silently. For
    multi-host evaluation, jit `confusion_for_batch` under the mesh and sum the results instead.
    """
    step = jax.jit(
        functools.partial(
            confusion_for_batch,
            logits_fn,
            num_classes=num_classes,
            ignore_index=ignore_index,
            **predict_kwargs,
        )
    )
    host = np.zeros((num_classes, num_classes), np.int64)
    device = None
    pending = 0  # pixels counted into `device` since the last flush
    for batch in batches:
        arrays = {k: batch[k] for k in ("image", "valid", "label")}
        n = int(np.prod(np.shape(arrays["label"])))
        if n > metrics.INT32_MAX:
            raise ValueError(f"evaluate: one batch has {n} pixels, more than int32 can count")
        if device is not None and pending + n > metrics.INT32_MAX:
            host += np.asarray(device, np.int64)
            device, pending = None, 0
        counts = step(arrays)
        device = counts if device is None else device + counts
        pending += n
    if device is not None:
        host += np.asarray(device, np.int64)
    return host
