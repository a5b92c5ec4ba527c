"""The project's network directory: a segmentation network saved with what it takes to use it.

    <dir>/meta.json     backbone, num_classes, build options, provenance ("format": FORMAT)
    <dir>/variables/    {"params", "batch_stats"} (orbax), with a hash manifest (`integrity`)

Training writes one as `<workdir>/export` (the final network) and `<workdir>/export_best`; the CPS
teacher stage's export is what MGD loads as a teacher; `mgd-import` (`mgd_jax.tools.import_weights`)
writes one from a PyTorch file (a full network, or a backbone for ImageNet init). `load_network`
opens a network directory, or a training workdir (its export/, or a train-state checkpoint at a
step, also while the run is still training).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from mgd_jax import models
from mgd_jax.data import augment
from mgd_jax.data.datasets import DatasetInfo
from mgd_jax.runtime import checkpoint, integrity, paths
from mgd_jax.runtime.errors import ExportError

Variables = dict[str, Any]

FORMAT = "mgd_jax.variables"
# 1: backbone, num_classes, build_options and provenance. 2 adds "input" (always), and "dataset"
# and "eval" (the trainer's exports). Version 1 directories still load (without those).
FORMAT_VERSION = 2
VARIABLES_DIR = "variables"
META_FILE = "meta.json"
NETWORK_FILE = "network.json"  # in a workdir: the meta of the network the run trains
BUILD_OPTIONS = ("width", "depths", "output_stride", "bn_group_size")


def plain(tree: Any) -> Any:
    """Nested Mappings (dict, FrozenDict) -> nested dicts."""
    if isinstance(tree, Mapping):
        return {str(k): plain(v) for k, v in tree.items()}
    return tree


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:  # a dtype or scalar type (jnp.float32, np.dtype("bfloat16"), ...)
        return np.dtype(value).name
    except TypeError:
        pass
    raise ExportError(
        f"meta value {value!r} ({type(value).__name__}) is not JSON-serialisable"
    )


# What every network of the project takes: uint8 RGB NHWC images, normalised on the device as
# (x / 255 - mean) / std, with 0 on padding (data/augment.py).
INPUT = {"layout": "NHWC", "channel_order": "RGB", "dtype": "uint8", "scale": 1 / 255,
         "mean": list(augment.MEAN), "std": list(augment.STD), "padding": 0.0}
EVAL_FIELDS = ("mode", "crop", "pad_to", "stride_rate")  # of a config's `eval` block


def run_meta(dataset: str, info: DatasetInfo, eval_config: Mapping[str, Any]) -> dict[str, Any]:
    """The meta a trained network carries about its data: the dataset (name, class names,
    palette, ignore label) and the evaluation protocol it was selected with."""
    return {
        "dataset": {"name": dataset, "class_names": list(info.class_names),
                    "palette": [list(c) for c in info.palette],
                    "ignore_index": int(info.ignore_index)},
        "eval": {k: _jsonable(eval_config[k]) for k in EVAL_FIELDS},
    }


def save_network(
    directory: str, variables: Mapping[str, Any], meta: Mapping[str, Any], *,
    overwrite: bool = False,
) -> None:
    """Writes a network directory: `<directory>/variables` (orbax) and `<directory>/meta.json`.

    `variables` is `{"params", "batch_stats"}` (a backbone checkpoint may hold only the backbone
    subtree); `meta` needs at least "backbone" and "num_classes", plus "build_options" (the
    `models.build` keyword arguments) and any provenance ("source", "prefix", "part", ...).
    """
    import orbax.checkpoint as ocp

    variables = plain(variables)
    if "params" not in variables:
        raise ExportError(f"{directory}: variables need a 'params' collection, got "
                                f"{sorted(variables)}")
    for field in ("backbone", "num_classes"):
        if field not in meta:
            raise ExportError(f"{directory}: meta needs {field!r}, got {sorted(meta)}")
    meta = {"build_options": {}, "input": INPUT, **_jsonable(meta), "format": FORMAT,
            "version": FORMAT_VERSION}
    tree = {c: variables.get(c, {}) for c in ("params", "batch_stats")}
    tree = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)

    root = epath.Path(directory)
    exists = root.exists()  # every process decides before anyone writes
    if exists and not overwrite:
        raise ExportError(f"{directory}: already exists (pass overwrite=True)")
    _sync("mgd_jax.network_dir.save:checked")
    primary = jax.process_index() == 0
    if primary:  # multi-host: one process owns the directory and meta.json
        if exists:
            root.rmtree()
        root.mkdir(parents=True)
    _sync("mgd_jax.network_dir.save:created")
    with ocp.StandardCheckpointer() as checkpointer:  # collective; numpy leaves: primary writes
        checkpointer.save(root / VARIABLES_DIR, tree)
        checkpointer.wait_until_finished()
    if primary:  # meta.json last: its presence marks a complete checkpoint.
        integrity.seal(root / VARIABLES_DIR)
        (root / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _sync("mgd_jax.network_dir.save:done")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_variables(directory: str) -> tuple[Variables, dict[str, Any]]:
    """(variables, meta) of a network directory; leaves are numpy arrays."""
    import orbax.checkpoint as ocp

    root = epath.Path(directory)
    what = "a network directory (meta.json + variables/)"
    if not root.is_dir():
        raise ExportError(f"{directory}: no such directory; expected {what}")
    meta_file = root / META_FILE
    if not meta_file.exists() or not (root / VARIABLES_DIR).exists():
        raise ExportError(
            f"{directory}: not {what} (or an unfinished write); it holds "
            f"{sorted(p.name for p in root.iterdir())[:10]}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{meta_file}: invalid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("version"), int) or not 1 <= meta["version"] <= FORMAT_VERSION:
        raise ExportError(f"{meta_file}: format version {meta.get('version')!r}; this mgd_jax "
                          f"reads versions 1 to {FORMAT_VERSION} (a newer one wrote it?)")
    problem = integrity.damage(root / VARIABLES_DIR)
    if problem is not None:
        raise ExportError(f"{directory}: damaged network directory: {problem}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(root / VARIABLES_DIR)
    except Exception as e:
        raise ExportError(f"{directory}/{VARIABLES_DIR}: cannot restore ({e})") from e
    tree = plain(tree)
    variables = {c: tree.get(c, {}) for c in ("params", "batch_stats")}
    variables = jax.tree.map(np.asarray, variables)
    return variables, meta


def network_options(meta: Mapping[str, Any], directory: str = "") -> dict[str, Any]:
    """The `models.build` keyword options a checkpoint's meta.json records."""
    options = dict(meta.get("build_options") or {})
    if options.get("depths") is not None:
        options["depths"] = tuple(int(d) for d in options["depths"])
    unknown = set(options) - set(BUILD_OPTIONS)
    if unknown:
        raise ExportError(f"{directory}/meta.json: unknown build_options {sorted(unknown)}")
    return options


