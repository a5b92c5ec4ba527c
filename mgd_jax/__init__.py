"""mgd_jax: Multi-Granularity Distillation for lightweight semi-supervised segmentation."""

__version__ = "0.1.0"
