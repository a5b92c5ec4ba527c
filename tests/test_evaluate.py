"""Evaluation modes vs a brute-force numpy re-implementation of the official evaluator's loops;
the confusion matrix vs np.bincount brute force; scores vs hand computation; the accumulator."""

import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.evaluation import evaluate

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
C = 4
_rng = np.random.default_rng(0)
W1, W2, W3 = (_rng.standard_normal((3, C)).astype(np.float32) for _ in range(3))


def np_normalize(img):
    return ((img.astype(np.float64) / 255.0 - MEAN) / STD).astype(np.float32)


def np_net(x):
    """A tiny 'network' whose output depends on position (row shift, zero at the top edge) and on
    the whole input (global mean), so window placement and padding values both matter."""
    shifted = np.zeros_like(x)
    shifted[:, 1:] = x[:, :-1]
    return x @ W1 + shifted @ W2 + x.mean(axis=(1, 2), keepdims=True) @ W3


def jnp_net(x):
    shifted = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    return x @ W1 + shifted @ W2 + jnp.mean(x, axis=(1, 2), keepdims=True) @ W3


def np_pad_centered(img, crop, value=0):
    ph, pw = max(crop[0] - img.shape[0], 0), max(crop[1] - img.shape[1], 0)
    m = (ph // 2, ph // 2 + ph % 2, pw // 2, pw // 2 + pw % 2)
    pad = [(m[0], m[1]), (m[2], m[3])] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, constant_values=value), m


def np_val_func(x, flip):
    score = np_net(x[None])[0]
    if flip:
        score = score + np_net(x[None, :, ::-1])[0][:, ::-1]
    return score


def np_scale_process(img, crop, stride_rate, flip=False):
    """evaluator.scale_process, loops and all (img: uint8 (h, w, 3)) -> (h, w, C) summed scores."""
    rows, cols = img.shape[:2]
    if max(rows, cols) <= min(crop):
        x, m = np_pad_centered(np_normalize(img), crop)
        score = np_val_func(x, flip)
        return score[m[0] : score.shape[0] - m[1], m[2] : score.shape[1] - m[3]], [(0, 0)]
    stride0 = int(np.ceil(crop[0] * stride_rate))
    stride1 = int(np.ceil(crop[1] * stride_rate))
    img_pad, m = np_pad_centered(img, crop)  # raw image padded with 0
    pr, pc = img_pad.shape[:2]
    r_grid = int(np.ceil((pr - crop[0]) / stride0)) + 1
    c_grid = int(np.ceil((pc - crop[1]) / stride1)) + 1
    data = np.zeros((pr, pc, C))
    windows = []
    for gy in range(r_grid):
        for gx in range(c_grid):
            s_x, s_y = gx * stride1, gy * stride0
            e_x, e_y = min(s_x + crop[1], pc), min(s_y + crop[0], pr)
            s_x, s_y = e_x - crop[1], e_y - crop[0]
            windows.append((s_y, s_x))
            sub = img_pad[s_y:e_y, s_x:e_x]
            data[s_y:e_y, s_x:e_x] += np_val_func(np_normalize(sub), flip)
    return data[m[0] : pr - m[1], m[2] : pc - m[3]], windows


def _image(seed, b, h, w):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "h,w,crop,rate",
    [(13, 27, 8, 2 / 3), (6, 20, 8, 2 / 3), (7, 5, 8, 2 / 3), (21, 9, (8, 6), 0.5), (8, 9, 8, 1.0)],
)
def test_window_placement_matches_official_loops(h, w, crop, rate):
    crop2 = crop if isinstance(crop, tuple) else (crop, crop)
    _, windows = np_scale_process(_image(0, 1, h, w)[0], crop2, rate)
    plan = evaluate.sliding_plan(h, w, crop, rate)
    assert list(plan.windows) == windows


def test_cityscapes_grid():
    plan = evaluate.sliding_plan(1024, 2048, 800, 2 / 3)
    assert math.ceil(800 * 2 / 3) == 534
    assert plan.windows == tuple((y, x) for y in (0, 224) for x in (0, 534, 1068, 1248))
    assert plan.margins == (0, 0, 0, 0) and not plan.whole


