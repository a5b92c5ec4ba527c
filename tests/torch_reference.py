"""The PyTorch reference stack for parity tests (test extra only).

torchvision 0.28 is built against a CUDA torch; beside the CPU torch it only imports after its two
compiled-operator schemas are defined. Models are unaffected.
Import torch / torchvision / timm from here.
"""

import torch

_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402
import torchvision  # noqa: E402

__all__ = ["torch", "torchvision", "timm"]
