"""Evaluation, all of it: the official protocol (pad / slide / TTA), the confusion matrix and its
scores, the jitted multi-host loop (`Evaluator`) that training, the eval tool, notebooks and tests
share, and `evaluate_network` (a saved network on a config's eval split, written as JSON).

`logits_fn(images) -> logits` maps ImageNet-normalised NHWC float images to NHWC logits at the input
size (e.g. a jitted `model.apply` in eval mode). Batches are the pipeline's eval batches
{"image": uint8 (B,H,W,3), "valid": bool (B,H,W), "label": int (B,H,W)} with static (H, W).

Modes (docs/method.md §4.7; official `furnace/engine/evaluator.py`):

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

Then argmax over classes and one confusion matrix over the whole split (official
`furnace/seg_opr/metric.py`): rows = ground truth, columns = prediction; pixels whose ground truth
is outside [0, C) (255 included) or not `valid` are not counted; IoU = diag / (rowsum + colsum -
diag); mIoU = nanmean(IoU) over classes (background included; a class absent from both ground truth
and prediction is left out).

Counts are int32 on device; one batch counts at most B*H*W pixels (< 2**31). `Evaluator` adds the
batches' matrices on device and moves the total into an int64 host matrix before it could reach
2**31, so no overflow passes silently (VOC val has at most 3.6e8 pixels, Cityscapes val 1.05e9).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mgd_jax import network_dir
from mgd_jax.data import input_pipeline
from mgd_jax.data.augment import as_pair, centered_margins, normalize
from mgd_jax.data.datasets import IGNORE_INDEX, as_dataset
from mgd_jax.runtime import logs, parallel, reporting
from mgd_jax.runtime.errors import ConfigError, DataError, ExportError

LogitsFn = Callable[[jax.Array], jax.Array]  # normalised NHWC images -> NHWC logits
ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (variables, images) -> logits
MODES = ("whole", "sliding")
INT32_MAX = 2**31 - 1


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


def _starts(length: int, crop: int, stride: int) -> list[int]:
    # Official: n = ceil((L - crop) / stride) + 1 windows; start i = min(i*stride + crop, L) - crop.
    n = int(math.ceil((length - crop) / stride)) + 1
    return [min(i * stride + crop, length) - crop for i in range(n)]


def sliding_plan(
    height: int, width: int, crop_size: int | Sequence[int], stride_rate: float = 2 / 3
) -> SlidingPlan:
    """Where the official evaluator puts its windows on an (height, width) image (static ints)."""
    ch, cw = as_pair(crop_size)
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
    ch, cw = as_pair(crop_size)
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
    ignore_index: int = IGNORE_INDEX,
    per_example: bool = False,
    **predict_kwargs,
) -> jax.Array:
    """int32 (C, C) confusion matrix (rows = ground truth) of one eval batch, or (B, C, C) one
    per example with `per_example`; jittable.

    Pixels count where `batch["valid"]` is True and the label is in [0, C) (255 ignored), so fully
    invalid padding examples count nothing. `predict_kwargs` go to `predict_logits` (mode,
    crop_size, stride_rate, flip, scales, windows_per_call).
    """
    image = jnp.asarray(batch["image"])
    valid = jnp.asarray(batch["valid"], bool)
    label = jnp.asarray(batch["label"])
    scores = predict_logits(logits_fn, image, valid, **predict_kwargs)
    pred = jnp.argmax(scores, axis=-1)
    if per_example:
        return jax.vmap(functools.partial(confusion_matrix, num_classes=num_classes,
                                          ignore_index=ignore_index))(pred, label, valid=valid)
    return confusion_matrix(pred, label, num_classes, ignore_index, valid=valid)


# ----------------------------------------------------------------------------------------------
# Confusion matrix and scores


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Confusion matrix of one batch (jittable): int32 (C, C), rows = ground truth, cols = pred.

    A pixel is counted when 0 <= label < C, label != ignore_index, 0 <= pred < C (always true for an
    argmax) and, if given, `valid` is True (e.g. False on padding). Everything else is ignored, like
    the official `hist_info`.

    Args:
      pred: integer predictions, any shape.
      label: integer ground truth, same shape as `pred`.
      num_classes: C (static).
      ignore_index: ignored ground-truth value (255).
      valid: optional boolean mask, same shape, True where the pixel counts.
    Returns:
      int32 (C, C) counts. The caller keeps the counted pixels below 2**31 (see module doc).
    """
    if pred.shape != label.shape:
        raise ValueError(f"evaluate.confusion_matrix: pred {pred.shape} != label {label.shape}")
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    keep = (label >= 0) & (label < num_classes) & (label != ignore_index)
    keep &= (pred >= 0) & (pred < num_classes)
    if valid is not None:
        if valid.shape != label.shape:
            raise ValueError(
                f"evaluate.confusion_matrix: valid {valid.shape} != label {label.shape}"
            )
        keep &= jnp.asarray(valid, bool)
    # Not-kept pixels go to an extra overflow bin that is dropped.
    index = jnp.where(keep, label * num_classes + pred, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def scores(confusion: np.ndarray | jax.Array) -> dict[str, float | np.ndarray]:
    """Scores of a confusion matrix (rows = ground truth), as fractions in [0, 1].

    Returns:
      {"miou": nanmean of per-class IoU, "iou_per_class": float64 (C,) with NaN for classes absent
       from both ground truth and prediction, "pixel_accuracy": trace / total,
       "mean_accuracy": nanmean over classes of diag / rowsum (classes without ground truth left
       out)}. On an all-zero matrix every value is NaN.
    """
    hist = np.asarray(confusion, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"evaluate.scores: expected a square (C, C) matrix, got {hist.shape}")
    diag = np.diag(hist)
    rows = hist.sum(axis=1)
    cols = hist.sum(axis=0)
    total = hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (rows + cols - diag)
        class_acc = diag / rows
        pixel_acc = diag.sum() / total if total > 0 else np.nan
    return {
        "miou": _nanmean(iou),
        "iou_per_class": iou,
        "pixel_accuracy": float(pixel_acc),
        "mean_accuracy": _nanmean(class_acc),
    }


def _nanmean(x: np.ndarray) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def format_table(result: dict, class_names: Sequence[str] | None = None) -> str:
    """A plain-text table of `scores(...)`: per-class IoU then mIoU and accuracies, in percent."""
    iou = np.asarray(result["iou_per_class"], dtype=np.float64)
    if class_names is None:
        class_names = [f"class_{i}" for i in range(iou.size)]
    if len(class_names) != iou.size:
        raise ValueError(
            f"evaluate.format_table: {len(class_names)} class names for {iou.size} classes"
        )
    width = max([len(n) for n in class_names] + [len("pixel accuracy")])
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU %':>7}"]
    for i, (name, value) in enumerate(zip(class_names, iou, strict=True)):
        lines.append(f"{i:>3}  {name:<{width}}  {_pct(value)}")
    lines.append("-" * (width + 14))
    lines.append(f"{'':>3}  {'mIoU':<{width}}  {_pct(result['miou'])}")
    lines.append(f"{'':>3}  {'pixel accuracy':<{width}}  {_pct(result['pixel_accuracy'])}")
    lines.append(f"{'':>3}  {'mean accuracy':<{width}}  {_pct(result['mean_accuracy'])}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'nan':>7}" if np.isnan(value) else f"{100.0 * float(value):7.2f}"

def score_scalars(prefix: str, result: Mapping[str, Any], class_names: Sequence[str]
                  ) -> dict[str, float]:
    """The scalars of `scores(...)` to report: `<prefix>/miou`, ...,
    `<prefix>/iou_per_class/<name>`."""
    values = {f"{prefix}/{k}": float(result[k])
              for k in ("miou", "pixel_accuracy", "mean_accuracy")}
    values.update({f"{prefix}/iou_per_class/{name}": float(v)
                   for name, v in zip(class_names, result["iou_per_class"], strict=True)})
    return values


# ----------------------------------------------------------------------------------------------
# The loop


def model_logits(model: Any) -> ApplyFn:
    """`(variables, images) -> logits` of a segmentation network in eval mode (running BN)."""
    def apply(variables, images):
        return model.apply(variables, images, train=False).logits

    return apply


def protocol_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`predict_logits` options of a config's `eval` block."""
    e = config.eval
    return {"mode": e.mode, "crop_size": e.crop, "stride_rate": e.stride_rate,
            "flip": bool(e.flip), "scales": tuple(float(s) for s in e.get("scales", (1.0,)))}


class Evaluator:
    """Confusion matrices of networks on eval batches, with one protocol.

    Each batch is a host's share of a global batch (`input_pipeline.eval_batches`); with a `mesh`
    the batches are assembled into global arrays sharded on `data` (every process must take
    part), without one they go to the default device (one process). One jitted step per apply
    function; counts accumulate on device and are flushed to an int64 host total before they
    could overflow int32.
    """

    def __init__(self, num_classes: int, *, mesh: Mesh | None = None,
                 progress_seconds: float = 30.0, **protocol: Any):
        if protocol.get("mode", "whole") not in MODES:
            raise ConfigError(f"config.eval.mode: {protocol['mode']!r} is not one of {MODES}")
        self.num_classes = int(num_classes)
        self.mesh = mesh
        self.progress_seconds = progress_seconds  # a progress line at most this often (< 0: none)
        self.protocol = protocol
        self._steps: dict[Any, Callable] = {}
        self._label_steps: dict[Any, Callable] = {}

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, mesh: Mesh | None = None
                    ) -> Evaluator:
        return cls(config.num_classes, mesh=mesh,
                   progress_seconds=config.eval.get("progress_seconds", 30.0),
                   **protocol_options(config))

    def _step(self, apply_fn: ApplyFn, per_example: bool = False) -> Callable:
        key = (apply_fn, per_example)
        if key not in self._steps:
            def step(variables, batch):
                return confusion_for_batch(
                    functools.partial(apply_fn, variables), batch, self.num_classes,
                    per_example=per_example, **self.protocol,
                )

            self._steps[key] = jax.jit(step)
        return self._steps[key]

    def step_function(self, apply_fn: ApplyFn) -> Callable:
        """The jitted `(variables, batch) -> confusion` step `confusion` runs (also compiled
        ahead of time for TPU topologies: workflows/tpu_compile.py)."""
        return self._step(apply_fn)

    def confusion(self, apply_fn: ApplyFn, variables: Any,
                  batches: Iterable[Mapping[str, Any]], *, label: str = "eval",
                  num_batches: int | None = None) -> np.ndarray:
        """np.int64 (C, C) confusion matrix (rows = ground truth) over all `batches`; a long pass
        prints progress lines "<label>: i/num_batches ..., ETA" (`progress_seconds`)."""
        step = self._step(apply_fn)
        processes = jax.process_count() if self.mesh is not None else 1
        total = np.zeros((self.num_classes, self.num_classes), np.int64)
        device, pending, seen = None, 0, 0
        progress = reporting.Progress(label, num_batches, every=self.progress_seconds)
        for local in batches:
            arrays = {k: local[k] for k in ("image", "valid", "label")}
            pixels = int(np.prod(np.shape(arrays["label"]))) * processes
            if pixels > INT32_MAX:
                raise ValueError(f"evaluate: one batch has {pixels} pixels, more than int32 "
                                 "can count")
            if device is not None and pending + pixels > INT32_MAX:
                total += np.asarray(jax.device_get(device), np.int64)
                device, pending = None, 0
            if self.mesh is not None:
                arrays = parallel.global_batch(arrays, self.mesh)
            counts = step(variables, arrays)
            device = counts if device is None else device + counts
            pending += pixels
            seen += 1
            line = progress.update(seen)
            if line:
                device.block_until_ready()  # the line tells what is done, not what is queued
                logs.say(line, primary=jax.process_index() == 0)
        if not seen:
            raise DataError("evaluate: the eval split is empty")
        if device is not None:
            total += np.asarray(jax.device_get(device), np.int64)
        return total

    def scores(self, apply_fn: ApplyFn, variables: Any,
               batches: Iterable[Mapping[str, Any]], **progress: Any) -> dict[str, Any]:
        """`scores(...)` of the confusion matrix over `batches` (`progress` as in `confusion`)."""
        return scores(self.confusion(apply_fn, variables, batches, **progress))

    def labels(self, apply_fn: ApplyFn, variables: Any, image: np.ndarray,
               valid: np.ndarray) -> np.ndarray:
        """uint8 class maps (B, H, W) of one host-local batch with the protocol, on the default
        device (no mesh, no collective: e.g. prediction panels on one process)."""
        if apply_fn not in self._label_steps:
            def step(variables, image, valid):
                logits = predict_logits(functools.partial(apply_fn, variables), image, valid,
                                        **self.protocol)
                return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

            self._label_steps[apply_fn] = jax.jit(step)
        return np.asarray(self._label_steps[apply_fn](variables, image, valid))

    def per_example(self, apply_fn: ApplyFn, variables: Any,
                    batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """np.int64 (N, C, C): one confusion matrix per example of the global stream of
        `batches`, in order (an image's pixels always fit int32); filler examples of the last
        batch count nothing."""
        step = self._step(apply_fn, per_example=True)
        parts = []
        for local in batches:
            arrays = {k: local[k] for k in ("image", "valid", "label")}
            if self.mesh is not None:
                arrays = parallel.global_batch(arrays, self.mesh)
            parts.append(step(variables, arrays))
        if not parts:
            raise DataError("evaluate: the eval split is empty")
        return np.concatenate([np.asarray(jax.device_get(p), np.int64) for p in parts])


def bootstrap_difference(per_example_a: np.ndarray, per_example_b: np.ndarray, *,
                         samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(mIoU(b) - mIoU(a), its bootstrap standard error) on paired per-example confusion
    matrices (N, C, C): the examples are resampled with replacement, the same resample for both
    networks, and the split-level mIoU recomputed from the summed matrices of each resample."""
    a, b = np.asarray(per_example_a, np.int64), np.asarray(per_example_b, np.int64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"bootstrap_difference: shapes {a.shape} and {b.shape} differ or are "
                         "not (N, C, C)")
    n = a.shape[0]
    draws = np.random.default_rng(seed).integers(0, n, (samples, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])  # (samples, N)
    diffs = [scores(np.tensordot(w, b, 1))["miou"] - scores(np.tensordot(w, a, 1))["miou"]
             for w in counts]
    return scores(b.sum(0))["miou"] - scores(a.sum(0))["miou"], float(np.std(diffs, ddof=1))


# ----------------------------------------------------------------------------------------------
# A saved network on a config's eval split


def class_names(source: Any, config: ml_collections.ConfigDict) -> list[str]:
    """The source's class names, else the dataset table's, else class_<i>."""
    info = getattr(source, "info", None)
    if info is None:
        try:
            info = as_dataset(config.dataset).info
        except DataError:
            info = None
    if info is not None and len(info.class_names) == config.num_classes:
        return list(info.class_names)
    return [f"class_{i}" for i in range(config.num_classes)]


def protocol_text(config: ml_collections.ConfigDict, flip: bool, scales: Sequence[float]) -> str:
    e = config.eval
    pad = "x".join(str(int(v)) for v in e.pad_to)
    if e.mode == "whole":
        base = f"whole image padded to {pad}, one forward"
    else:
        base = (f"sliding {e.crop} px windows (stride ceil({e.crop} x {e.stride_rate:.3g})), "
                f"summed logits, images padded to {pad}")
    tta = []
    if flip:
        tta.append("flip")
    if tuple(scales) != (1.0,):
        tta.append("scales " + ",".join(f"{s:g}" for s in scales))
    return base + ("; TTA: " + " + ".join(tta) if tta else "; single scale, no flip")


def output_name(split: str, flip: bool, scales: Sequence[float]) -> str:
    name = f"eval_{split}"
    if flip:
        name += "_flip"
    if tuple(scales) != (1.0,):
        name += "_ms" + "-".join(f"{s:g}" for s in scales)
    return name + ".json"


def evaluate_network(
    config: ml_collections.ConfigDict,
    network: Any,
    *,
    flip: bool | None = None,
    scales: Sequence[float] = (1.0,),
    source: Any = None,
    output_dir: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluates a loaded network (`network_dir.Network`) on the config's eval split, or on `source`
    (any `sources.Source` of labeled examples), with the config's protocol plus optional TTA.

    Returns the scores (and the confusion matrix) and writes them as JSON under `output_dir`
    (default: the network's directory; process 0 only). Every process must call it.
    """
    config = copy.deepcopy(config)
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ConfigError(f"scales={scales}: expected positive numbers, e.g. 0.75,1,1.25")
    with config.unlocked():
        if flip is not None:
            config.eval.flip = bool(flip)
        config.eval.scales = scales
    parallel.process_share(config.eval.batch_size, "eval.batch_size")
    if network.num_classes != config.num_classes:
        raise ExportError(
            f"{network.directory}: the network has {network.num_classes} classes, "
            f"config.num_classes is {config.num_classes} ({config.dataset})"
        )
    if source is None:  # the eval tool's data: the config's dataset, resolved here once
        source = input_pipeline.eval_source(config, as_dataset(config.dataset))
    names = class_names(source, config)
    is_main = jax.process_index() == 0

    def say(text: str) -> None:
        if verbose:
            logs.say(text, primary=is_main)

    say(f"network: {network.describe()}")
    say(f"data: {config.dataset} {config.eval_split}, {len(source)} images")
    protocol = protocol_text(config, config.eval.flip, scales)
    say(f"protocol: {protocol}")

    mesh = parallel.make_mesh()
    evaluator = Evaluator.from_config(config, mesh)
    t0 = time.time()
    confusion = evaluator.confusion(
        model_logits(network.model), parallel.replicate(network.variables, mesh),
        input_pipeline.eval_batches(config, source), label=config.eval_split,
        num_batches=input_pipeline.num_eval_batches(config, len(source)),
    )
    seconds = time.time() - t0
    result_scores = scores(confusion)

    say(format_table(result_scores, names))
    result = {
        "checkpoint": network.directory,
        "network": {k: network.meta.get(k) for k in ("backbone", "num_classes", "build_options",
                                                      "source")},
        "dataset": config.dataset,
        "split": config.eval_split,
        "num_images": len(source),
        "protocol": protocol,
        "mode": config.eval.mode,
        "pad_to": [int(v) for v in config.eval.pad_to],
        "crop": int(config.eval.crop),
        "tta": {"flip": bool(config.eval.flip), "scales": list(scales)},
        "miou": _num(result_scores["miou"]),
        "pixel_accuracy": _num(result_scores["pixel_accuracy"]),
        "mean_accuracy": _num(result_scores["mean_accuracy"]),
        "iou_per_class": {n: _num(v) for n, v in zip(names, result_scores["iou_per_class"],
                                                      strict=True)},
        "confusion": np.asarray(confusion, np.int64).tolist(),
        "seconds": seconds,
    }
    out_dir = os.path.expanduser(output_dir or network.directory)
    path = os.path.join(out_dir, output_name(config.eval_split, config.eval.flip, scales))
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        say(f"mIoU {100 * result_scores['miou']:.2f}  pixel accuracy "
            f"{100 * result_scores['pixel_accuracy']:.2f}  ({len(source)} images, "
            f"{seconds:.1f} s) -> {path}")
    result["json"] = path
    return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str, *,
                        step: int | str | None = None, output_dir: str | None = None,
                        **options: Any) -> dict[str, Any]:
    """`evaluate_network` of the network at `path` (`network_dir.load_network`: a network directory
    or a training workdir, `step` as there); the JSON goes to `output_dir`, default `path`."""
    network = network_dir.load_network(path, step=step, precision=config.precision)
    return evaluate_network(config, network, output_dir=output_dir or path, **options)


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