@pytest.mark.parametrize(
    "h,w,crop,flip",
    [
        (13, 27, 8, False),  # 2 x 4 windows
        (13, 27, 8, True),
        (6, 20, 8, False),  # height < crop: raw-0 padding, normalised to -mean/std
        (7, 5, 8, True),  # long side fits: normalised-0 padding, one forward
        (21, 9, (8, 6), False),  # rectangular crop
    ],
)
def test_sliding_summed_logits_match_numpy(h, w, crop, flip):
    images = _image(1, 2, h, w)
    valid = np.ones((2, h, w), bool)
    crop2 = crop if isinstance(crop, tuple) else (crop, crop)
    got = evaluate.predict_logits(
        jnp_net, jnp.asarray(images), jnp.asarray(valid), mode="sliding", crop_size=crop, flip=flip
    )
    ref = np.stack([np_scale_process(im, crop2, 2 / 3, flip)[0] for im in images])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)
    chunked = evaluate.predict_logits(
        jnp_net,
        jnp.asarray(images),
        jnp.asarray(valid),
        mode="sliding",
        crop_size=crop,
        flip=flip,
        windows_per_call=3,
    )
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), rtol=1e-6, atol=1e-5)


def test_whole_mode_and_flip():
    images = _image(2, 2, 8, 8)
    valid = np.ones((2, 8, 8), bool)
    valid[:, :2] = False  # padding rows: normalised to 0
    x = np_normalize(images) * valid[..., None]
    for flip in (False, True):
        got = evaluate.predict_logits(jnp_net, jnp.asarray(images), jnp.asarray(valid), flip=flip)
        ref = np.stack([np_val_func(xi, flip) for xi in x])
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_padded_mode_counts_only_valid_pixels():
    images = _image(3, 3, 8, 8)
    valid = np.ones((3, 8, 8), bool)
    valid[0, :, :3] = False
    valid[2] = False  # batch padding example: counts nothing
    labels = np.random.default_rng(4).integers(0, C, (3, 8, 8)).astype(np.int32)
    labels[1, 0, :] = 255
    batch = {"image": images, "valid": valid, "label": labels}
    got = np.asarray(
        jax.jit(evaluate.confusion_for_batch, static_argnums=(0, 2))(jnp_net, batch, C)
    )
    pred = np.stack([np_val_func(xi, False) for xi in np_normalize(images) * valid[..., None]])
    pred = pred.argmax(-1)
    ref = np.zeros((C, C), np.int64)
    for idx in np.ndindex(labels.shape):
        if valid[idx] and labels[idx] != 255:
            ref[labels[idx], pred[idx]] += 1
    np.testing.assert_array_equal(got, ref)
    assert got.sum() == (valid & (labels != 255)).sum()


def test_evaluator_accumulates_int64_and_flushes(monkeypatch):
    rng = np.random.default_rng(5)
    batches = []
    for i in range(4):
        labels = rng.integers(0, C, (2, 8, 8)).astype(np.int32)
        batches.append(
            {"image": _image(10 + i, 2, 8, 8), "valid": np.ones((2, 8, 8), bool), "label": labels}
        )
    apply_fn = lambda variables, x: jnp_net(x)  # noqa: E731
    total = evaluate.Evaluator(C).confusion(apply_fn, {}, batches)
    assert total.dtype == np.int64 and total.sum() == 4 * 2 * 64
    per_batch = sum(
        np.asarray(evaluate.confusion_for_batch(jnp_net, b, C), np.int64) for b in batches
    )
    np.testing.assert_array_equal(total, per_batch)
    # force a flush to the host accumulator after every batch: same result
    monkeypatch.setattr(evaluate, "INT32_MAX", 200)
    np.testing.assert_array_equal(evaluate.Evaluator(C).confusion(apply_fn, {}, iter(batches)),
                                  total)


def np_sliding_eval_multiscale(img, crop, rate, scales):
    """evaluator.sliding_eval with cv2 resizes, as the official."""
    rows, cols = img.shape[:2]
    total = np.zeros((rows, cols, C), np.float32)
    for s in scales:
        scaled = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        score, _ = np_scale_process(scaled, crop, rate)
        total += cv2.resize(score.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)
    return total


def test_multiscale_sliding_matches_cv2_reference():
    # A linear ramp with steps divisible by 6: bilinear resizes by 0.5 and 1.5 give exact
    # integers, so our float resize and cv2's fixed-point uint8 resize agree exactly (on general
    # images they differ by up to 1 grey level).
    yy, xx = np.mgrid[0:10, 0:14]
    img = np.stack([yy * 18, xx * 12, (yy + xx) * 6], -1).astype(np.uint8)
    scales = (0.5, 1.0, 1.5)
    got = evaluate.predict_logits(
        jnp_net,
        jnp.asarray(img[None]),
        jnp.ones((1, 10, 14), bool),
        mode="sliding",
        crop_size=8,
        scales=scales,
    )
    ref = np_sliding_eval_multiscale(img, (8, 8), 2 / 3, scales)
    np.testing.assert_allclose(np.asarray(got)[0], ref, rtol=1e-5, atol=1e-4)


