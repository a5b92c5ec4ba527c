"""Using a trained network: prediction on images, deployable exports (StableHLO, ONNX)."""