def merge_variables(
    into: Mapping[str, Any], partial: Mapping[str, Any], *, source: str = "<partial variables>"
) -> tuple[Variables, list[str]]:
    """`into` with the leaves `partial` provides replaced (cast to `into`'s dtype).

    Returns (merged, initialised): `initialised` lists the leaves of `into` that kept their value.
    A leaf of `partial` that `into` lacks, or a shape mismatch, is a `ExportError`.
    """
    base = traverse_util.flatten_dict(plain(into))
    new = traverse_util.flatten_dict(plain(partial))
    problems = []
    for path, value in new.items():
        if path not in base:
            problems.append(f"{'/'.join(path)}: not in the model")
        elif tuple(np.shape(value)) != tuple(np.shape(base[path])):
            problems.append(
                f"{'/'.join(path)}: shape {tuple(np.shape(value))}, the model has "
                f"{tuple(np.shape(base[path]))}"
            )
    if problems:
        raise ExportError(
            "\n".join([f"{source}: cannot merge into the initial variables:"]
                      + [f"  {p}" for p in problems[:25]])
        )
    merged = dict(base)
    for path, value in new.items():
        merged[path] = np.asarray(value, dtype=np.dtype(base[path].dtype))
    initialised = ['/'.join(p) for p in base if p not in new]
    return traverse_util.unflatten_dict(merged), initialised




# ----------------------------------------------------------------------------------------------
# Networks


@dataclasses.dataclass
class Network:
    """A segmentation network ready to apply: `model.apply(variables, images, train=False)`."""

    model: Any
    variables: Variables  # {"params", "batch_stats"} (numpy leaves)
    meta: dict[str, Any]
    directory: str  # where it was loaded from
    step: int | None = None  # the train-state step, when loaded from a checkpoint

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def describe(self) -> str:
        options = self.meta.get("build_options") or {}
        extra = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
        extra = f", {extra}" if extra else ""
        at = f" at step {self.step}" if self.step is not None else ""
        return (f"{self.meta['backbone']} ({self.num_classes} classes{extra}) from "
                f"{self.directory}{at}")


