"""PyTorch weights -> Flax variables: the naming rule, conversion, partial merges and a report.

A PyTorch state dict (official MGD-SSSS / TorchSemiSeg CPS checkpoints, torchvision / timm /
TorchSemiSeg-v1c ImageNet backbones) becomes the `{"params": ..., "batch_stats": ...}` of
`mgd_jax.models.build(backbone, num_classes, **options)`. Nothing here knows individual layers: a
key maps to a model leaf by the models' mechanical naming rule (split on "."; a numeric component
is glued onto the previous one with "_"; weight -> kernel | scale, bias -> bias, running_mean /
running_var -> batch_stats mean / var), and the expected shapes come from `jax.eval_shape` of the
model's init (no compile). Conv weights are transposed OIHW -> HWIO (depthwise included:
(C, 1, kh, kw) -> (kh, kw, 1, C)).

Keys the segmentation model never uses (BN step counters, ImageNet classifiers, MobileNetV2's
features.18, a torchvision 7x7 stem conv offered to a deep-stem ResNet) are skipped and reported.
Anything else that does not fit -- an unexpected key, a missing key, a shape mismatch -- is a
`WeightImportError` naming the key and both shapes. `import_file` writes the result as a network
directory (`mgd_jax.network_dir`). Files are read without torch (`weight_files`: .safetensors, .npz,
torch.save's zip format); torch is imported only for what that reader cannot read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mgd_jax import models, network_dir
from mgd_jax.pytorch import weight_files
from mgd_jax.runtime.errors import WeightImportError

logger = logging.getLogger(__name__)

Variables = dict[str, Any]
Path = tuple[str, ...]

_ABSTRACT_INPUT = (1, 64, 64, 3)  # any size works: parameter shapes do not depend on it
_MAX_LISTED = 25  # problems listed per kind in an error message

# torch leaf name -> (collection, flax leaf); "weight" is "kernel" (conv) or "scale" (BN).
_LEAF_TO_FLAX = {
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_FLAX_TO_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var"}

# Keys a segmentation model never has, skipped (never an error) when the model has no such leaf.
# Matched against the model-relative key ("backbone.fc.weight", after prefix / part handling).
_KNOWN_UNUSED: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)num_batches_tracked$"), "BatchNorm step counter"),
    (re.compile(r"^backbone\.fc\.(weight|bias)$"), "ImageNet classification layer (fc)"),
    (re.compile(r"^backbone\.classifier\.\d+\.(weight|bias)$"),
     "MobileNetV2 ImageNet classifier"),
    (re.compile(r"^backbone\.features\.18\."),
     "MobileNetV2 features.18 (1x1 conv 320->1280): the segmentation backbone ends at features.17"),
)
_DEEP_STEM_SKIP = (
    "7x7 stem conv of a torchvision ResNet: the deep stem has no counterpart and stays "
    "initialised (the official strict=False load drops it)"
)


def flax_path(torch_key: str) -> tuple[Path, str]:
    """Module path and torch leaf name of a state-dict key, by the mechanical naming rule.

    >>> flax_path("backbone.features.1.conv.0.0.weight")
    (('backbone', 'features_1', 'conv_0_0'), 'weight')
    """
    *parts, leaf = torch_key.split(".")
    names: list[str] = []
    for part in parts:
        if part.isdigit() and names:
            names[-1] = f"{names[-1]}_{part}"
        else:
            names.append(part)
    return tuple(names), leaf


def torch_key(path: Path) -> str:
    """The state-dict key of a flat variables path ("params", module..., leaf) (inverse rule)."""
    _, *modules, leaf = path
    names = [re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in modules]
    return ".".join([*names, _FLAX_TO_LEAF.get(leaf, leaf)])


def _leaf_str(path: Path) -> str:
    return "/".join(path)


# ----------------------------------------------------------------------------------------------
# Model shapes


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


@functools.lru_cache(maxsize=16)
def _abstract_cached(backbone: str, num_classes: int, options: tuple) -> dict[Path, Any]:
    model = models.build(backbone, num_classes, **dict(options))
    images = jax.ShapeDtypeStruct(_ABSTRACT_INPUT, jnp.float32)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images
    )
    shapes = {c: shapes[c] for c in ("params", "batch_stats") if c in shapes}
    return traverse_util.flatten_dict(network_dir.plain(shapes))


def abstract_variables(backbone: str, num_classes: int, **build_options: Any) -> dict[Path, Any]:
    """Flat {(collection, module..., leaf): ShapeDtypeStruct} of the model (eval_shape only)."""
    options = tuple(sorted((k, _hashable(v)) for k, v in build_options.items()))
    return dict(_abstract_cached(backbone, int(num_classes), options))


# ----------------------------------------------------------------------------------------------
# State-dict handling


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor (torch is never imported here)
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _unwrap(checkpoint: Any, source: str) -> Mapping[str, Any]:
    """The state dict inside a checkpoint: {"model": sd, ...}, {"state_dict": sd, ...} or bare."""
    if not isinstance(checkpoint, Mapping):
        raise WeightImportError(
            f"{source}: expected a state dict (a mapping of names to tensors), got "
            f"{type(checkpoint).__name__}"
        )
    if checkpoint and all(_is_array(v) for v in checkpoint.values()):
        return checkpoint
    for wrapper in ("model", "state_dict"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap(inner, f"{source}[{wrapper!r}]")
    non_arrays = sorted(str(k) for k, v in checkpoint.items() if not _is_array(v))
    raise WeightImportError(
        f"{source}: not a state dict: entries {non_arrays[:10]} are not tensors and there is no "
        f"'model' or 'state_dict' entry holding one"
    )


def _strip_module(keys: Sequence[str]) -> bool:
    """True when every key carries the DistributedDataParallel 'module.' prefix."""
    return bool(keys) and all(k.startswith("module.") for k in keys)


@dataclasses.dataclass
class ImportReport:
    """What an import did. Keys are state-dict keys relative to `prefix`; leaves are
    "params/backbone/conv1_0/kernel"-style model paths."""

    backbone: str
    num_classes: int | None
    source: str = "<state dict>"
    prefix: str = ""
    part: str = "model"  # "model" (backbone + head + classifier) or "backbone"
    loaded: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> model leaf
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
    ignored: int = 0  # keys outside `prefix` / outside the selected part
    missing: list[str] = dataclasses.field(default_factory=list)  # part's leaves not in the file
    # Model leaves that kept their `into` value (set by a merge; head + classifier for a backbone).
    initialised: list[str] = dataclasses.field(default_factory=list)
    source_file: weight_files.Digest | None = None  # the file as read (import_file)

    def summary(self) -> str:
        where = f"{self.source}" + (f" [prefix {self.prefix!r}]" if self.prefix else "")
        lines = [
            f"{where} -> {self.backbone} ({self.part}): loaded {len(self.loaded)} tensors, "
            f"skipped {len(self.skipped)}, ignored {self.ignored} outside the selection, "
            f"{len(self.missing)} model leaves not in the file"
            + (f", {len(self.initialised)} left initialised" if self.initialised else "")
        ]
        if self.source_file is not None:
            lines.append(f"read {self.source_file.size} bytes, sha256 {self.source_file.sha256} "
                         "(recorded in meta.json; compare with docs/weights.md)")
        if self.skipped:
            lines.append("skipped (known unused):")
            counters = [k for k in self.skipped if k.endswith("num_batches_tracked")]
            if counters:
                lines.append(f"  {len(counters)} x *.num_batches_tracked: BatchNorm step counter")
            lines += [
                f"  {k}: {why}" for k, why in sorted(self.skipped.items()) if k not in counters
            ]
        not_loaded = self.initialised or self.missing
        if not_loaded:
            label = "initialised" if self.initialised else "not in the file"
            lines.append(f"{label} (by module):")
            lines += [f"  {m}" for m in _group_modules(not_loaded)]
        return "\n".join(lines)


def _group_modules(leaves: Sequence[str]) -> list[str]:
    """Leaves grouped by their module, the head and classifier collapsed: compact listing."""
    groups: dict[str, int] = {}
    for leaf in leaves:
        parts = leaf.split("/")
        if len(parts) > 2 and parts[1] in ("head", "classifier"):
            module = parts[1]
        else:
            module = "/".join(parts[1:-1])
        groups[module] = groups.get(module, 0) + 1
    return [f"{m} ({n} leaves)" for m, n in sorted(groups.items())]


def _select(
    state_dict: Mapping[str, Any], prefix: str, part: str, source: str
) -> tuple[dict[str, Any], str, int]:
    """Model-relative keys (prefix / 'module.' stripped; 'backbone.' added for a backbone file)."""
    keys = [str(k) for k in state_dict]
    if _strip_module(keys):
        state_dict = {str(k)[len("module."):]: v for k, v in state_dict.items()}
        keys = list(state_dict)
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        if prefix.startswith("module.") and not any(k.startswith(prefix) for k in keys):
            prefix = prefix[len("module."):]
        selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not selected:
            tops = sorted({k.split(".")[0] for k in keys})
            raise WeightImportError(
                f"{source}: no key starts with prefix {prefix!r}; top-level names: {tops[:20]}"
            )
    else:
        selected = {str(k): v for k, v in state_dict.items()}
    ignored = len(state_dict) - len(selected)

    has_backbone = any(k.startswith("backbone.") for k in selected)
    if part == "auto":
        if not has_backbone:
            networks = sorted({k.split(".backbone.")[0] for k in selected if ".backbone." in k})
            if networks:
                raise WeightImportError(
                    f"{source}: the checkpoint holds several networks {networks}; choose one with "
                    f"prefix= (e.g. prefix={networks[0]!r})"
                )
        part = "model" if has_backbone else "backbone"
    if part == "model":
        if not has_backbone:
            raise WeightImportError(
                f"{source}: part='model' but no key starts with 'backbone.' (a backbone-only "
                f"file? use part='backbone' / --backbone_only)"
            )
        return selected, part, ignored
    if part != "backbone":
        raise WeightImportError(f"part must be 'auto', 'model' or 'backbone', got {part!r}")
    if has_backbone:  # the backbone of a full segmentation checkpoint
        chosen = {k: v for k, v in selected.items() if k.startswith("backbone.")}
        return chosen, part, ignored + len(selected) - len(chosen)
    return {f"backbone.{k}": v for k, v in selected.items()}, part, ignored


def _kernel_layout(array: np.ndarray) -> np.ndarray:
    """torch conv OIHW -> HWIO (depthwise (C,1,kh,kw) -> (kh,kw,1,C)); Linear (O,I) -> (I,O)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _skip_reason(key: str, part: str, expected: Mapping[Path, Any]) -> str | None:
    for pattern, reason in _KNOWN_UNUSED:
        if pattern.search(key):
            return reason
    if (
        part == "backbone"
        and key == "backbone.conv1.weight"
        and ("params", "backbone", "conv1_0", "kernel") in expected
    ):
        return _DEEP_STEM_SKIP
    return None


