"""Training: `python -m mgd_jax.main --config=configs/voc.py:method=mgd --workdir=DIR` (or
`mgd-train` with the same flags).

This file is kept short on purpose: everything happens in `train.train_and_evaluate(config,
workdir)` (which Colab calls directly), or, for the demo config, in `demo.run`, which calls it once
per stage. Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from mgd_jax import train
from mgd_jax.runtime import paths
from mgd_jax.tools import cli
from mgd_jax.workflows import demo

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':key=value,...' arguments.",
    flag_values=FLAGS, lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, logs, results).", flag_values=FLAGS
)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _train() -> None:
    workdir = paths.resolve(_WORKDIR.value)  # a local folder or a URL (gs://bucket/run)
    # A persistent compilation cache (in the workdir unless JAX_COMPILATION_CACHE_DIR says
    # otherwise) makes reruns and resumed runs start fast.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(workdir / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = _CONFIG.value
    if "stages" in config:
        demo.run(config, str(workdir))
    else:
        train.train_and_evaluate(config, workdir)


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _train, distributed=True)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
