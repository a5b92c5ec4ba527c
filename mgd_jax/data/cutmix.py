"""CutMix box masks, official `mask_gen.BoxMaskGenerator` semantics (docs/method.md §4.5).

Per mask, with the official config (prop_range=(0.25, 0.5), n_boxes=3, random_aspect_ratio,
prop_by_area, within_bounds, invert):

    p ~ U(prop_range)                        area share of one box before the 1/n_boxes factor
    y_prop = exp(U(0,1) * ln p)              random aspect ratio, y_prop in [p, 1]
    x_prop = p / y_prop
    y_prop, x_prop *= sqrt(1 / n_boxes)      so each box covers p / n_boxes of the area
    size = round([y_prop, x_prop] * [H, W])  numpy rounding (half to even)
    pos = round(([H, W] - size) * U(0,1)^2)  box = [pos, pos + size)
    the mask starts at 0 (invert) and every box XOR-toggles its rectangle.

`u_mix = u0 * (1 - mask) + u1 * mask`: the boxes (mask == 1) come from u1.

The random draws are made in the official order and shapes for one mask (`uniform(size=(n_boxes,))`
for p, then for the aspect ratio, then `uniform(size=(n_boxes, 2))` for the positions), so with a
`np.random.RandomState` it reproduces the official generator called with `n_masks=1` on the same
state.
"""

from __future__ import annotations

import numpy as np

PROP_RANGE = (0.25, 0.5)
N_BOXES = 3


def box_mask(
    rng: np.random.Generator | np.random.RandomState,
    shape: tuple[int, int],
    *,
    prop_range: tuple[float, float] = PROP_RANGE,
    n_boxes: int = N_BOXES,
    random_aspect_ratio: bool = True,
    prop_by_area: bool = True,
    within_bounds: bool = True,
    invert: bool = True,
) -> np.ndarray:
    """One CutMix mask, uint8 (h, w) of 0/1 (1 = take the second image)."""
    h, w = shape
    lo, hi = prop_range
    fac = np.sqrt(1.0 / n_boxes)
    if prop_by_area:
        props = rng.uniform(lo, hi, size=(n_boxes,))
        zero = props == 0.0  # log(0) would give NaN sizes; such boxes are empty
        safe = np.where(zero, 1.0, props)
        if random_aspect_ratio:
            y_props = np.exp(rng.uniform(0.0, 1.0, size=(n_boxes,)) * np.log(safe))
            x_props = safe / y_props
        else:
            y_props = x_props = np.sqrt(safe)
        y_props = np.where(zero, 0.0, y_props * fac)
        x_props = np.where(zero, 0.0, x_props * fac)
    else:
        if random_aspect_ratio:
            y_props = rng.uniform(lo, hi, size=(n_boxes,))
            x_props = rng.uniform(lo, hi, size=(n_boxes,))
        else:
            y_props = x_props = rng.uniform(lo, hi, size=(n_boxes,))
        y_props = y_props * fac
        x_props = x_props * fac

    hw = np.array([h, w], np.float64)
    sizes = np.round(np.stack([y_props, x_props], axis=1) * hw)  # (n_boxes, 2)
    if within_bounds:
        starts = np.round((hw - sizes) * rng.uniform(0.0, 1.0, size=sizes.shape))
        ends = starts + sizes
    else:
        # Centred boxes that may cross the border. The official code slices with int() of a possibly
        # negative start, which Python reads as "from the end" (usually an empty box); clipping at 0
        # is the evident intent, so we clip. The default config never takes this branch.
        centres = np.round(hw * rng.uniform(0.0, 1.0, size=sizes.shape))
        starts = np.maximum(centres - sizes * 0.5, 0.0)
        ends = centres + sizes * 0.5

    mask = np.zeros((h, w), np.uint8) if invert else np.ones((h, w), np.uint8)
    for (y0, x0), (y1, x1) in zip(starts.astype(np.int64), ends.astype(np.int64), strict=True):
        mask[y0:y1, x0:x1] ^= 1
    return mask
