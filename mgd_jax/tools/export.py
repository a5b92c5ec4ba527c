"""Export: a trained network (a workdir's checkpoint at a step, or any network directory) written
as a network directory that mgd-eval / mgd-predict and other runs load, or as deployable files
(`deploy`: serialized StableHLO and/or ONNX, runnable without this project).

    mgd-export --checkpoint=WORKDIR --step=best --output=DIR
    mgd-export --checkpoint=RUN --format=jax,onnx --sizes=512x512 --output=DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import network_dir
from mgd_jax.serving import deploy
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir or network directory.",
                                  flag_values=FLAGS)
_STEP = flags.DEFINE_string("step", None, "For a workdir: latest | best | a step number.",
                            flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "The network directory to write.",
                              flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.",
                               flag_values=FLAGS)
_FORMAT = flags.DEFINE_list("format", ["network"], "network (a network directory), or the "
                            f"deployable formats, any of {','.join(deploy.FORMATS)}.",
                            flag_values=FLAGS)
_SIZES = flags.DEFINE_string("sizes", "512x512", "Deployable formats: the input sizes, "
                             "HEIGHTxWIDTH,... (one file each).", flag_values=FLAGS)
_PLATFORMS = flags.DEFINE_list("platforms", list(deploy.PLATFORMS), "jax format: the platforms "
                               "the StableHLO is lowered for.", flag_values=FLAGS)
_PRECISION = flags.DEFINE_enum("precision", "float32", ("float32", "bfloat16"), "Deployable "
                               "formats: the compute dtype (onnx: float32 only).",
                               flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "output"], flag_values=FLAGS)


def _deployable() -> None:
    network = network_dir.load_network(_CHECKPOINT.value, step=cli.parse_step(_STEP.value),
                                       precision=_PRECISION.value)
    manifest = deploy.export_deployable(
        network, _OUTPUT.value, sizes=deploy.parse_sizes(_SIZES.value), formats=_FORMAT.value,
        platforms=_PLATFORMS.value, overwrite=_OVERWRITE.value)
    files = [f for by_size in manifest["files"].values() for f in by_size.values()]
    print(f"{network.describe()} -> {_OUTPUT.value}: {', '.join(files)}")


def _export() -> None:
    if _FORMAT.value != ["network"]:
        if "network" in _FORMAT.value:
            raise cli.UserError("--format: a network directory and deployable files go to "
                                "different --output directories; export them one at a time")
        return _deployable()
    network = network_dir.load_network(_CHECKPOINT.value, step=cli.parse_step(_STEP.value))
    network_dir.save_network(_OUTPUT.value, network.variables,
                             dict(network.meta, source=network.directory, step=network.step),
                             overwrite=_OVERWRITE.value)
    print(f"{network.describe()} -> {_OUTPUT.value}")


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _export)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
