r"""Evaluation: a trained network on the config's val split, with the config's protocol.

    mgd-eval --checkpoint=WORKDIR            # its export/, or latest checkpoint
    mgd-eval --checkpoint=WORKDIR --step=best  # or latest, or a step number
    mgd-eval --checkpoint=NETWORK_DIR --config=configs/voc.py \
        [--flip] [--scales=0.75,1,1.25] [--output=DIR] [--config.eval.max_examples=100]

Without --config the workdir's `config.json` gives the dataset and protocol. Prints mIoU, pixel
accuracy and the per-class IoU table, and writes `eval_<split>[_flip][_ms<scales>].json`
(`evaluate.evaluate_network`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from mgd_jax import config_lib
from mgd_jax.evaluation import evaluate
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with ':key=value,...' arguments (default: the training "
    "workdir's config.json).", flag_values=FLAGS, lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A network directory, or a training workdir.", flag_values=FLAGS
)
_STEP = flags.DEFINE_string(
    "step", None, "For a workdir: latest | best | a step number (default: export/ if the run "
    "has finished, else the latest checkpoint).", flag_values=FLAGS,
)
_FLIP = flags.DEFINE_bool(
    "flip", None, "TTA: add the flipped prediction (default: config.eval.flip).",
    flag_values=FLAGS,
)
_SCALES = flags.DEFINE_list("scales", ["1"], "TTA: sum the predictions at these scales.",
                            flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where the JSON goes (default: --checkpoint).", flag_values=FLAGS
)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)


def _evaluate() -> None:
    config = _CONFIG.value or config_lib.load_workdir_config(_CHECKPOINT.value)
    evaluate.evaluate_checkpoint(config, _CHECKPOINT.value, step=cli.parse_step(_STEP.value),
                                 flip=_FLIP.value,
                                 scales=cli.parse_floats("scales", _SCALES.value),
                                 output_dir=_OUTPUT.value)


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _evaluate, distributed=True)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
