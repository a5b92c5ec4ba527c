"""Losses vs brute-force numpy references written from the spec (docs/method.md §1.2, §4.6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.methods import losses
from mgd_jax.models import layers
from mgd_jax.models.layers import adaptive_avg_pool2d

# ----------------------------------------------------------------------------- numpy references


def np_log_softmax_pixel(z):
    z = np.asarray(z, np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def np_cross_entropy(logits, labels, ignore=255):
    total, count = 0.0, 0
    n, h, w, _ = logits.shape
    for b in range(n):
        for y in range(h):
            for x in range(w):
                t = labels[b, y, x]
                if t == ignore:
                    continue
                total -= np_log_softmax_pixel(logits[b, y, x])[t]
                count += 1
    return total / count if count else 0.0


def np_ohem(logits, labels, thresh, min_kept, ignore=255):
    """ProbOhemCrossEntropy2d, branch by branch, with python lists."""
    n, h, w, c = logits.shape
    pix = [(b, y, x) for b in range(n) for y in range(h) for x in range(w)]
    valid = [labels[p] != ignore for p in pix]
    num_valid = sum(valid)
    keep = list(valid)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        probs = []
        for p, v in zip(pix, valid, strict=True):
            if v:
                z = logits[p].astype(np.float32)
                e = np.exp(z - z.max())
                probs.append(float((e / e.sum())[labels[p]]))
            else:
                probs.append(1.0)
        if min_kept > 0:
            threshold = thresh
            kth = sorted(probs)[min(len(probs), min_kept) - 1]
            if kth > thresh:
                threshold = kth
            keep = [v and (pr <= threshold) for v, pr in zip(valid, probs, strict=True)]
    total, count = 0.0, 0
    for p, k in zip(pix, keep, strict=True):
        if k:
            total -= np_log_softmax_pixel(logits[p])[labels[p]]
            count += 1
    return total / count if count else 0.0


def np_adaptive_pool(x, o):
    """(N, H, W, C) -> (N, o, o, C), bins floor(i*L/o) .. ceil((i+1)*L/o)."""
    n, h, w, c = x.shape
    out = np.zeros((n, o, o, c))
    for i in range(o):
        y0, y1 = (i * h) // o, -((-(i + 1) * h) // o)
        for j in range(o):
            x0, x1 = (j * w) // o, -((-(j + 1) * w) // o)
            out[:, i, j] = x[:, y0:y1, x0:x1].astype(np.float64).mean(axis=(1, 2))
    return out


def np_content_aware(fs, ft, grid):
    def sim(f):
        q = np_adaptive_pool(f, grid).reshape(f.shape[0], grid * grid, -1)
        m = np.zeros((f.shape[0], grid * grid, grid * grid))
        for b in range(f.shape[0]):
            for i in range(grid * grid):
                for j in range(grid * grid):
                    m[b, i, j] = (
                        q[b, i] @ q[b, j] / (np.linalg.norm(q[b, i]) * np.linalg.norm(q[b, j]))
                    )
        return m

    return float(np.mean((sim(fs) - sim(ft)) ** 2))


def np_semantic_sensitive(s, t):
    total = 0.0
    for b in range(s.shape[0]):
        for c in range(s.shape[3]):
            total += abs(
                s[b, :, :, c].astype(np.float64).mean() - t[b, :, :, c].astype(np.float64).mean()
            )
    return total


# ----------------------------------------------------------------------------- tests


def _data(seed, n=2, h=5, w=6, c=4, ignore_frac=0.2, scale=2.0, agree=0.0):
    """Random logits/labels; a fraction `agree` of labels equals the argmax (confident pixels)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, h, w, c)) * scale).astype(np.float32)
    labels = rng.integers(0, c, (n, h, w)).astype(np.int32)
    labels = np.where(rng.random((n, h, w)) < agree, logits.argmax(-1), labels).astype(np.int32)
    labels[rng.random((n, h, w)) < ignore_frac] = 255
    return logits, labels


def test_cross_entropy_matches_numpy():
    logits, labels = _data(0)
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=1e-5)


