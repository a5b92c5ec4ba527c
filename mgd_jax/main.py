"""Command line entry: `python -m mgd_jax.main --config=configs/voc.py:method=mgd --workdir=DIR`.

Flags only; everything else happens in `train.train_and_evaluate` (or, for the demo config, in
`demo.run`, which calls it once per stage).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':key=value,...' arguments.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, results).")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
    """Multi-host init only where asked for (TPU pods, multi-process GPU); never on Colab/CPU."""
    import jax

    if os.environ.get("MGD_JAX_DISTRIBUTED", "0") == "1":
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _maybe_initialize_distributed()
    import jax

    from mgd_jax import demo, train

    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    # A persistent compilation cache (in the workdir unless JAX_COMPILATION_CACHE_DIR says
    # otherwise) makes reruns and resumed runs start fast.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.default_backend())
    config = _CONFIG.value
    if "stages" in config:
        demo.run(config, workdir)
    else:
        train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