def convert(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    backbone: str,
    num_classes: int,
    *,
    prefix: str = "",
    part: str = "auto",
    source: str = "<state dict>",
    require_complete: bool = False,
    **build_options: Any,
) -> tuple[Variables, ImportReport]:
    """The leaves a state dict provides, as a (possibly partial) variables tree, plus a report.

    `part`: "model" (keys backbone./head./classifier.), "backbone" (ImageNet backbone files, or
    only the backbone of a full checkpoint) or "auto" (full model iff some key starts with
    "backbone."). Raises `WeightImportError` listing every unexpected / mis-shaped key (and every
    missing one when `require_complete`). A file path is read with `load_torch_file`.
    """
    if isinstance(state_dict, str | os.PathLike):
        source = str(state_dict) if source == "<state dict>" else source
        state_dict = load_torch_file(str(state_dict))
    state_dict = _unwrap(state_dict, source)
    selected, part, ignored = _select(state_dict, prefix, part, source)
    expected = abstract_variables(backbone, num_classes, **build_options)
    scope = "" if part == "model" else "backbone"
    in_scope = {p: s for p, s in expected.items() if not scope or p[1] == scope}
    report = ImportReport(
        backbone=backbone,
        num_classes=num_classes if part == "model" else None,
        source=source,
        prefix=prefix,
        part=part,
        ignored=ignored,
    )

    flat: dict[Path, np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in selected.items():
        modules, leaf = flax_path(key)
        if leaf == "weight":
            kind = "kernel" if ("params", *modules, "kernel") in in_scope else "scale"
            path = ("params", *modules, kind)
        elif leaf in _LEAF_TO_FLAX:
            collection, name = _LEAF_TO_FLAX[leaf]
            path = (collection, *modules, name)
        else:
            path = ("params", *modules, leaf)
        if path not in in_scope:
            reason = _skip_reason(key, part, expected)
            if reason is None:
                unexpected.append(key)
            else:
                report.skipped[key] = reason
            continue
        if not _is_array(value):
            mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        array = _to_numpy(value)
        want = in_scope[path]
        if array.ndim != len(want.shape) or _kernel_layout(array).shape != tuple(want.shape):
            mismatched.append(
                f"{key}: checkpoint shape {tuple(array.shape)}, model expects "
                f"{_torch_layout(tuple(want.shape))} (leaf {_leaf_str(path)} {tuple(want.shape)})"
            )
            continue
        flat[path] = np.asarray(_kernel_layout(array), dtype=want.dtype)
        report.loaded[key] = _leaf_str(path)

    missing = [p for p in in_scope if p not in flat]
    report.missing = [_leaf_str(p) for p in missing]
    if unexpected or mismatched or (require_complete and missing):
        raise WeightImportError(
            _problems_message(
                report, unexpected, mismatched, missing if require_complete else [], selected,
                build_options,
            )
        )
    for key, why in sorted(report.skipped.items()):
        logger.info("%s: skipped %s (%s)", source, key, why)
    variables = traverse_util.unflatten_dict(flat) if flat else {}
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables, report


def _listing(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    more = f" (first {_MAX_LISTED})" if len(items) > _MAX_LISTED else ""
    return [f"{len(items)} {title}{more}:"] + [f"  {i}" for i in items[:_MAX_LISTED]]


def _problems_message(
    report: ImportReport,
    unexpected: list[str],
    mismatched: list[str],
    missing: list[Path],
    selected: Mapping[str, Any],
    build_options: Mapping[str, Any],
) -> str:
    where = report.source + (f" [prefix {report.prefix!r}]" if report.prefix else "")
    lines = [f"{where} does not fit {report.backbone} ({report.part}, "
             f"num_classes={report.num_classes}, options {dict(build_options)}):"]
    lines += _listing("mis-shaped keys", mismatched)
    lines += _listing("unexpected keys", unexpected)
    lines += _listing(
        "missing keys",
        [f"{torch_key(p)} (leaf {_leaf_str(p)})" for p in missing],
    )
    if missing and not unexpected and not mismatched:
        lines.append("(a partial import needs into=<initial variables>)")
    head = selected.get("classifier.weight")
    if report.part == "model" and head is not None and _is_array(head):
        n = int(head.shape[0])
        if n != report.num_classes:
            lines.append(
                f"hint: the checkpoint's classifier has {n} classes, the model was built with "
                f"num_classes={report.num_classes}"
            )
    backbone_problems = any(k.startswith("backbone.") for k in unexpected + mismatched)
    guess = _guess_backbone(report, selected, build_options) if backbone_problems else None
    if guess:
        lines.append(f"hint: these weights fit backbone {guess!r}, not {report.backbone!r}")
    return "\n".join(lines)


def _guess_backbone(
    report: ImportReport, selected: Mapping[str, Any], build_options: Mapping[str, Any]
) -> str | None:
    """Another backbone whose model takes every non-skipped backbone key with the right shape."""
    keys = {k: v for k, v in selected.items() if k.startswith("backbone.") and _is_array(v)}
    if not keys:
        return None
    for candidate in ("resnet18", "resnet101", "wide_resnet50_2", "mobilenet_v2"):
        if candidate == report.backbone:
            continue
        try:
            expected = abstract_variables(candidate, report.num_classes or 21, **build_options)
        except Exception:  # options that backbone does not take, etc.: no guess from it
            continue
        shapes = {torch_key(p): tuple(s.shape) for p, s in expected.items()}
        fits = 0
        for key, value in keys.items():
            flax_shape = _kernel_layout(np.empty(value.shape, np.bool_)).shape
            if key in shapes and flax_shape == shapes[key]:
                fits += 1
            elif key in shapes or _skip_reason(key, report.part, expected) is None:
                break
        else:
            if fits:
                return candidate
    return None


def from_torch(
    state_dict: Mapping[str, Any] | str | os.PathLike,
    backbone: str,
    num_classes: int,
    prefix: str = "",
    into: Mapping[str, Any] | None = None,
    *,
    part: str = "auto",
    return_report: bool = False,
    source: str = "<state dict>",
    **build_options: Any,
) -> Variables | tuple[Variables, ImportReport]:
    """Full-model variables `{"params", "batch_stats"}` from a PyTorch state dict.

    Args:
      state_dict: name -> tensor (torch tensors or numpy arrays); official checkpoints
        ({"model": ...}, {"state_dict": ...}, "module."-prefixed) are unwrapped. A path to a
        .pth / .pth.tar / .npz file is read with `load_torch_file` (weights only).
      backbone, num_classes, **build_options: the model, as for `mgd_jax.models.build`.
      prefix: one network of a multi-network checkpoint ("branch1" == "branch1."); keys outside it
        are ignored.
      into: initial variables of the same model. Without it the state dict must cover the whole
        model; with it, leaves the file lacks keep their `into` values (the official
        `strict=False` partial load, e.g. an ImageNet backbone into a fresh model).
      part: "auto" | "model" | "backbone" (see `convert`).
      return_report: also return the `ImportReport` (`report.initialised` lists the leaves that
        kept their `into` value, `report.skipped` the known-unused keys).
    """
    if into is None and part == "backbone":
        raise WeightImportError(
            f"{source}: part='backbone' imports only the backbone; pass into=<initial variables> "
            f"(or use convert() for the backbone-only tree)"
        )
    partial, report = convert(
        state_dict, backbone, num_classes, prefix=prefix, part=part, source=source,
        require_complete=into is None, **build_options,
    )
    if into is None:
        variables = {"params": partial["params"], "batch_stats": partial["batch_stats"]}
    else:
        into = network_dir.plain(into)
        _check_into(into, backbone, num_classes, build_options, source)
        variables, report.initialised = network_dir.merge_variables(
            {"params": into["params"], "batch_stats": into.get("batch_stats", {})},
            partial, source=source,
        )
        if report.initialised:
            logger.info("%s: %d model leaves stay initialised: %s", source,
                        len(report.initialised), ", ".join(_group_modules(report.initialised)))
    return (variables, report) if return_report else variables


def _check_into(
    into: Mapping[str, Any], backbone: str, num_classes: int, options: Mapping[str, Any],
    source: str,
) -> None:
    expected = abstract_variables(backbone, num_classes, **options)
    got = traverse_util.flatten_dict(
        {c: into[c] for c in ("params", "batch_stats") if c in into}
    )
    bad = sorted(set(expected) ^ set(got))
    bad += [p for p in expected if p in got and tuple(np.shape(got[p])) != expected[p].shape]
    if bad:
        raise WeightImportError(
            f"{source}: into= is not the variables of {backbone} (num_classes={num_classes}, "
            f"options {dict(options)}); differing leaves: "
            + ", ".join(_leaf_str(p) for p in bad[:_MAX_LISTED])
        )


def load_torch_file(path: str, *, allow_pickle: bool = False) -> Mapping[str, Any]:
    """The object in a weight file, tensors as numpy arrays (or torch tensors where torch read it).

    `.safetensors`, `.npz` and `torch.save`'s zip format (`.pth`, `.pth.tar`) are read without
    torch (`weight_files`; a `.pth` pickle is unpickled with an allow-list of the tensor rebuild
    functions only). What that reader cannot read -- the legacy pre-1.6 format, torch's newer
    dtypes, pickled objects -- goes to torch's `weights_only` loader when torch is installed.
    `allow_pickle=True` loads a trusted file that pickles other Python objects (needs torch).
    """
    from etils import epath

    file = epath.Path(path)
    if not file.is_file():
        raise WeightImportError(f"{path}: no such file")
    if not allow_pickle:
        try:
            return weight_files.read(path)
        except weight_files.NeedsTorch as e:
            reason = e
    else:
        reason = None
    try:
        import torch
    except ImportError as e:
        raise WeightImportError(
            f"{reason}. Reading it needs torch (pip install 'mgd_jax[torch]')" if reason else
            f"{path}: allow_pickle needs torch (pip install 'mgd_jax[torch]')"
        ) from e
    import pickle

    try:
        with file.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise WeightImportError(f"{path}: corrupt pickle ({e})") from e
        raise WeightImportError(
            f"{reason}; if you trust the file, load it with allow_pickle=True (--allow_pickle). "
            f"(torch: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip ("failed finding central directory"), EOFError, ...
        raise WeightImportError(
            f"{path}: cannot read the PyTorch file (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def import_file(
    torch_file: str, backbone: str, out: str, *, num_classes: int = 21, prefix: str = "",
    backbone_only: bool = False, allow_pickle: bool = False, overwrite: bool = False,
    **build_options: Any,
) -> ImportReport:
    """Converts a PyTorch file and writes it as a network directory (`network_dir.save_network`)."""
    part = "backbone" if backbone_only else "model"
    read = weight_files.digest(torch_file)  # recorded: the file can be compared afterwards
    checkpoint = load_torch_file(torch_file, allow_pickle=allow_pickle)
    variables, report = convert(
        checkpoint, backbone, num_classes, prefix=prefix, part=part, source=torch_file,
        require_complete=not backbone_only, **build_options,
    )
    meta = {
        "backbone": backbone,
        "num_classes": report.num_classes,
        "build_options": build_options,
        "part": report.part,
        "source": torch_file,
        "source_bytes": read.size,
        "source_sha256": read.sha256,
        "prefix": prefix,
        "skipped": sorted(report.skipped),
        "missing": report.missing,
    }
    network_dir.save_network(out, variables, meta, overwrite=overwrite)
    report.source_file = read
    return report