def test_cross_entropy_bf16_input_uses_float32_math():
    logits, labels = _data(1)
    lb = jnp.asarray(logits).astype(jnp.bfloat16)
    got = losses.cross_entropy(lb, jnp.asarray(labels))
    assert got.dtype == jnp.float32
    ref = np_cross_entropy(np.asarray(lb.astype(jnp.float32)), labels)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient():
    logits, _ = _data(2)
    labels = np.full(logits.shape[:3], 255, np.int32)
    value, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_cross_entropies_share_one_log_softmax_and_equal_separate_ones():
    logits, labels = _data(4)
    _, other = _data(5)
    got = losses.cross_entropies(jnp.asarray(logits), [jnp.asarray(labels), jnp.asarray(other)])
    for value, target in zip(got, (labels, other), strict=True):
        np.testing.assert_allclose(float(value), np_cross_entropy(logits, target), rtol=1e-5)
    jaxpr = jax.make_jaxpr(lambda x: losses.cross_entropies(x, [labels, other, labels]))(logits)
    assert str(jaxpr).count("reduce_max") == 1  # one log-softmax


def test_cross_entropy_custom_ignore_index():
    logits, labels = _data(3, ignore_frac=0.0)
    labels[0, 0, :] = 3
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_index=3))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels, ignore=3), rtol=1e-5)


@pytest.mark.parametrize(
    "min_kept,thresh,ignore_frac,scale,agree",
    [
        (10, 0.7, 0.2, 2.0, 0.0),  # mining with threshold = thresh (hard random labels)
        (10, 0.2, 0.2, 2.0, 0.0),  # low thresh
        (10, 0.7, 0.2, 6.0, 0.95),  # confident pixels: threshold = the 10th smallest p > thresh
        (30, 0.5, 0.1, 6.0, 0.9),  # same branch, larger min_kept
        (60, 0.7, 0.2, 2.0, 0.5),  # min_kept = all 60 pixels > valid: plain CE branch
        (1000, 0.7, 0.0, 2.0, 0.5),  # min_kept > pixels: plain CE
        (0, 0.7, 0.2, 6.0, 0.9),  # min_kept == 0: the official never masks -> plain CE
        (6, 0.7, 0.9, 2.0, 0.5),  # few valid pixels (5-7): both sides of num_valid vs min_kept
    ],
)
def test_ohem_matches_numpy(min_kept, thresh, ignore_frac, scale, agree):
    for seed in range(3):
        logits, labels = _data(10 + seed, ignore_frac=ignore_frac, scale=scale, agree=agree)
        got = float(
            losses.ohem_cross_entropy(
                jnp.asarray(logits), jnp.asarray(labels), thresh=thresh, min_kept=min_kept
            )
        )
        ref = np_ohem(logits, labels, thresh, min_kept)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_ohem_valid_equal_to_min_kept_mines():
    # num_valid == min_kept is *not* the "too few" branch: it mines with the largest valid p.
    logits, labels = _data(20, ignore_frac=0.5)
    k = int((labels != 255).sum())
    got = float(
        losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), thresh=0.1, min_kept=k)
    )
    np.testing.assert_allclose(got, np_ohem(logits, labels, 0.1, k), rtol=1e-5)
    got1 = float(
        losses.ohem_cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), thresh=0.1, min_kept=k + 1
        )
    )
    np.testing.assert_allclose(got1, np_cross_entropy(logits, labels), rtol=1e-5)


