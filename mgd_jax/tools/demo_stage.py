"""One demo stage in a process of its own (`demo.parallel_stages`), started by the demo:
`python -m mgd_jax.tools.demo_stage --stage_dir=DIR` trains the pickled stage config the demo left
in DIR. Exit status 0 (trained), `demo.STOPPED_EXIT` (stopped by a signal, with its checkpoint) or
2 (a user error, one `error:` line)."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import train
from mgd_jax.tools import cli
from mgd_jax.workflows import demo

FLAGS = flags.FlagValues()
_STAGE_DIR = flags.DEFINE_string("stage_dir", None, "The stage's workdir.", flag_values=FLAGS)
flags.mark_flags_as_required(["stage_dir"], flag_values=FLAGS)


def _train_stage() -> int:
    with open(os.path.join(_STAGE_DIR.value, demo.STAGE_CONFIG_FILE), "rb") as f:
        config = pickle.load(f)
    result = train.train_and_evaluate(config, _STAGE_DIR.value)
    return demo.STOPPED_EXIT if result.get("stopped") else 0


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _train_stage)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
