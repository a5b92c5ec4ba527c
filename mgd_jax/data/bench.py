"""Input-pipeline throughput: fully augmented training examples per second, per worker count.

One example = one augmented crop (labeled or unlabeled); an MGD step consumes 3 per batch slot
(labeled, unlabeled_0, unlabeled_1), so steps/s = examples/s / (3 * batch). The command line is
`mgd-bench data`. `FakeJpegSource` synthesises VOC-sized images in
memory, stored as JPEG (images) and PNG (labels) and decoded on every access like a real source,
so the bench runs anywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from mgd_jax.data import augment, input_pipeline
from mgd_jax.data.datasets import IGNORE_INDEX


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
            lbl[edges] = IGNORE_INDEX  # VOC-style 255 boundaries
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
    ds = input_pipeline.train_dataset(
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


def run(source: Any, *, workers: Sequence[int], batch_size: int,
        crop_size: int | tuple[int, int], scales: tuple[float, ...] = augment.TRAIN_SCALES,
        seconds: float = 15.0, read_threads: int = 1, labeled_only: bool = False,
        seed: int = 0, description: str = "") -> list[dict[str, float]]:
    """Measures `source` (as labeled and unlabeled streams) for each worker count; prints a
    table and returns its rows."""
    unlabeled = None if labeled_only else source
    print(f"data: {description or source!r}")
    print(
        f"crop {crop_size}, batch {batch_size} per stream, scales {tuple(scales)}, "
        f"{'labeled only' if unlabeled is None else 'labeled + 2 unlabeled streams + CutMix'}, "
        f"read_threads {read_threads}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'workers':>7} {'examples/s':>11} {'per worker':>11} {'steps/s':>8} "
        f"{'per CPU-s':>10} {'CPUs busy':>9} {'warm-up s':>9}"
    )
    rows = []
    for k in workers:
        r = measure(source, unlabeled, num_workers=k, batch_size=batch_size,
                    crop_size=crop_size, scales=tuple(scales), seconds=seconds,
                    read_threads=read_threads, seed=seed)
        per = r["examples_per_s"] / max(k, 1)
        print(
            f"{k:>7} {r['examples_per_s']:>11.1f} {per:>11.1f} {r['steps_per_s']:>8.2f} "
            f"{r['examples_per_cpu_s']:>10.1f} {r['cpu_per_wall']:>9.2f} {r['warmup_s']:>9.1f}",
            flush=True,
        )
        rows.append(r)
    return rows
