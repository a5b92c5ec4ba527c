"""Segmentation networks (DeepLabv3+ on ResNet / MobileNetV2 backbones) in flax.linen, NHWC."""