def build_network(variables: Variables, meta: Mapping[str, Any], directory: str, *,
                  precision: str = "auto", step: int | None = None) -> Network:
    """The `Network` of variables and their meta (a full segmentation network, not a backbone)."""
    for field in ("backbone", "num_classes"):
        if meta.get(field) is None:
            raise ExportError(f"{directory}: the network meta lacks {field!r}")
    if meta.get("part") == "backbone" or not variables.get("params", {}).get("classifier"):
        raise ExportError(
            f"{directory}: holds only a backbone (an ImageNet init), not a segmentation network"
        )
    model = models.build(meta["backbone"], int(meta["num_classes"]),
                         dtype=models.compute_dtype(precision),
                         **network_options(meta, directory))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return Network(model, variables, dict(meta), directory, step)


def is_network_dir(path: str | os.PathLike) -> bool:
    root = epath.Path(path)
    return (root / META_FILE).exists() and (root / VARIABLES_DIR).exists()


def locate(path: str, step: int | str | None = None) -> tuple[epath.Path, int | str | None]:
    """(directory, step) of what `path` names: a network directory or a workdir as given, or,
    for a checkpoint folder inside a workdir (`checkpoints`, `checkpoints/<step>`,
    `checkpoints/best[/<step>]`), the workdir and that step."""
    root = paths.resolve(path)
    parts = [root.name, root.parent.name, root.parent.parent.name]
    if parts[0] == checkpoint.CHECKPOINTS_DIR:
        found: tuple[epath.Path, int | str | None] = (root.parent, step)
    elif parts[0] == checkpoint.BEST_DIR and parts[1] == checkpoint.CHECKPOINTS_DIR:
        found = (root.parent.parent, "best")
    elif parts[0].isdigit() and checkpoint.CHECKPOINTS_DIR in parts[1:]:
        workdir = root.parent.parent if parts[1] == checkpoint.CHECKPOINTS_DIR else (
            root.parent.parent.parent)
        found = (workdir, int(parts[0]))
    else:
        return root, step
    if not (found[0] / NETWORK_FILE).exists():  # not inside a training workdir after all
        return root, step
    if step is not None and found[1] != step:
        raise ExportError(f"{path}: names step {found[1]!r}, but step={step!r} was asked for")
    return found


def load_network(path: str, *, step: int | str | None = None,
                 precision: str = "auto") -> Network:
    """The network at `path`: a network directory, a training workdir, or a checkpoint folder
    inside a workdir (`<workdir>/checkpoints/<step>`, `.../checkpoints/best`).

    For a workdir, `step` chooses: None = its `export/` when training has finished, else the
    latest train-state checkpoint; "latest", "best" or a step number = that checkpoint. A run
    that is still training (or was killed) is read the same way.
    precision: "auto" (bfloat16 compute on GPU/TPU, float32 on CPU), "float32" or "bfloat16".
    """
    root, step = locate(path, step)
    if not root.is_dir():
        raise ExportError(f"{path}: no such directory")
    if is_network_dir(root):
        if step is not None:
            raise ExportError(f"{path}: a network directory has no steps (step={step!r})")
        variables, meta = load_variables(str(root))
        return build_network(variables, meta, str(root), precision=precision)
    if step is None and is_network_dir(root / "export"):
        variables, meta = load_variables(str(root / "export"))
        return build_network(variables, meta, str(root / "export"), precision=precision)
    if (root / NETWORK_FILE).exists():
        meta = json.loads((root / NETWORK_FILE).read_text())
        found, state = checkpoint.restore_raw(str(root), "latest" if step is None else step)
        params, stats = state["params"], state.get("batch_stats", {})
        for key in meta.get("state_path", []):
            params, stats = params[key], stats.get(key, {})
        variables = jax.tree.map(np.asarray, {"params": params, "batch_stats": stats})
        return build_network(variables, meta, str(root), precision=precision, step=found)
    exports = sorted(str(p.parent.relative_to(root)) for p in root.glob(f"*/export/{META_FILE}"))
    hint = f" Exports found in its sub-folders: {', '.join(exports)}." if exports else ""
    raise ExportError(
        f"{path}: neither a network directory ({META_FILE} + {VARIABLES_DIR}/) nor a training "
        f"workdir ({NETWORK_FILE} + checkpoints/).{hint}"
    )
