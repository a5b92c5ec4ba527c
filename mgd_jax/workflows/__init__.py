"""Runs made of runs: the synthetic demo, hyper-parameter grids, the step benchmark."""
