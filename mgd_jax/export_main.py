"""Export: a trained network (a workdir's checkpoint at a step, or any network directory) written
as a network directory that eval_main / predict_main and other runs load.

    python -m mgd_jax.export_main --checkpoint=WORKDIR --step=best --output=DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import cli, export

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir or network directory.",
                                  flag_values=FLAGS)
_STEP = flags.DEFINE_string("step", None, "For a workdir: latest | best | a step number.",
                            flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "The network directory to write.",
                              flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.",
                               flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "output"], flag_values=FLAGS)


def _export() -> None:
    network = export.load_network(_CHECKPOINT.value, step=cli.parse_step(_STEP.value))
    export.save_network(_OUTPUT.value, network.variables,
                        dict(network.meta, source=network.directory, step=network.step),
                        overwrite=_OVERWRITE.value)
    print(f"{network.describe()} -> {_OUTPUT.value}")


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _export)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
