"""Confusion matrix vs np.bincount brute force; scores vs hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax import metrics


def np_confusion(pred, label, c, valid=None):
    """hist_info semantics with a python loop: count pixels with 0 <= gt < C."""
    hist = np.zeros((c, c), np.int64)
    for idx in np.ndindex(label.shape):
        g, p = int(label[idx]), int(pred[idx])
        if 0 <= g < c and (valid is None or valid[idx]):
            hist[g, p] += 1
    return hist


def test_confusion_matrix_matches_brute_force():
    rng = np.random.default_rng(0)
    c = 5
    label = rng.integers(0, c, (3, 7, 9)).astype(np.int32)
    label[rng.random(label.shape) < 0.2] = 255
    label[0, 0, :3] = [7, -1, 5]  # out of range labels are ignored, like hist_info
    pred = rng.integers(0, c, label.shape).astype(np.int32)
    valid = rng.random(label.shape) < 0.8
    got = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=2)(pred, label, c))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_confusion(pred, label, c))
    keep = (label >= 0) & (label < c)
    bc = np.bincount(c * label[keep] + pred[keep], minlength=c * c).reshape(c, c)
    np.testing.assert_array_equal(got, bc)
    got_v = np.asarray(metrics.confusion_matrix(pred, label, c, valid=jnp.asarray(valid)))
    np.testing.assert_array_equal(got_v, np_confusion(pred, label, c, valid))


def test_scores_by_hand():
    # 4 classes; class 3 absent from both gt and prediction -> NaN IoU, left out of the mean.
    hist = np.array(
        [
            [5, 1, 0, 0],
            [2, 3, 0, 0],
            [0, 1, 4, 0],
            [0, 0, 0, 0],
        ]
    )
    s = metrics.scores(hist)
    iou = [5 / (6 + 7 - 5), 3 / (5 + 5 - 3), 4 / (5 + 4 - 4)]
    np.testing.assert_allclose(s["iou_per_class"][:3], iou)
    assert np.isnan(s["iou_per_class"][3])
    assert s["miou"] == pytest.approx(np.mean(iou))
    assert s["pixel_accuracy"] == pytest.approx(12 / 16)
    assert s["mean_accuracy"] == pytest.approx(np.mean([5 / 6, 3 / 5, 4 / 5]))
    # a class predicted but never in gt has IoU 0 (not NaN) and counts in the mean
    hist2 = hist.copy()
    hist2[0, 3] = 2
    s2 = metrics.scores(hist2)
    assert s2["iou_per_class"][3] == 0.0
    assert s2["miou"] == pytest.approx(np.mean([5 / (8 + 7 - 5), 3 / 7, 4 / 5, 0.0]))


def test_scores_empty_is_nan_and_shape_checked():
    s = metrics.scores(np.zeros((3, 3), np.int64))
    assert np.isnan(s["miou"]) and np.isnan(s["pixel_accuracy"])
    with pytest.raises(ValueError, match="square"):
        metrics.scores(np.zeros((3, 2)))


def test_format_table_percentages():
    hist = np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    text = metrics.format_table(metrics.scores(hist), ["background", "cat", "dog"])
    assert "background" in text and "75.00" in text and "nan" in text
    assert "mIoU" in text
    with pytest.raises(ValueError, match="class names"):
        metrics.format_table(metrics.scores(hist), ["a"])


def test_clu_metric_merges_by_sum():
    rng = np.random.default_rng(1)
    c = 3
    labels = [rng.integers(0, c, (2, 4, 4)) for _ in range(3)]
    logits = [rng.standard_normal((2, 4, 4, c)).astype(np.float32) for _ in range(3)]
    m = metrics.ConfusionMatrix.empty()
    for z, y in zip(logits, labels, strict=True):
        m = m.merge(
            metrics.ConfusionMatrix.from_model_output(
                predictions=jnp.asarray(z), labels=jnp.asarray(y), num_classes=c
            )
        )
    total = sum(np_confusion(z.argmax(-1), y, c) for z, y in zip(logits, labels, strict=True))
    np.testing.assert_array_equal(np.asarray(m.confusion), total)
    assert m.compute()["miou"] == pytest.approx(metrics.scores(total)["miou"])
