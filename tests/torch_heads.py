"""The PyTorch reference networks of the parity tests: they live in the package
(`mgd_jax.pytorch.nets`, also the PyTorch side of the step benchmark)."""

from conftest import need

need("torch", "torchvision", "timm")  # skips the test that imports this module where missing

from mgd_jax.pytorch.nets import (  # noqa: E402, F401
    ASPP,
    Head,
    SegNet,
    dilate_mobilenet,
    dilate_resnet,
    mobilenet_features,
    nostride_dilate,
    randomize_,
    resnet_features,
)
