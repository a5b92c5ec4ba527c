"""Deployable exports of a segmentation network: serialized StableHLO (`jax.export`) and ONNX,
both runnable without this project's code.

    <dir>/deploy.json        what the files take and give ("format": FORMAT), sizes, provenance
    <dir>/<H>x<W>.jax        `jax.export` serialization: logits = f(images), any batch size
    <dir>/<H>x<W>.onnx       the same function as ONNX (optional: the `[onnx]` extra)

Each file is one fixed input size; several sizes make buckets. The function maps float32 NHWC
RGB images, normalised as `(x / 255 - MEAN) / STD` with 0 on padding (the evaluation protocol),
to float32 NHWC logits at the input size; the batch dimension is symbolic. The network's
variables are constants inside the files. `load(dir)` runs the `.jax` files from Python (the
one-line equivalent without this package is in docs/tools.md).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax.data.augment import MEAN, STD, normalize
from mgd_jax.network_dir import Network
from mgd_jax.runtime.errors import ExportError
from mgd_jax.serving import onnx_export
from mgd_jax.serving.predict import pad_centered

FORMAT = "mgd_jax.serving.deploy"
FORMAT_VERSION = 1
MANIFEST = "deploy.json"
FORMATS = ("jax", "onnx")
PLATFORMS = ("cpu", "cuda", "tpu")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512x512,1024x2048" -> [(512, 512), (1024, 2048)] (height x width)."""
    sizes = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 32 or int(w) < 32:
            raise ExportError(f"size {item.strip()!r}: expected HEIGHTxWIDTH, each >= 32 "
                              "(e.g. 512x512)")
        sizes.append((int(h), int(w)))
    return sorted(set(sizes))


def logits_fn(network: Network) -> Any:
    """images (B, H, W, 3) float32, normalised -> logits (B, H, W, C) float32, eval mode."""
    model, variables = network.model, network.variables

    def fn(images):
        return model.apply(variables, images, train=False).logits.astype(jnp.float32)

    return fn


def _file(size: tuple[int, int], fmt: str) -> str:
    return f"{size[0]}x{size[1]}.{fmt}"


def export_jax(network: Network, size: tuple[int, int],
               platforms: Sequence[str] = PLATFORMS) -> bytes:
    """The serialized `jax.export.Exported` of `logits_fn` at one input size, any batch size."""
    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(logits_fn(network)), platforms=tuple(platforms))(spec)
    return bytes(exported.serialize())


def export_deployable(network: Network, output: str | os.PathLike, *,
                      sizes: Sequence[tuple[int, int]], formats: Sequence[str] = ("jax",),
                      platforms: Sequence[str] = PLATFORMS,
                      overwrite: bool = False) -> dict[str, Any]:
    """Writes the deployable files of `network` for each size and format; returns the manifest.

    The network's compute dtype is what it was loaded with (`export.load_network(...,
    precision=)`); ONNX needs float32."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"deployable formats {unknown or '(none)'}: expected some of {FORMATS}")
    if "onnx" in formats and network.model.dtype != jnp.float32:
        raise ExportError(f"ONNX export needs a float32 network, not {network.model.dtype}")
    root = Path(output).expanduser()
    if root.exists():
        if not (root / MANIFEST).is_file():
            raise ExportError(f"{output}: already exists and is not a deployable export")
        if not overwrite:
            raise ExportError(f"{output}: already exists (pass overwrite=True / --overwrite)")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    files: dict[str, dict[str, str]] = {fmt: {} for fmt in formats}
    for size in sizes:
        key = f"{size[0]}x{size[1]}"
        if "jax" in formats:
            (root / _file(size, "jax")).write_bytes(export_jax(network, size, platforms))
            files["jax"][key] = _file(size, "jax")
        if "onnx" in formats:
            model = onnx_export.to_onnx(logits_fn(network), (*size, 3))
            (root / _file(size, "onnx")).write_bytes(model.SerializeToString())
            files["onnx"][key] = _file(size, "onnx")
    meta = network.meta
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "backbone": meta.get("backbone"),
        "num_classes": network.num_classes,
        "build_options": meta.get("build_options") or {},
        "class_names": meta.get("class_names"),
        "source": network.directory,
        "step": network.step,
        "input": {"name": "images", "shape": ["batch", "height", "width", 3],
                  "dtype": "float32", "channels": "RGB",
                  "normalisation": "(x / 255 - mean) / std; padding is 0 after normalisation",
                  "mean": list(MEAN), "std": list(STD)},
        "output": {"name": "logits", "shape": ["batch", "height", "width", network.num_classes],
                   "dtype": "float32"},
        "sizes": [list(s) for s in sizes],
        "files": files,
        "jax_platforms": list(platforms) if "jax" in formats else None,
        "onnx_opset": onnx_export.OPSET if "onnx" in formats else None,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class Deployed:
    """The `.jax` files of a deployable export, run with `jax.export` only."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()
        path = self.directory / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: cannot read the deployable export's manifest ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise ExportError(f"{path}: format {self.manifest.get('format')!r}, expected "
                              f"{FORMAT!r}")
        files = self.manifest["files"].get("jax") or {}
        if not files:
            raise ExportError(f"{self.directory}: holds no .jax files (exported only as "
                              f"{sorted(self.manifest['files'])})")
        self.sizes = sorted(tuple(int(v) for v in key.split("x")) for key in files)
        self._files = files
        self._loaded: dict[tuple[int, int], Any] = {}

    def _exported(self, size: tuple[int, int]) -> Any:
        if size not in self._loaded:
            data = (self.directory / self._files[f"{size[0]}x{size[1]}"]).read_bytes()
            self._loaded[size] = jax.export.deserialize(bytearray(data))
        return self._loaded[size]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits of normalised float32 images (B, H, W, 3) of one exported size."""
        size = tuple(images.shape[1:3])
        if size not in self.sizes:
            raise ExportError(f"input size {size[0]}x{size[1]} is none of the exported sizes "
                              f"{['x'.join(map(str, s)) for s in self.sizes]}")
        return np.asarray(self._exported(size).call(np.asarray(images, np.float32)))

    def bucket(self, height: int, width: int) -> tuple[int, int]:
        """The smallest exported size that holds an image of this size."""
        fits = [s for s in self.sizes if s[0] >= height and s[1] >= width]
        if not fits:
            raise ExportError(f"an image of {height}x{width} fits none of the exported sizes "
                              f"{['x'.join(map(str, s)) for s in self.sizes]}")
        return min(fits, key=lambda s: (s[0] * s[1], s))

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Logits (h, w, C) of one uint8 RGB image: normalised, padded centred onto its bucket
        (0 after normalisation, as the evaluation pads), run, cropped back."""
        h, w = image.shape[:2]
        canvas, valid, (top, left) = pad_centered(image, self.bucket(h, w))
        out = self(normalize(canvas, valid)[None])[0]
        return out[top:top + h, left:left + w]


def load(directory: str | os.PathLike) -> Deployed:
    """A deployable export's `.jax` files, ready to run (`Deployed`)."""
    return Deployed(directory)