def test_bad_arguments():
    x = jnp.zeros((1, 8, 8, 3), jnp.uint8)
    v = jnp.ones((1, 8, 8), bool)
    with pytest.raises(ValueError, match="crop_size"):
        evaluate.predict_logits(jnp_net, x, v, mode="sliding")
    with pytest.raises(ValueError, match="mode"):
        evaluate.predict_logits(jnp_net, x, v, mode="tiles")
    with pytest.raises(ValueError, match="input resolution"):
        evaluate.predict_logits(lambda z: z[:, ::2], x, v)


# ----------------------------------------------------------------------
# Confusion matrix and scores


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
    got = np.asarray(jax.jit(evaluate.confusion_matrix, static_argnums=2)(pred, label, c))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_confusion(pred, label, c))
    keep = (label >= 0) & (label < c)
    bc = np.bincount(c * label[keep] + pred[keep], minlength=c * c).reshape(c, c)
    np.testing.assert_array_equal(got, bc)
    got_v = np.asarray(evaluate.confusion_matrix(pred, label, c, valid=jnp.asarray(valid)))
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
    s = evaluate.scores(hist)
    iou = [5 / (6 + 7 - 5), 3 / (5 + 5 - 3), 4 / (5 + 4 - 4)]
    np.testing.assert_allclose(s["iou_per_class"][:3], iou)
    assert np.isnan(s["iou_per_class"][3])
    assert s["miou"] == pytest.approx(np.mean(iou))
    assert s["pixel_accuracy"] == pytest.approx(12 / 16)
    assert s["mean_accuracy"] == pytest.approx(np.mean([5 / 6, 3 / 5, 4 / 5]))
    # a class predicted but never in gt has IoU 0 (not NaN) and counts in the mean
    hist2 = hist.copy()
    hist2[0, 3] = 2
    s2 = evaluate.scores(hist2)
    assert s2["iou_per_class"][3] == 0.0
    assert s2["miou"] == pytest.approx(np.mean([5 / (8 + 7 - 5), 3 / 7, 4 / 5, 0.0]))


def test_scores_empty_is_nan_and_shape_checked():
    s = evaluate.scores(np.zeros((3, 3), np.int64))
    assert np.isnan(s["miou"]) and np.isnan(s["pixel_accuracy"])
    with pytest.raises(ValueError, match="square"):
        evaluate.scores(np.zeros((3, 2)))


def test_format_table_percentages():
    hist = np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    text = evaluate.format_table(evaluate.scores(hist), ["background", "cat", "dog"])
    assert "background" in text and "75.00" in text and "nan" in text
    assert "mIoU" in text
    with pytest.raises(ValueError, match="class names"):
        evaluate.format_table(evaluate.scores(hist), ["a"])


def test_per_example_confusions_sum_to_the_total_and_bootstrap_matches_a_loop():
    rng = np.random.default_rng(7)
    batches = [{"image": _image(20 + i, 3, 8, 8), "valid": rng.random((3, 8, 8)) > 0.2,
                "label": rng.integers(0, C, (3, 8, 8)).astype(np.int32)} for i in range(3)]
    evaluator = evaluate.Evaluator(C)
    net_a = lambda variables, x: jnp_net(x)  # noqa: E731
    net_b = lambda variables, x: jnp_net(x[:, ::-1])[:, ::-1]  # noqa: E731  (another "network")
    per_a = evaluator.per_example(net_a, {}, batches)
    per_b = evaluator.per_example(net_b, {}, batches)
    assert per_a.shape == (9, C, C)
    np.testing.assert_array_equal(per_a.sum(0), evaluator.confusion(net_a, {}, batches))

    gain, se = evaluate.bootstrap_difference(per_a, per_b, samples=300, seed=3)
    assert gain == pytest.approx(evaluate.scores(per_b.sum(0))["miou"]
                                 - evaluate.scores(per_a.sum(0))["miou"])
    draws = np.random.default_rng(3).integers(0, 9, (300, 9))  # the same resamples, by loops
    diffs = [evaluate.scores(sum(per_b[i] for i in d))["miou"]
             - evaluate.scores(sum(per_a[i] for i in d))["miou"] for d in draws]
    assert se == pytest.approx(np.std(diffs, ddof=1))
    assert evaluate.bootstrap_difference(per_a, per_a, samples=50)[1] == 0.0
