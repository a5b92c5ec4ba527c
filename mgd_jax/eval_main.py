"""Evaluates a trained network on the config's val split with the config's protocol.

    python -m mgd_jax.eval_main --config=configs/voc.py --checkpoint=DIR \
        [--flip] [--scales=0.75,1,1.25] [--workdir=OUT] [--config.eval.max_examples=100]
    python -m mgd_jax.eval_main --checkpoint=TRAINING_WORKDIR      # its config.json + export/

`DIR` is an `mgd_jax.weights` checkpoint (`<workdir>/export` written at the end of training, or an
imported official PyTorch checkpoint) or a training workdir (its `export/`; without `--config` its
`config.json` gives the dataset and protocol). The protocol is the config's `eval` block, as
during training (`train.make_eval_step` / `train.run_evaluation`, every host taking part): VOC
pads each image centred to 512x512 and takes one forward; Cityscapes runs 800 px sliding windows
with summed logits. `--flip` / `--scales` add test-time augmentation, off in the official
protocol; the output says when they were used.

Prints mIoU, pixel accuracy and the per-class IoU table, and writes
`<workdir>/eval_<split>[_flip][_ms<scales>].json` (default workdir: the `--checkpoint` directory).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mgd_jax import evaluate, metrics, parallel, predict, train
from mgd_jax.data import sources, streams

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
    """Defined only when run as a program, so that importing this module (tests, notebooks)
    never clashes with another entry point's --config / --workdir flags."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file with ':key=value,...' arguments (default: the training "
        "workdir's config.json when --checkpoint is a workdir).", lock_config=True,
    )
    _FLAGS["checkpoint"] = flags.DEFINE_string(
        "checkpoint", None, "mgd_jax.weights checkpoint dir, or a training workdir (uses export/)."
    )
    _FLAGS["flip"] = flags.DEFINE_bool(
        "flip", None, "TTA: add the flipped prediction (default: config.eval.flip)."
    )
    _FLAGS["scales"] = flags.DEFINE_list(
        "scales", ["1"], "TTA: sum the predictions at these scales."
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Where the JSON goes (default: the --checkpoint directory)."
    )


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """The training config a workdir recorded (`<workdir>/config.json`)."""
    path = Path(os.path.expanduser(workdir)) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; pass --config (the config the network was trained with)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _class_names(source: Any, config: ml_collections.ConfigDict) -> list[str]:
    info = getattr(source, "info", None) or getattr(getattr(source, "source", None), "info", None)
    if info is None:
        try:
            info = sources.resolve(config.dataset)[0]
        except sources.DataError:
            info = None
    if info is not None and len(info.class_names) == config.num_classes:
        return list(info.class_names)
    return [f"class_{i}" for i in range(config.num_classes)]


def protocol_text(config: ml_collections.ConfigDict, flip: bool, scales: Sequence[float]) -> str:
    e = config.eval
    pad = "x".join(str(int(v)) for v in e.pad_to)
    if e.mode == "whole":
        base = f"whole image padded to {pad}, one forward"
    else:
        base = (f"sliding {e.crop} px windows (stride ceil({e.crop} x {e.stride_rate:.3g})), "
                f"summed logits, images padded to {pad}")
    tta = []
    if flip:
        tta.append("flip")
    if tuple(scales) != (1.0,):
        tta.append("scales " + ",".join(f"{s:g}" for s in scales))
    return base + ("; TTA: " + " + ".join(tta) if tta else "; single scale, no flip")


