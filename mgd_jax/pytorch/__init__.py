"""PyTorch interop: weight files, state-dict conversion, the PyTorch networks and step."""
