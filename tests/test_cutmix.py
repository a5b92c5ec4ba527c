"""data.cutmix.box_mask: official BoxMaskGenerator semantics (docs/method.md §4.5)."""

import numpy as np
import pytest

from mgd_jax.data import cutmix


def reference_box_mask(state: np.random.RandomState, h: int, w: int) -> np.ndarray:
    """The §4.5 recipe, one box at a time, with the official draw order for a single mask."""
    p = state.uniform(0.25, 0.5, size=(3,))
    y_prop = np.exp(state.uniform(0.0, 1.0, size=(3,)) * np.log(p))
    x_prop = p / y_prop
    u = state.uniform(0.0, 1.0, size=(3, 2))
    mask = np.zeros((h, w), np.uint8)
    for b in range(3):
        sy = np.round(y_prop[b] * np.sqrt(1 / 3) * h)
        sx = np.round(x_prop[b] * np.sqrt(1 / 3) * w)
        y0, x0 = np.round((h - sy) * u[b, 0]), np.round((w - sx) * u[b, 1])
        for i in range(int(y0), int(y0 + sy)):
            for j in range(int(x0), int(x0 + sx)):
                mask[i, j] = 1 - mask[i, j]
    return mask


@pytest.mark.parametrize("shape", [(32, 32), (17, 45)])
def test_matches_reference_with_the_same_random_state(shape):
    for seed in range(20):
        got = cutmix.box_mask(np.random.RandomState(seed), shape)
        np.testing.assert_array_equal(got, reference_box_mask(np.random.RandomState(seed), *shape))
        assert got.dtype == np.uint8 and got.shape == shape


def test_deterministic_per_seed():
    a = cutmix.box_mask(np.random.default_rng(3), (64, 64))
    b = cutmix.box_mask(np.random.default_rng(3), (64, 64))
    c = cutmix.box_mask(np.random.default_rng(4), (64, 64))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_area_statistics():
    rng = np.random.default_rng(0)
    h = w = 64
    # One box: covers p of the area, p ~ U(0.25, 0.5) -> mean 0.375 (up to rounding of the sides).
    one = np.array([cutmix.box_mask(rng, (h, w), n_boxes=1).mean() for _ in range(400)])
    assert one.min() > 0.22 and one.max() < 0.53
    assert abs(one.mean() - 0.375) < 0.01
    # Three boxes: each p/3 in [8.3%, 16.7%] before XOR, so the box areas sum to 0.375 on average;
    # overlaps toggle back to 0, which brings the mean coverage down to about 0.25 (measured 0.2499
    # over 2000 masks; the standard error over 400 masks is ~0.004).
    three = np.array([cutmix.box_mask(rng, (h, w)).mean() for _ in range(400)])
    assert set(np.unique(cutmix.box_mask(rng, (h, w)))) <= {0, 1}
    assert three.max() < 0.53
    assert 0.235 < three.mean() < 0.265


class _ScriptedRng:
    """Returns scripted values for each `uniform` call (shaped like the request)."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, low, high, size):
        return np.broadcast_to(np.asarray(self.values.pop(0), np.float64), size).copy()


def test_xor_overlapping_boxes_toggle_back():
    # Square boxes with p = 0.5 and two boxes: sqrt(0.5) * sqrt(1/2) = 1/2 of each side (4 of 8).
    kw = dict(n_boxes=2, prop_range=(0.5, 0.5), random_aspect_ratio=False)
    # Two identical boxes at the same place cancel.
    mask = cutmix.box_mask(_ScriptedRng(0.5, [[0.0, 0.0], [0.0, 0.0]]), (8, 8), **kw)
    assert not mask.any()
    # Shifted second box (offset round((8 - 4) * 0.5) = 2): only the symmetric difference survives.
    mask = cutmix.box_mask(_ScriptedRng(0.5, [[0.0, 0.0], [0.5, 0.5]]), (8, 8), **kw)
    expect = np.zeros((8, 8), np.uint8)
    expect[0:4, 0:4] ^= 1
    expect[2:6, 2:6] ^= 1
    np.testing.assert_array_equal(mask, expect)


def test_invert_false_starts_from_ones():
    a = cutmix.box_mask(np.random.default_rng(1), (32, 32), invert=True)
    b = cutmix.box_mask(np.random.default_rng(1), (32, 32), invert=False)
    np.testing.assert_array_equal(a, 1 - b)


def test_other_branches_stay_in_bounds():
    rng = np.random.default_rng(2)
    for kwargs in (
        {"within_bounds": False},
        {"random_aspect_ratio": False},
        {"prop_by_area": False},
        {"prop_range": (0.0, 0.0)},
    ):
        m = cutmix.box_mask(rng, (20, 30), **kwargs)
        assert m.shape == (20, 30) and set(np.unique(m)) <= {0, 1}
    assert not cutmix.box_mask(rng, (20, 30), prop_range=(0.0, 0.0)).any()
