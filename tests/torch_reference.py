"""The PyTorch reference stack for parity tests (the `[torch]` extra). Import torch /
torchvision / timm from here: `mgd_jax.pytorch.nets` imports them (with the torchvision shim)."""

from mgd_jax.pytorch.nets import timm, torch, torchvision

__all__ = ["torch", "torchvision", "timm"]
