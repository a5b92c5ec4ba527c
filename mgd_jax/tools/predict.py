r"""Prediction: images -> palette PNG class maps and overlays (`predict.predict_files`).

    mgd-predict --checkpoint=DIR --input=IMG_OR_DIR [--input=...] \
        --output=OUT [--mode=sliding|whole] [--crop=512] [--pad_to=H,W] [--bucket=128] \
        [--batch=1] [--flip] [--scales=0.75,1,1.25]

`DIR` is a network directory, a training workdir or a checkpoint folder in one (`--step` as in
mgd-eval). The protocol (mode, crop, stride_rate, pad_to) defaults to the one the network's
meta records (e.g. Cityscapes: sliding 800 px windows on 1024x2048); flags override it. Writes
`OUT/labels/<name>.png`, `OUT/overlays/<name>.jpg` (unless --nooverlay) and
`OUT/predict_report.json`. The exit status is 1 when any input failed (each is named).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import models, network_dir
from mgd_jax.evaluation import evaluate
from mgd_jax.runtime.errors import UserError
from mgd_jax.serving import predict
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A network directory or training workdir.",
                                  flag_values=FLAGS)
_STEP = flags.DEFINE_string("step", None, "For a workdir: latest | best | a step number.",
                            flag_values=FLAGS)
_INPUT = flags.DEFINE_multi_string("input", None, "Image files and/or directories (repeatable).",
                                   flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.", flag_values=FLAGS)
_FROM_META = " Default: the evaluation protocol the network's meta records, else "
_MODE = flags.DEFINE_enum(
    "mode", None, evaluate.MODES, "sliding: the official evaluator (one padded forward when "
    "the image fits the crop, else summed windows); whole: one forward per image." + _FROM_META
    + "sliding.", flag_values=FLAGS,
)
_CROP = flags.DEFINE_integer("crop", None, "Crop / window size." + _FROM_META + "512.",
                             flag_values=FLAGS)
_STRIDE = flags.DEFINE_float("stride_rate", None, "Window stride / crop." + _FROM_META + "2/3.",
                             flag_values=FLAGS)
_PAD_TO = flags.DEFINE_list("pad_to", None, "Fixed canvas H,W for images that fit it "
                            "(e.g. 1024,2048)." + _FROM_META + "none.", flag_values=FLAGS)
_BUCKET = flags.DEFINE_integer("bucket", 128, "Other canvases: the image size rounded up to this "
                               "multiple.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 1, "Images per forward (per canvas).", flag_values=FLAGS)
_FLIP = flags.DEFINE_bool("flip", False, "TTA: add the flipped prediction.", flag_values=FLAGS)
_SCALES = flags.DEFINE_list("scales", ["1"], "TTA scales, e.g. 0.75,1,1.25.", flag_values=FLAGS)
_WINDOWS = flags.DEFINE_integer("windows_per_call", None, "Sliding windows per network call "
                                "(less memory).", flag_values=FLAGS)
_PRECISION = flags.DEFINE_enum("precision", "auto", models.PRECISIONS, "Compute precision.",
                               flag_values=FLAGS)
_DATASET = flags.DEFINE_string("dataset", None, "Palette of this dataset (voc | cityscapes | "
                               "synthetic); default: the palette the network's meta records, "
                               "else by class count.", flag_values=FLAGS)
_OVERLAY = flags.DEFINE_bool("overlay", True, "Also write overlays.", flag_values=FLAGS)
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Overlay opacity of the colours.", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "input", "output"], flag_values=FLAGS)


def _pad_to(values: list[str] | None) -> tuple[int, int] | None:
    if not values:
        return None
    try:
        sizes = [int(v) for v in values] * (2 if len(values) == 1 else 1)
    except ValueError:
        sizes = []
    if len(sizes) != 2 or min(sizes) < 1:
        raise UserError(f"--pad_to={','.join(values)}: expected H,W or N")
    return sizes[0], sizes[1]


def _predict() -> int:
    network = network_dir.load_network(_CHECKPOINT.value, step=cli.parse_step(_STEP.value),
                                       precision=_PRECISION.value)
    print(f"network: {network.describe()}", flush=True)
    given = {"mode": _MODE.value, "crop": _CROP.value, "stride_rate": _STRIDE.value,
             "pad_to": _pad_to(_PAD_TO.value)}
    used = predict.protocol(network, **given)
    source = "the network's meta" if network.meta.get("eval") else "the defaults"
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in used.items())
          + f" (flags given: {sorted(k for k, v in given.items() if v is not None) or 'none'};"
          f" the rest from {source})", flush=True)
    report = predict.predict_files(
        network, _INPUT.value, _OUTPUT.value, dataset=_DATASET.value, overlay=_OVERLAY.value,
        alpha=_ALPHA.value, **used, bucket=_BUCKET.value, batch_size=_BATCH.value,
        flip=_FLIP.value, scales=cli.parse_floats("scales", _SCALES.value),
        windows_per_call=_WINDOWS.value,
    )
    print(f"wrote {len(report.written)} prediction(s) to {_OUTPUT.value}"
          f" ({predict.REPORT_FILE} lists them)")
    if report.failed:
        print(f"{len(report.failed)} input(s) FAILED:", file=sys.stderr)
        for failure in report.failed:
            print(f"  {failure['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _predict)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
