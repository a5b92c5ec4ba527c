"""The PyTorch reference stack for parity tests (the `[torch]` extra). Import torch /
torchvision / timm from here: `mgd_jax.pytorch.nets` imports them (with the torchvision shim)."""

from conftest import need

need("torch", "torchvision", "timm")  # skips the test that imports this module where missing

from mgd_jax.pytorch.nets import timm, torch, torchvision  # noqa: E402

__all__ = ["torch", "torchvision", "timm"]