def test_ohem_mines_only_hard_pixels_and_is_jittable():
    logits, labels = _data(21, ignore_frac=0.0, h=8, w=8)
    f = jax.jit(lambda z, y: losses.ohem_cross_entropy(z, y, thresh=0.7, min_kept=5))
    got = float(f(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, np_ohem(logits, labels, 0.7, 5), rtol=1e-5)
    assert got > float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    grad = jax.grad(f)(jnp.asarray(logits), jnp.asarray(labels))
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_ohem_all_ignored_is_zero():
    logits, _ = _data(22)
    labels = jnp.full(logits.shape[:3], 255, jnp.int32)
    for k in (0, 5):
        assert float(losses.ohem_cross_entropy(jnp.asarray(logits), labels, min_kept=k)) == 0.0


def test_per_replica_averages_group_losses():
    logits, labels = _data(23, n=4, ignore_frac=0.3)
    got = float(
        losses.per_replica(
            losses.ohem_cross_entropy,
            jnp.asarray(logits),
            jnp.asarray(labels),
            replica_batch=2,
            thresh=0.7,
            min_kept=20,
        )
    )
    ref = np.mean([np_ohem(logits[i : i + 2], labels[i : i + 2], 0.7, 20) for i in (0, 2)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    s, t = _data(24, n=4)[0], _data(25, n=4)[0]
    got = float(
        losses.per_replica(
            losses.semantic_sensitive, jnp.asarray(s), jnp.asarray(t), replica_batch=2
        )
    )
    np.testing.assert_allclose(got, np_semantic_sensitive(s, t) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="replica_batch"):
        losses.per_replica(
            losses.cross_entropy, jnp.asarray(logits), jnp.asarray(labels), replica_batch=3
        )


def _uneven(seed):
    """4 images in 2 replica groups of 2: group 0 mostly ignored (few valid pixels), group 1
    hardly: the per-replica and the global mean then weigh the pixels differently."""
    logits, labels = _data(seed, n=4, h=6, w=7, ignore_frac=0.1)
    labels[:2, :, 1:] = 255  # group 0 keeps at most 12 of its 84 pixels
    return logits, labels


def np_per_replica_ce(logits, labels, replica_batch):
    """The official reduction: CE mean over each GPU's valid pixels (a GPU with none: 0, the
    contribution it makes to the official gradient), then the mean over GPUs."""
    groups = range(0, len(logits), replica_batch)
    return float(np.mean([np_cross_entropy(logits[i : i + replica_batch],
                                           labels[i : i + replica_batch]) for i in groups]))


def test_per_replica_cross_entropy_matches_numpy_and_differs_from_global():
    logits, labels = _uneven(26)
    counts = [(labels[i : i + 2] != 255).sum() for i in (0, 2)]
    assert counts[0] * 4 < counts[1]
    got = float(losses.per_replica(losses.cross_entropy, jnp.asarray(logits),
                                   jnp.asarray(labels), replica_batch=2))
    want = np_per_replica_ce(logits, labels, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    global_ = np_cross_entropy(logits, labels)
    assert abs(want - global_) > 0.05 * global_, (want, global_)  # the two reductions differ
    # one group = the whole batch: the global mean
    np.testing.assert_allclose(float(losses.per_replica(
        losses.cross_entropy, jnp.asarray(logits), jnp.asarray(labels), replica_batch=4)),
        global_, rtol=1e-5)


def test_per_replica_equals_global_without_ignored_pixels():
    """Why only L_sup needs the option: the pseudo-label targets of L_P and of the CPS cross
    term never hold the ignore label, so every group has as many valid pixels and the mean of
    the group means is the global mean."""
    logits, labels = _data(27, n=4, ignore_frac=0.0)
    per_replica = losses.per_replica(losses.cross_entropy, jnp.asarray(logits),
                                     jnp.asarray(labels), replica_batch=2)
    np.testing.assert_allclose(float(per_replica), np_cross_entropy(logits, labels), rtol=1e-5)


def test_per_replica_cross_entropy_empty_group_matches_torch_gradient():
    """A replica whose pixels are all ignored: PyTorch's CrossEntropyLoss(ignore_index=255) is
    NaN there with a zero gradient, so the official update (each GPU's CE, summed over GPUs and
    divided by their count) is the other groups' gradient / W. Here that group counts 0: the
    same gradient, and a finite value."""
    from torch_reference import torch

    logits, labels = _uneven(28)
    labels[:2] = 255
    value, grad = jax.value_and_grad(
        lambda x: losses.per_replica(losses.cross_entropy, x, jnp.asarray(labels),
                                     replica_batch=2))(jnp.asarray(logits))
    np.testing.assert_allclose(float(value), np_cross_entropy(logits[2:], labels[2:]) / 2,
                               rtol=1e-5)

    x = torch.tensor(logits).permute(0, 3, 1, 2).requires_grad_(True)
    y = torch.tensor(labels).long()
    ce = torch.nn.CrossEntropyLoss(ignore_index=255)
    per_gpu = [ce(x[i : i + 2], y[i : i + 2]) for i in (0, 2)]
    assert torch.isnan(per_gpu[0]) and not torch.isnan(per_gpu[1])
    (sum(per_gpu) / 2).backward()
    torch_grad = x.grad.permute(0, 2, 3, 1).numpy()
    assert np.all(np.isfinite(torch_grad))
    np.testing.assert_allclose(np.asarray(grad), torch_grad, rtol=1e-5, atol=1e-7)
    # and with every group valid, the values agree too
    logits, labels = _uneven(29)
    x = torch.tensor(logits).permute(0, 3, 1, 2)
    y = torch.tensor(labels).long()
    official = float(sum(ce(x[i : i + 2], y[i : i + 2]) for i in (0, 2)) / 2)
    got = losses.per_replica(losses.cross_entropy, jnp.asarray(logits), jnp.asarray(labels),
                             replica_batch=2)
    np.testing.assert_allclose(float(got), official, rtol=1e-5)


def test_semantic_sensitive_is_l1_sum():
    s, _ = _data(30, n=3, h=7, w=9, c=5)
    t, _ = _data(31, n=3, h=7, w=9, c=5)
    got = float(losses.semantic_sensitive(jnp.asarray(s), jnp.asarray(t)))
    np.testing.assert_allclose(got, np_semantic_sensitive(s, t), rtol=1e-5)
    # a SUM over the batch: duplicating the batch doubles it
    got2 = float(
        losses.semantic_sensitive(
            jnp.asarray(np.concatenate([s, s])), jnp.asarray(np.concatenate([t, t]))
        )
    )
    np.testing.assert_allclose(got2, 2 * got, rtol=1e-5)


@pytest.mark.parametrize("low,full",
                         [((8, 8), (32, 32)), ((5, 7), (17, 25)), ((33, 33), (129, 129))])
def test_semantic_sensitive_from_low_resolution_logits(low, full):
    """L_I from the 1/4-resolution logits == L_I of their align-corners upsampling (value and
    gradient): the mean of the upsampled logits is a fixed weighted mean of the low ones."""
    s, _ = _data(32, n=2, h=low[0], w=low[1], c=3)
    t, _ = _data(33, n=2, h=low[0], w=low[1], c=3)
    up = lambda x: layers.resize_bilinear_align_corners(x, full)

    def full_res(a, b):
        return losses.semantic_sensitive(up(a), up(b))

    def low_res(a, b):
        return losses.semantic_sensitive(a, b, size=full)

    s, t = jnp.asarray(s), jnp.asarray(t)
    np.testing.assert_allclose(float(low_res(s, t)), float(full_res(s, t)), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(low_res)(s, t), jax.grad(full_res)(s, t), rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize("size,grid", [(13, 7), (20, 7), (14, 7), (9, 4)])
def test_content_aware_matches_numpy(size, grid):
    rng = np.random.default_rng(size)
    fs = np.maximum(rng.standard_normal((2, size, size + 1, 6)), 0).astype(np.float32)
    ft = np.maximum(rng.standard_normal((2, size, size + 1, 6)), 0).astype(np.float32) + 0.1
    got = float(losses.content_aware(jnp.asarray(fs), jnp.asarray(ft), grid=grid))
    np.testing.assert_allclose(got, np_content_aware(fs, ft, grid), rtol=1e-4, atol=1e-7)


def test_adaptive_pool_bins_overlap_like_pytorch():
    # the documented 128 -> 7 bins of docs/method.md §1.2, via the pooling losses.content_aware uses
    x = np.arange(128, dtype=np.float32)[None, :, None, None] * np.ones((1, 1, 3, 1), np.float32)
    pooled = np.asarray(adaptive_avg_pool2d(jnp.asarray(x), (7, 1)))[0, :, 0, 0]
    bins = [(0, 19), (18, 37), (36, 55), (54, 74), (73, 92), (91, 110), (109, 128)]
    np.testing.assert_allclose(pooled, [np.mean(np.arange(a, b)) for a, b in bins], rtol=1e-6)
    np.testing.assert_allclose(np_adaptive_pool(x, 7)[0, :, 0, 0], pooled, rtol=1e-6)


def test_content_aware_all_zero_region_is_finite():
    rng = np.random.default_rng(5)
    fs = np.maximum(rng.standard_normal((1, 14, 14, 4)), 0).astype(np.float32)
    fs[:, :4, :4] = 0.0  # the first pooled region is all zero -> official gives NaN
    ft = rng.random((1, 14, 14, 4)).astype(np.float32)
    value, grad = jax.value_and_grad(losses.content_aware)(jnp.asarray(fs), jnp.asarray(ft))
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    assert np.any(np.asarray(grad) != 0)


def test_content_aware_identical_features_is_zero_and_shape_checked():
    f = jnp.asarray(np.random.default_rng(6).random((2, 10, 10, 3)), jnp.float32)
    assert float(losses.content_aware(f, f)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same N"):
        losses.content_aware(f, f[:1])
    # Different widths / sizes are fine (reduced-width students vs teachers): the matrices are
    # grid^2 x grid^2 either way; a channel-duplicated feature has the same similarities.
    wide = jnp.concatenate([f, f], axis=-1)
    assert float(losses.content_aware(f, wide)) == pytest.approx(0.0, abs=1e-10)
    assert np.isfinite(float(losses.content_aware(f, f[:, :9, :8])))


def test_gradients_student_nonzero_teacher_zero_under_stop_gradient():
    """A tiny linear 'teacher' param wrapped in stop_gradient receives exactly zero gradient."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 9, 9)), jnp.int32)
    params = {
        "student": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "teacher": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
    }

    def total(p):
        s = x @ p["student"]
        t = jax.lax.stop_gradient(x @ p["teacher"])
        pseudo = jnp.argmax(t, axis=-1)
        return (
            losses.cross_entropy(s, labels)
            + losses.ohem_cross_entropy(s, labels, thresh=0.7, min_kept=20)
            + losses.cross_entropy(s, pseudo)
            + losses.semantic_sensitive(s, t)
            + losses.content_aware(jax.nn.relu(s), jax.nn.relu(t), grid=3)
        )

    g = jax.grad(total)(params)
    assert np.all(np.isfinite(g["student"])) and np.any(np.asarray(g["student"]) != 0)
    assert np.all(np.asarray(g["teacher"]) == 0.0)
    # each distillation loss alone also gives a non-zero student gradient
    for fn in (losses.semantic_sensitive, lambda a, b: losses.content_aware(a, b, grid=3)):
        gs = jax.grad(lambda w, fn=fn: fn(x @ w, jax.lax.stop_gradient(x @ params["teacher"])))(
            params["student"]
        )
        assert np.all(np.isfinite(gs)) and np.any(np.asarray(gs) != 0)


def test_losses_match_torch_formulation():
    """The same losses written the official way in PyTorch (NCHW, F.* ops) on one batch."""
    from torch_reference import torch

    F = torch.nn.functional
    rng = np.random.default_rng(8)
    logits, labels = _data(40, n=2, h=13, w=13, c=5)
    fs = np.maximum(rng.standard_normal((2, 13, 13, 8)), 0).astype(np.float32)
    ft = np.maximum(rng.standard_normal((2, 13, 13, 8)), 0).astype(np.float32)
    nchw = lambda a: torch.tensor(a).permute(0, 3, 1, 2)

    ce = F.cross_entropy(nchw(logits), torch.tensor(labels).long(), ignore_index=255)
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), ce.item(), rtol=1e-5)

    s_cls = F.adaptive_avg_pool2d(nchw(logits), (1, 1))
    t_cls = F.adaptive_avg_pool2d(nchw(logits[::-1].copy()), (1, 1))
    sem = torch.sum(torch.abs(s_cls - t_cls))
    got = losses.semantic_sensitive(jnp.asarray(logits), jnp.asarray(logits[::-1]))
    np.testing.assert_allclose(float(got), sem.item(), rtol=1e-5)

    def torch_sim(f):
        q = F.adaptive_avg_pool2d(nchw(f), (7, 7)).flatten(2)  # (B, C, 49)
        m = q.transpose(-2, -1).matmul(q)
        m = m / torch.norm(q, p=2, dim=-2).unsqueeze(-1)
        return m / torch.norm(q, p=2, dim=-2).unsqueeze(-2)

    content = F.mse_loss(torch_sim(fs), torch_sim(ft))
    got = losses.content_aware(jnp.asarray(fs), jnp.asarray(ft))
    np.testing.assert_allclose(float(got), content.item(), rtol=1e-4)
