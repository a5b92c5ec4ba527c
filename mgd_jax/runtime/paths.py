"""Workdir paths: one abstraction (`etils.epath`, which orbax and tfds use too) for local folders
and cloud storage URLs (`gs://bucket/run`), so everything written into a workdir lands there.

Objects on cloud storage cannot be appended to: the writers of growing files (`logs.LogFile`,
`reporting.MetricsFile`) rewrite them whole (`is_remote`).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (`gs://...`, `s3://...`) rather than a local path."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path with `~` expanded and made absolute
    (a later change of the working directory does not move it)."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