def output_name(split: str, flip: bool, scales: Sequence[float]) -> str:
    name = f"eval_{split}"
    if flip:
        name += "_flip"
    if tuple(scales) != (1.0,):
        name += "_ms" + "-".join(f"{s:g}" for s in scales)
    return name + ".json"


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    *,
    flip: bool | None = None,
    scales: Sequence[float] = (1.0,),
    source: Any = None,
    output_dir: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluates `checkpoint` on the config's eval split (or on `source`, any random-access
    sequence of {"image", "label"} dicts); returns the scores and writes them as JSON under
    `output_dir` (default: the checkpoint directory; process 0 only)."""
    config = copy.deepcopy(config)
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"--scales={scales}: expected positive numbers, e.g. 0.75,1,1.25")
    with config.unlocked():
        if flip is not None:
            config.eval.flip = bool(flip)
        config.eval.scales = scales
    if config.eval.mode not in evaluate.MODES:
        raise ValueError(f"config.eval.mode={config.eval.mode!r}: expected one of {evaluate.MODES}")
    for field, value in (("eval.batch_size", config.eval.batch_size),):
        if value % jax.device_count():
            raise ValueError(f"config.{field}={value} is not divisible by the "
                             f"{jax.device_count()} devices")

    network = predict.load_network(checkpoint, precision=config.precision)
    if network.num_classes != config.num_classes:
        raise ValueError(
            f"{network.directory}: the network has {network.num_classes} classes, "
            f"config.num_classes is {config.num_classes} ({config.dataset})"
        )
    if source is None:
        source = streams.eval_source(config)
    class_names = _class_names(source, config)
    is_main = jax.process_index() == 0
    say = print if (verbose and is_main) else (lambda *a, **k: None)
    say(f"network: {network.describe()}", flush=True)
    say(f"data: {config.dataset} {config.eval_split}, {len(source)} images", flush=True)
    protocol = protocol_text(config, config.eval.flip, scales)
    say(f"protocol: {protocol}", flush=True)

    mesh = parallel.make_mesh()
    variables = parallel.replicate(network.variables, mesh)
    step = train.make_eval_step(network.model, config)
    t0 = time.time()
    confusion = train.run_evaluation(step, variables, streams.eval_batches(config, source), mesh)
    seconds = time.time() - t0
    scores = metrics.scores(confusion)

    say(metrics.format_table(scores, class_names), flush=True)
    result = {
        "checkpoint": network.directory,
        "network": {k: network.meta.get(k) for k in ("backbone", "num_classes", "build_options",
                                                      "source")},
        "dataset": config.dataset,
        "split": config.eval_split,
        "num_images": len(source),
        "protocol": protocol,
        "mode": config.eval.mode,
        "pad_to": [int(v) for v in config.eval.pad_to],
        "crop": int(config.eval.crop),
        "tta": {"flip": bool(config.eval.flip), "scales": list(scales)},
        "miou": _num(scores["miou"]),
        "pixel_accuracy": _num(scores["pixel_accuracy"]),
        "mean_accuracy": _num(scores["mean_accuracy"]),
        "iou_per_class": {n: _num(v) for n, v in zip(class_names, scores["iou_per_class"],
                                                      strict=True)},
        "confusion": np.asarray(confusion, np.int64).tolist(),
        "seconds": seconds,
    }
    out_dir = output_dir or (checkpoint if os.path.isdir(os.path.expanduser(checkpoint))
                             else network.directory)
    path = os.path.join(os.path.expanduser(out_dir), output_name(config.eval_split,
                                                                 config.eval.flip, scales))
    if is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        say(f"mIoU {100 * scores['miou']:.2f}  pixel accuracy "
            f"{100 * scores['pixel_accuracy']:.2f}  ({len(source)} images, {seconds:.1f} s) "
            f"-> {path}", flush=True)
    result["json"] = path
    return result


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if os.environ.get("MGD_JAX_DISTRIBUTED", "0") == "1":  # as in mgd_jax.main
        jax.distributed.initialize()
    checkpoint = _FLAGS["checkpoint"].value
    if not checkpoint:
        raise app.UsageError("--checkpoint is required")
    config = _FLAGS["config"].value
    if config is None:
        try:
            config = config_from_workdir(checkpoint)
        except FileNotFoundError as e:
            raise app.UsageError(str(e)) from e
    try:
        scales = [float(s) for s in _FLAGS["scales"].value]
    except ValueError as e:
        raise app.UsageError(f"--scales={','.join(_FLAGS['scales'].value)}: {e}") from e
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.default_backend())
    try:
        evaluate_checkpoint(config, checkpoint, flip=_FLAGS["flip"].value, scales=scales,
                            output_dir=_FLAGS["workdir"].value)
    except (FileNotFoundError, ValueError) as e:  # incl. DataError, WeightImportError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
