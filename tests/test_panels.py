"""Prediction panels: the fixed val examples, the predictions (cropped to the unpadded image) of a
network with a known rule, and the rendered picture, against NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.data import augment, datasets
from mgd_jax.evaluation import evaluate, panels

PALETTE = datasets.lookup_table(datasets.voc_colormap(3))
THRESHOLD = 255 * augment.MEAN[0]  # a normalised red channel > 0 <=> red > this


def red_rule(variables, images):
    """Class 1 where the normalised red channel is positive, class 2 where it is below -w,
    else 0 (also on the padding, normalised to 0)."""
    red = images[..., 0]
    return jnp.stack([jnp.zeros_like(red), red, -red - variables["w"]], axis=-1)


def canvas_batches():
    """Two eval batches of 16x16 canvases: images of various sizes padded centred, one filler."""
    rng = np.random.default_rng(0)
    examples = []
    for h, w in ((16, 16), (10, 14), (7, 16), (16, 9)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[0, 0] = 255
        examples.append(augment.eval_pad(image, label, (16, 16)) + (image, label))
    filler = (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), bool),
              np.full((16, 16), 255, np.uint8))
    batch = lambda items: {k: np.stack([it[i] for it in items])  # noqa: E731
                           for i, k in enumerate(("image", "valid", "label"))}
    return [batch([filler, examples[0], examples[1]]), batch(examples[2:])], examples


def test_panel_predictions_and_picture_match_numpy():
    batches, examples = canvas_batches()
    panel_set = panels.PanelSet.from_batches(
        iter(batches), 3, PALETTE, evaluate.Evaluator(3, mode="whole"))
    assert len(panel_set) == 3  # the filler is skipped, the third example comes from batch 2
    predicted = panel_set.predict(red_rule, {"w": np.float32(1.0)})
    for (_, _, _, image, label), got in zip(examples, predicted, strict=False):
        red = (image[..., 0].astype(np.float64) / 255 - augment.MEAN[0]) / augment.STD[0]
        expected = np.where(red > 0, 1, np.where(-red - 1.0 > 0, 2, 0))
        assert got.shape == label.shape
        np.testing.assert_array_equal(got, expected)

    picture = panel_set.render({"rule": predicted})
    assert picture.shape[0] == panels.HEADER + 3 * (panels.TILE + 2)
    tile_widths = [round(ex[4].shape[1] * panels.TILE / ex[4].shape[0]) for ex in examples[:3]]
    column_width = max(tile_widths)  # the titles are narrower
    # Row 1 (the 10x14 image): ground truth and prediction tiles, nearest-upsampled colours
    # (PIL's nearest takes the source pixel under each target pixel's centre).
    _, _, _, _, label = examples[1]
    top = panels.HEADER + panels.TILE + 2
    rows = ((np.arange(panels.TILE) + 0.5) * label.shape[0] / panels.TILE).astype(int)
    cols = ((np.arange(tile_widths[1]) + 0.5) * label.shape[1] / tile_widths[1]).astype(int)
    for column, labels in ((1, label), (2, predicted[1])):
        left = 2 + column * (column_width + 2)
        got = picture[top:top + panels.TILE, left:left + tile_widths[1]]
        np.testing.assert_array_equal(got, PALETTE[labels[rows][:, cols]])
    assert tuple(PALETTE[255]) == datasets.IGNORE_COLOUR  # the ignored pixel's colour


def test_panels_need_an_example():
    empty = {"image": np.zeros((1, 4, 4, 3), np.uint8), "valid": np.zeros((1, 4, 4), bool),
             "label": np.zeros((1, 4, 4), np.uint8)}
    with pytest.raises(ValueError, match="no example"):
        panels.PanelSet.from_batches([empty], 2, PALETTE, evaluate.Evaluator(3))
