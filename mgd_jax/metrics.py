"""Segmentation metrics: confusion matrix (jittable) -> mIoU, per-class IoU, accuracies, tables.

Semantics of the official `furnace/seg_opr/metric.py` (`mgd-method.md` §4.7): one global confusion
matrix over the whole validation set, rows = ground truth, columns = prediction; pixels whose ground
truth is outside [0, C) (255 included) are not counted; IoU = diag / (rowsum + colsum - diag);
mIoU = nanmean(IoU) over classes (a class absent from both ground truth and prediction is NaN and
left out), background included.

Counts are int32 on device. One call counts at most N*H*W pixels, which must stay below 2**31
(2147483647): e.g. a batch of 1024 images of 1024x2048. Summing the matrices of a whole split must
be done in int64 on the host (e.g. `evaluate.evaluate_dataset` flushes its int32 device accumulator
before it could overflow); for reference, VOC val is at most 1449*500*500 = 3.6e8 pixels and
Cityscapes val 500*1024*2048 = 1.05e9, both < 2**31, but a bigger set would exceed it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from flax import struct

INT32_MAX = 2**31 - 1


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = 255,
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
      int32 (C, C) counts. The caller must keep the counted pixels below 2**31 (see module doc).
    """
    if pred.shape != label.shape:
        raise ValueError(f"metrics.confusion_matrix: pred {pred.shape} != label {label.shape}")
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    keep = (label >= 0) & (label < num_classes) & (label != ignore_index)
    keep &= (pred >= 0) & (pred < num_classes)
    if valid is not None:
        if valid.shape != label.shape:
            raise ValueError(
                f"metrics.confusion_matrix: valid {valid.shape} != label {label.shape}"
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
        raise ValueError(f"metrics.scores: expected a square (C, C) matrix, got {hist.shape}")
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
            f"metrics.format_table: {len(class_names)} class names for {iou.size} classes"
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


@struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """`clu.metrics.Metric` accumulating a confusion matrix (merge = sum; int32, see module doc).

    `ConfusionMatrix.from_model_output(predictions=..., labels=..., num_classes=C, valid=...)`;
    `compute()` returns `scores(...)`. `predictions` may be integer labels (N, H, W) or logits
    (N, H, W, C), reduced with argmax.
    """

    confusion: jax.Array

    @classmethod
    def empty(cls) -> ConfusionMatrix:
        # The class count is unknown before the first batch; an empty matrix merges as zero.
        return cls(confusion=jnp.zeros((0, 0), jnp.int32))

    @classmethod
    def from_model_output(
        cls,
        *,
        predictions: jax.Array,
        labels: jax.Array,
        num_classes: int,
        valid: jax.Array | None = None,
        ignore_index: int = 255,
        **_,
    ) -> ConfusionMatrix:
        if predictions.ndim == labels.ndim + 1:
            predictions = jnp.argmax(predictions, axis=-1)
        return cls(
            confusion=confusion_matrix(predictions, labels, num_classes, ignore_index, valid)
        )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if self.confusion.size == 0:
            return other
        if other.confusion.size == 0:
            return self
        return type(self)(confusion=self.confusion + other.confusion)

    def reduce(self) -> ConfusionMatrix:
        # After gather_from_model_output the leading axis stacks per-device matrices.
        if self.confusion.ndim == 3:
            return type(self)(confusion=jnp.sum(self.confusion, axis=0))
        return self

    def compute(self) -> dict[str, float | np.ndarray]:
        return scores(np.asarray(self.confusion))
