"""Input-pipeline throughput: fully augmented training examples per second, per worker count.

One example = one augmented crop (labeled or unlabeled); an MGD step consumes 3 per batch slot
(labeled, unlabeled_0, unlabeled_1), so steps/s = examples/s / (3 * batch).

    python -m mgd_jax.data.bench --fake --crop=512 --workers=0,1,2 --seconds=20
    python -m mgd_jax.data.bench --dataset=voc --data_dir=~/tensorflow_datasets --workers=0,2,4
    python -m mgd_jax.data.bench --config=configs/voc.py --config.data_dir=... --workers=0,8

`--fake` (the default without --dataset/--config) synthesises VOC-sized images in memory, stored as
JPEG (images) and PNG (labels) and decoded on every access like a real source, so it runs anywhere.
With --config, the dataset, data_dir, train split, crop_size, scales, per-host batch and seed come
from the config; plain flags given explicitly override them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import cv2
import numpy as np
from absl import app, flags

from mgd_jax.data import augment, pipeline

_CONFIG = None
try:  # the trainer's config system; optional here
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (optional).")
except ImportError:  # pragma: no cover
    pass

FLAGS = flags.FLAGS
flags.DEFINE_bool("fake", False, "Synthetic VOC-sized JPEG/PNG examples decoded in memory.")
flags.DEFINE_string(
    "dataset", "", "Prepared dataset for data.sources.open_split (voc, cityscapes, ...)."
)
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where the prepared datasets live.")
flags.DEFINE_string("split", "train", "Split to read (labeled and unlabeled streams both use it).")
flags.DEFINE_integer("crop", 512, "Square crop size.")
flags.DEFINE_integer("batch", 8, "Per-host batch size (labeled; the same again for u0 and u1).")
flags.DEFINE_string("workers", "0,1,2", "Comma-separated worker counts to measure.")
flags.DEFINE_float("seconds", 15.0, "Measurement time per worker count (after one warm-up batch).")
flags.DEFINE_integer("read_threads", 1, "grain read threads per process.")
flags.DEFINE_bool("labeled_only", False, "Measure the labeled stream only (Sup.l baseline).")
flags.DEFINE_string("fake_size", "375x500", "HxW of the --fake images (VOC is at most 500 px).")
flags.DEFINE_integer("fake_count", 256, "Distinct --fake examples.")
flags.DEFINE_integer("seed", 0, "Pipeline seed.")


class FakeJpegSource:
    """VOC-like examples kept as JPEG/PNG bytes, decoded per access (picklable, deterministic)."""

    def __init__(
        self,
        count: int = 64,
        size: tuple[int, int] = (375, 500),
        seed: int = 0,
        num_classes: int = 21,
    ):
        rs = np.random.RandomState(seed)
        h, w = size
        self.jpegs, self.pngs = [], []
        for _ in range(count):
            # Smooth colour fields plus texture: photo-like JPEG sizes (~40-100 KB at 500x375).
            base = rs.randint(0, 256, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
            img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
            img = np.clip(img + rs.randint(-24, 25, img.shape), 0, 255).astype(np.uint8)
            blobs = rs.randint(0, num_classes, (h // 50 + 2, w // 50 + 2)).astype(np.uint8)
            lbl = cv2.resize(blobs, (w, h), interpolation=cv2.INTER_NEAREST)
            edges = cv2.morphologyEx(lbl, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 0
            lbl[edges] = augment.IGNORE_INDEX  # VOC-style 255 boundaries
            self.jpegs.append(
                cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            )
            self.pngs.append(cv2.imencode(".png", lbl)[1].tobytes())
        self.keys = [f"fake_{i:05d}" for i in range(count)]
        self.info = None

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bgr = cv2.imdecode(np.frombuffer(self.jpegs[index], np.uint8), cv2.IMREAD_COLOR)
        lbl = cv2.imdecode(np.frombuffer(self.pngs[index], np.uint8), cv2.IMREAD_UNCHANGED)
        return {
            "image": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
            "label": lbl,
            "key": self.keys[index],
        }


def _cpu_seconds() -> float | None:
    """User+system CPU seconds of this process and its worker children; None without psutil."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def measure(
    labeled: Any,
    unlabeled: Any,
    *,
    num_workers: int,
    batch_size: int,
    crop_size: int | tuple[int, int],
    scales: tuple[float, ...] = augment.TRAIN_SCALES,
    seconds: float = 15.0,
    read_threads: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Runs the training stream for `seconds` after one warm-up batch; returns rates."""
    ds = pipeline.train_dataset(
        labeled,
        unlabeled,
        batch_size=batch_size,
        crop_size=crop_size,
        scales=scales,
        seed=seed,
        num_workers=num_workers,
        read_threads=read_threads,
    )
    per_step = batch_size * (1 if unlabeled is None else 3)
    it = iter(ds)
    try:
        t0 = time.perf_counter()
        next(it)  # worker start-up and first batch
        warmup = time.perf_counter() - t0
        steps, cpu0, t0 = 0, _cpu_seconds(), time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            next(it)
            steps += 1
        cpu1 = _cpu_seconds()
    finally:
        if hasattr(it, "close"):
            it.close()
    # Examples per CPU-second (all processes) is the per-core rate, robust to a shared machine.
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "workers": num_workers,
        "examples_per_s": steps * per_step / elapsed,
        "steps_per_s": steps / elapsed,
        "examples_per_cpu_s": float("nan") if not cpu else steps * per_step / cpu,
        "cpu_per_wall": float("nan") if cpu is None else cpu / elapsed,
        "warmup_s": warmup,
    }


def _resolve() -> dict[str, Any]:
    """Settings from the config (if any), overridden by explicitly given flags."""
    s = {
        "dataset": FLAGS.dataset,
        "data_dir": FLAGS.data_dir,
        "split": FLAGS.split,
        "crop": FLAGS.crop,
        "batch": FLAGS.batch,
        "scales": augment.TRAIN_SCALES,
        "seed": FLAGS.seed,
    }
    config = _CONFIG.value if _CONFIG is not None else None
    if config is not None:
        given = {name for name in FLAGS if FLAGS[name].present}
        from_config = {
            "dataset": config.get("dataset"),
            "data_dir": config.get("data_dir"),
            "split": config.get("train_split"),
            "crop": config.get("crop_size"),
            "batch": config.get("batch_size"),
            "scales": config.get("scales"),
            "seed": config.get("seed"),
        }
        for key, value in from_config.items():
            flag = {"crop": "crop", "batch": "batch"}.get(key, key)
            if value not in (None, "") and flag not in given:
                s[key] = tuple(value) if key == "scales" else value
    if isinstance(s["crop"], (tuple, list)):
        s["crop"] = tuple(int(c) for c in s["crop"])
    return s


def main(argv: list[str]) -> None:
    del argv
    s = _resolve()
    if FLAGS.fake or not s["dataset"]:
        h, w = (int(v) for v in FLAGS.fake_size.lower().split("x"))
        source = FakeJpegSource(FLAGS.fake_count, (h, w), seed=0)
        what = f"fake {h}x{w} JPEG/PNG decoded per access ({len(source)} distinct)"
    else:
        from mgd_jax.data import sources

        source = sources.open_split(s["dataset"], s["split"], os.path.expanduser(s["data_dir"]))
        what = f"{s['dataset']}:{s['split']} ({len(source)} examples) from {s['data_dir']}"
    unlabeled = None if FLAGS.labeled_only else source
    print(f"data: {what}")
    print(
        f"crop {s['crop']}, batch {s['batch']} per stream, scales {tuple(s['scales'])}, "
        f"{'labeled only' if unlabeled is None else 'labeled + 2 unlabeled streams + CutMix'}, "
        f"read_threads {FLAGS.read_threads}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'workers':>7} {'examples/s':>11} {'per worker':>11} {'steps/s':>8} "
        f"{'per CPU-s':>10} {'CPUs busy':>9} {'warm-up s':>9}"
    )
    for k in (int(v) for v in FLAGS.workers.split(",") if v.strip()):
        r = measure(
            source,
            unlabeled,
            num_workers=k,
            batch_size=s["batch"],
            crop_size=s["crop"],
            scales=tuple(s["scales"]),
            seconds=FLAGS.seconds,
            read_threads=FLAGS.read_threads,
            seed=s["seed"],
        )
        per = r["examples_per_s"] / max(k, 1)
        print(
            f"{k:>7} {r['examples_per_s']:>11.1f} {per:>11.1f} {r['steps_per_s']:>8.2f} "
            f"{r['examples_per_cpu_s']:>10.1f} {r['cpu_per_wall']:>9.2f} {r['warmup_s']:>9.1f}",
            flush=True,
        )


if __name__ == "__main__":  # required: grain workers are spawned and re-import the main module
    app.run(main)
