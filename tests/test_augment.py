"""data.augment against brute-force numpy references of the official TrainPre / eval padding."""

import random

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.data import augment

MEAN64 = np.array([0.485, 0.456, 0.406])  # the official config's float64 statistics
STD64 = np.array([0.229, 0.224, 0.225])


def official_normalize(img: np.ndarray) -> np.ndarray:
    # float32 / 255, then float64 mean/std (numpy promotion), cast to float32 when batched.
    return ((img.astype(np.float32) / 255.0 - MEAN64) / STD64).astype(np.float32)


def reference_train_pre(rng, img, lbl, crop, scales):
    """The recipe written out step by step in float: flip, scale, normalise, crop, centred pad."""
    if rng.random() >= 0.5:
        img, lbl = img[:, ::-1], (None if lbl is None else lbl[:, ::-1])
    s = scales[int(rng.integers(len(scales)))]
    sh, sw = int(img.shape[0] * s), int(img.shape[1] * s)
    img = cv2.resize(np.ascontiguousarray(img), (sw, sh), interpolation=cv2.INTER_LINEAR)
    if lbl is not None:
        lbl = cv2.resize(np.ascontiguousarray(lbl), (sw, sh), interpolation=cv2.INTER_NEAREST)
    img = official_normalize(img)
    ch, cw = crop
    y = int(rng.integers(0, sh - ch + 1, endpoint=True)) if sh > ch else 0
    x = int(rng.integers(0, sw - cw + 1, endpoint=True)) if sw > cw else 0

    def crop_pad(a, value):
        a = a[y : y + ch, x : x + cw]
        ph, pw = ch - a.shape[0], cw - a.shape[1]
        pads = [(ph // 2, ph // 2 + ph % 2), (pw // 2, pw // 2 + pw % 2)] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, pads, constant_values=value)

    return crop_pad(img, 0.0), (None if lbl is None else crop_pad(lbl, 255))


def random_example(rs, h, w, n_classes=21):
    img = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
    lbl = rs.randint(0, n_classes, (h, w)).astype(np.uint8)
    lbl[rs.rand(h, w) < 0.05] = 255
    return img, lbl


@pytest.mark.parametrize("crop", [(32, 32), (40, 24)])
def test_train_augment_matches_reference_bit_for_bit(crop):
    rs = np.random.RandomState(0)
    for trial in range(60):
        h, w = rs.randint(12, 60), rs.randint(12, 60)
        img, lbl = random_example(rs, h, w)
        out_img, valid, out_lbl = augment.train_augment(
            np.random.default_rng(trial), img, lbl, crop_size=crop
        )
        ref_img, ref_lbl = reference_train_pre(
            np.random.default_rng(trial), img, lbl, crop, augment.TRAIN_SCALES
        )
        assert out_img.dtype == np.uint8 and out_img.shape == (*crop, 3)
        assert valid.dtype == np.bool_ and out_lbl.dtype == np.uint8
        np.testing.assert_array_equal(augment.normalize(out_img, valid, exact=True), ref_img)
        np.testing.assert_array_equal(out_lbl, ref_lbl)
        # padding: image 0 (stays 0 in uint8 too), label 255
        assert (out_img[~valid] == 0).all() and (out_lbl[~valid] == 255).all()


def test_unlabeled_uses_the_same_draws():
    rs = np.random.RandomState(1)
    img, lbl = random_example(rs, 50, 37)
    a, va, _ = augment.train_augment(np.random.default_rng(5), img, lbl, crop_size=(32, 32))
    b, vb, none = augment.train_augment(np.random.default_rng(5), img, None, crop_size=(32, 32))
    assert none is None
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(va, vb)


def test_no_global_rng():
    rs = np.random.RandomState(2)
    img, lbl = random_example(rs, 45, 51)
    outs = []
    for g in (0, 1):
        np.random.seed(g)
        random.seed(g)
        outs.append(augment.train_augment(np.random.default_rng(3), img, lbl, crop_size=(32, 32)))
    for a, b in zip(outs[0], outs[1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("s", augment.TRAIN_SCALES)
def test_scale_sizes_and_centred_padding(s):
    h, w, crop = 21, 13, (48, 40)
    img = np.full((h, w, 3), 7, np.uint8)
    lbl = np.full((h, w), 3, np.uint8)
    _, valid, out_lbl = augment.train_augment(
        np.random.default_rng(0), img, lbl, crop_size=crop, scales=(s,)
    )
    sh, sw = int(h * s), int(w * s)  # 10/15/21/31/36/42 x 6/9/13/19/22/26: all fit in the crop
    top, left = (crop[0] - sh) // 2, (crop[1] - sw) // 2  # odd pads put the extra row/col after
    expect = np.zeros(crop, bool)
    expect[top : top + sh, left : left + sw] = True
    np.testing.assert_array_equal(valid, expect)
    np.testing.assert_array_equal(out_lbl, np.where(expect, 3, 255))


def test_crop_offset_off_by_one_is_padded_at_the_end():
    # h = crop + 1 at scale 1: offsets 0, 1, 2 (randint is inclusive); offset 2 leaves a short crop.
    img = np.zeros((33, 32, 3), np.uint8)
    last_row_invalid = 0
    for seed in range(60):
        _, valid, _ = augment.train_augment(
            np.random.default_rng(seed), img, None, crop_size=(32, 32), scales=(1.0,)
        )
        assert valid[:-1].all() and valid[:, -1].any()
        last_row_invalid += int(not valid[-1].any())
    assert 5 < last_row_invalid < 40  # about a third of the draws


def test_label_follows_image_through_flip_and_crop():
    h, w = 50, 70
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.stack([rows, cols, np.full_like(rows, 9)], -1).astype(np.uint8)
    lbl = ((rows * 7 + cols * 3) % 250).astype(np.uint8)
    flips = set()
    for seed in range(20):
        out, valid, out_lbl = augment.train_augment(
            np.random.default_rng(seed), img, lbl, crop_size=(32, 40), scales=(1.0,)
        )
        r, c = out[..., 0].astype(int), out[..., 1].astype(int)
        np.testing.assert_array_equal(out_lbl[valid], ((r * 7 + c * 3) % 250)[valid])
        flips.add(bool(c[0, 1] < c[0, 0]))
    assert flips == {True, False}


def test_nearest_labels_never_get_new_values():
    rs = np.random.RandomState(3)
    values = np.array([0, 5, 17, 200, 255], np.uint8)
    for seed in range(30):
        lbl = values[rs.randint(0, len(values), (37, 29))]
        img = rs.randint(0, 256, (37, 29, 3)).astype(np.uint8)
        _, _, out = augment.train_augment(
            np.random.default_rng(seed), img, lbl, crop_size=(32, 32), scales=(0.75, 1.5, 1.75)
        )
        assert set(np.unique(out)) <= set(values.tolist())


def test_normalize_numpy_jax_and_exact():
    rs = np.random.RandomState(4)
    img = rs.randint(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    img[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    valid = rs.rand(2, 5, 7) < 0.7
    f32 = (img.astype(np.float32) / np.float32(255) - np.float32(MEAN64)) / np.float32(STD64)
    expect = np.where(valid[..., None], f32, np.float32(0))

    out = augment.normalize(img, valid)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expect)  # numpy: the float32 formula exactly
    np.testing.assert_array_equal(augment.normalize(img), f32)  # no mask: nothing zeroed

    out_j = augment.normalize(jnp.asarray(img), jnp.asarray(valid))
    assert out_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_j), expect, rtol=0, atol=1e-6)

    # exact=True reproduces the official float64-intermediate values bit for bit, numpy and jax.
    official = np.where(valid[..., None], official_normalize(img), np.float32(0))
    np.testing.assert_array_equal(augment.normalize(img, valid, exact=True), official)
    np.testing.assert_array_equal(
        np.asarray(augment.normalize(jnp.asarray(img), jnp.asarray(valid), exact=True)), official
    )
    np.testing.assert_allclose(out, official, rtol=0, atol=2.5e-7)  # default is within 1 ulp


def test_eval_pad_centres_and_rejects_large_images():
    rs = np.random.RandomState(5)
    img, lbl = random_example(rs, 17, 30)
    out, valid, out_lbl = augment.eval_pad(img, lbl, (32, 33))
    top, left = (32 - 17) // 2, (33 - 30) // 2  # 7 and 1 (odd pads: one more after)
    np.testing.assert_array_equal(out[top : top + 17, left : left + 30], img)
    np.testing.assert_array_equal(out_lbl[top : top + 17, left : left + 30], lbl)
    assert valid.sum() == 17 * 30 and valid[top : top + 17, left : left + 30].all()
    assert (out[~valid] == 0).all() and (out_lbl[~valid] == 255).all()
    with pytest.raises(ValueError, match="2007_000042"):
        augment.eval_pad(img, lbl, (16, 64), key="2007_000042")


def test_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match="k1.*uint8"):
        augment.train_augment(
            np.random.default_rng(0),
            np.zeros((8, 8, 3), np.float32),
            None,
            crop_size=(4, 4),
            key="k1",
        )
    with pytest.raises(ValueError, match="k2.*label"):
        augment.train_augment(
            np.random.default_rng(0),
            np.zeros((8, 8, 3), np.uint8),
            np.zeros((8, 9), np.uint8),
            crop_size=(4, 4),
            key="k2",
        )
