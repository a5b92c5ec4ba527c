"""Prediction panels: a fixed set of val images and what networks predict on them, rendered as one
picture with a column per source (image | ground truth | network | network ...) and a row per
image, in the dataset's colours (the ignore label in VOC's boundary colour).

The trainer writes one at every evaluation (`<workdir>/panels/*.png` and TensorBoard images; the
networks are the trained one and the method's `extra_evals`, e.g. MGD's teachers); the demo writes
one comparing its stages; notebooks show them inline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from mgd_jax.data import input_pipeline
from mgd_jax.evaluation import evaluate
from mgd_jax.network_dir import Network

TILE = 96  # rendered height of one image, px
HEADER = 16  # px of the title row


def _box(valid: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of the valid (unpadded) pixels of one canvas."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if not rows.size:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


class PanelSet:
    """The first `n` examples of eval batches, kept as one padded batch for prediction.

    Args:
      batch: {"image" uint8 (n, H, W, 3), "valid" bool (n, H, W), "label" (n, H, W)}, padded
        canvases as the eval pipeline yields them.
      palette: (256, 3) uint8 colour table (`DatasetInfo.palette_array()`).
      evaluator: gives the class maps with the evaluation protocol (`Evaluator.labels`).
    """

    def __init__(self, batch: Mapping[str, np.ndarray], palette: np.ndarray,
                 evaluator: evaluate.Evaluator):
        self.batch = {k: np.asarray(batch[k]) for k in ("image", "valid", "label")}
        self.palette = np.asarray(palette, np.uint8)
        self.evaluator = evaluator
        self.boxes = [_box(v) for v in self.batch["valid"]]

    @classmethod
    def from_batches(cls, batches: Iterable[Mapping[str, Any]], n: int, palette: np.ndarray,
                     evaluator: evaluate.Evaluator) -> PanelSet:
        """The first `n` real (not filler) examples of `batches` (fewer if the split is smaller)."""
        kept: dict[str, list] = {"image": [], "valid": [], "label": []}
        for batch in batches:
            for i in range(len(batch["image"])):
                if len(kept["image"]) < n and np.asarray(batch["valid"][i]).any():
                    for k in kept:
                        kept[k].append(np.asarray(batch[k][i]))
            if len(kept["image"]) >= n:
                break
        if not kept["image"]:
            raise ValueError("panels: the eval batches hold no example")
        return cls({k: np.stack(v) for k, v in kept.items()}, palette, evaluator)

    def __len__(self) -> int:
        return len(self.boxes)

    def predict(self, apply_fn: evaluate.ApplyFn, variables: Any) -> list[np.ndarray]:
        """Each image's class map (unpadded) from `apply_fn(variables, images)`."""
        labels = self.evaluator.labels(apply_fn, jax.device_get(variables),
                                       self.batch["image"], self.batch["valid"])
        return [labels[i][box] for i, box in enumerate(self.boxes)]

    def render(self, columns: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
        """uint8 (H, W, 3): image | ground truth | `columns` (title -> class maps)."""
        images = [self.batch["image"][i][box] for i, box in enumerate(self.boxes)]
        truth = [self.batch["label"][i][box] for i, box in enumerate(self.boxes)]
        titles = ["image", "ground truth", *columns]
        sources = [images, truth, *columns.values()]
        return grid(titles, [[self._tile(s[i]) for s in sources] for i in range(len(self))])

    def _tile(self, array: np.ndarray) -> np.ndarray:
        if array.ndim == 2:  # class ids -> colours
            array = self.palette[np.asarray(array).astype(np.int64)]
        h, w = array.shape[:2]
        if not h or not w:
            return np.zeros((TILE, TILE, 3), np.uint8)
        width = max(1, round(w * TILE / h))
        return np.asarray(Image.fromarray(np.asarray(array, np.uint8)).resize(
            (width, TILE), Image.NEAREST))


def grid(titles: Sequence[str], rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tiles (each TILE px high) in rows under a title row, on white, `gap` px apart."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max([row[c].shape[1] for row in rows] + [math.ceil(measure.textlength(t)) + 4])
              for c, t in enumerate(titles)]
    height = HEADER + len(rows) * (TILE + gap)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(widths) + 1), height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for c, title in enumerate(titles):
        draw.text((x, 2), title, fill="black")
        for r, row in enumerate(rows):
            canvas.paste(Image.fromarray(row[c]), (x, HEADER + r * (TILE + gap)))
        x += widths[c] + gap
    return np.asarray(canvas)


def networks_panel(config: ml_collections.ConfigDict, networks: Mapping[str, Network],
                   n: int = 4) -> np.ndarray:
    """A panel of saved networks (title -> `export.Network`) on the first `n` images of the
    config's eval split, with the config's protocol (e.g. the demo's stages side by side)."""
    source = input_pipeline.eval_source(config)
    panel_set = PanelSet.from_batches(
        input_pipeline.eval_batches(config, source), n, source.info.palette_array(),
        evaluate.Evaluator.from_config(config))
    return panel_set.render({title: panel_set.predict(evaluate.model_logits(net.model),
                                                      net.variables)
                             for title, net in networks.items()})


def to_pil(image: np.ndarray) -> Image.Image:
    """A uint8 (H, W, 3) array as a PIL image (notebooks display it inline)."""
    return Image.fromarray(np.asarray(image, np.uint8))


def save_png(path: str, image: np.ndarray) -> None:
    to_pil(image).save(path, format="PNG", optimize=True)
