"""Hash manifests: damaged checkpoint or network files are detected before they are read.

Orbax keeps no checksums, and a flipped byte in an array file restores silently as a wrong value.
After a directory is completely written, `seal(directory)` records the size and SHA-256 of every
file in `<directory>/mgd_manifest.json`; `damage(directory)` compares them again. A directory
without a manifest (older runs, or a kill between orbax's commit and the seal) is not judged here.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from etils import epath

MANIFEST = "mgd_manifest.json"
_CHUNK = 1 << 22


def _files(root: epath.Path, prefix: str = "") -> dict[str, epath.Path]:
    """{relative name: path} of the files under `root` (epath has no recursive glob on gs://)."""
    found = {}
    for path in sorted(root.iterdir()):
        if path.is_dir():
            found.update(_files(path, f"{prefix}{path.name}/"))
        elif path.name != MANIFEST and not path.name.startswith(f".{MANIFEST}"):
            found[prefix + path.name] = path
    return found


def _digest(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(directory: str | os.PathLike) -> dict[str, Any]:
    """{relative file: [size, sha256]} of every file under `directory` but the manifest."""
    return {name: [path.stat().length, _digest(path)]
            for name, path in _files(epath.Path(directory)).items()}


def is_sealed(directory: str | os.PathLike) -> bool:
    return (epath.Path(directory) / MANIFEST).exists()


def seal(directory: str | os.PathLike) -> None:
    """Writes the manifest of a completely written `directory` (atomically: a reader sees the
    whole manifest or none)."""
    root = epath.Path(directory)
    text = json.dumps({"files": manifest_of(root)}, indent=1)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    tmp.rename(root / MANIFEST)


def damage(directory: str | os.PathLike) -> str | None:
    """None when `directory` matches its manifest (or has none), else what is wrong with it,
    naming the first damaged file."""
    root = epath.Path(directory)
    manifest_file = root / MANIFEST
    if not root.is_dir():
        return f"{root} is missing"
    if not manifest_file.exists():
        return None
    try:
        recorded = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_file} is unreadable ({e})"
    present = _files(root)
    for name, (size, digest) in sorted(recorded.items()):
        path = root / name
        if name not in present:
            return f"{path} is missing"
        if present[name].stat().length != size:
            return f"{path} has {present[name].stat().length} bytes, {size} were written"
        if _digest(path) != digest:
            return f"{path} does not match its SHA-256 (flipped bytes?)"
    return None
