r"""Weight import: a PyTorch file -> a network directory (`importer.import_file`).

    # an official MGD / CPS checkpoint: choose the network with --prefix (CPS files hold branch1
    # and branch2; the official MGD loader uses branch1)
    mgd-import --backbone=resnet101 --torch=teacher-voc8-resnet101.pth \
        --prefix=branch1 --num_classes=21 --output=/ckpt/teacher_deep
    # an ImageNet backbone, for --config.student_init / --config.cps.init
    mgd-import --backbone=resnet18 --torch=resnet18-f37072fd.pth \
        --backbone_only --output=/ckpt/resnet18_imagenet
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from mgd_jax import models
from mgd_jax.pytorch import importer
from mgd_jax.tools import cli

FLAGS = flags.FlagValues()
_BACKBONE = flags.DEFINE_string(
    "backbone", None, f"One of {models.BACKBONES + tuple(models.ALIASES)}.", flag_values=FLAGS
)
_TORCH = flags.DEFINE_string("torch", None, ".pth / .pth.tar file (or .npz of arrays).",
                             flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "The network directory to write.",
                              flag_values=FLAGS)
_PREFIX = flags.DEFINE_string("prefix", "", "Network of a multi-network checkpoint (branch1).",
                              flag_values=FLAGS)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 21, "Classes of the segmentation head.",
                                    flag_values=FLAGS)
_BACKBONE_ONLY = flags.DEFINE_bool(
    "backbone_only", False, "Import only the backbone (an ImageNet file, or a full checkpoint's "
    "backbone).", flag_values=FLAGS,
)
_WIDTH = flags.DEFINE_float("width", None, "models.build width (reduced networks).",
                            flag_values=FLAGS)
_DEPTHS = flags.DEFINE_string("depths", None, "models.build depths, comma-separated.",
                              flag_values=FLAGS)
_OUTPUT_STRIDE = flags.DEFINE_integer("output_stride", None, "models.build output stride.",
                                      flag_values=FLAGS)
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "Load a trusted .pth that pickles non-tensor objects.",
    flag_values=FLAGS,
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.",
                               flag_values=FLAGS)
flags.mark_flags_as_required(["backbone", "torch", "output"], flag_values=FLAGS)


def _import() -> None:
    options = {}
    if _WIDTH.value is not None:
        options["width"] = _WIDTH.value
    if _DEPTHS.value:
        options["depths"] = models.parse_depths(_DEPTHS.value)
    if _OUTPUT_STRIDE.value is not None:
        options["output_stride"] = _OUTPUT_STRIDE.value
    report = importer.import_file(
        _TORCH.value, _BACKBONE.value, _OUTPUT.value, num_classes=_NUM_CLASSES.value,
        prefix=_PREFIX.value, backbone_only=_BACKBONE_ONLY.value,
        allow_pickle=_ALLOW_PICKLE.value, overwrite=_OVERWRITE.value, **options,
    )
    print(report.summary())
    if report.part == "backbone":
        print("head and classifier: not in a backbone checkpoint (the trainer initialises them)")
    print(f"wrote {_OUTPUT.value}")


def main(argv: Sequence[str]) -> int:
    return cli.run(FLAGS, argv, _import)


run = cli.entry(main)

if __name__ == "__main__":
    sys.exit(run())
