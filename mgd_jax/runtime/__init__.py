"""What every run stands on: devices and meshes, checkpoints, logs, reports, paths, errors."""
