"""Shared config fields, `key=value` argument parsing and validation.

Every file under `configs/` builds on `base_config()`; the numbers there are the official recipe's
(docs/method.md §4), each commented with its origin. `validate(config)` runs before anything
compiles and names the offending field; the option lists it checks against live with the code
that implements them (methods, models, evaluation, input pipeline).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from mgd_jax import methods, models
from mgd_jax.runtime import parallel, paths
from mgd_jax.runtime.errors import ConfigError

if TYPE_CHECKING:
    from mgd_jax.data import datasets

# CPS per-partition epochs (TorchSemiSeg docs/getting_started.md); the 1/8 values equal MGD's
# own configs (docs/method.md §4.2). Partitions other than 1/8 are our documented choice.
VOC_EPOCHS = {16: 32, 8: 34, 4: 40, 2: 60}
CITYSCAPES_EPOCHS = {16: 128, 8: 137, 4: 160, 2: 240}


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses big_vision-style `key=value,flag,...` strings into a ConfigDict.

    Values are converted to the type of the default; a bare key sets a boolean True; a tuple
    default takes a list, whose further items follow as bare values (`seeds=0,1,2`). Unknown keys
    are an error naming the key and the accepted ones.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    listing = None  # the tuple-valued key whose items are being read
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep and listing is not None and key not in defaults:
            result[listing] += (_convert(listing, key, defaults[listing][0]),)
            continue
        if key not in defaults:
            raise ConfigError(
                f"config argument {key!r} is unknown; accepted: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        listing = key if isinstance(default, tuple) else None
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
            result[key] = True
        elif listing is not None:
            result[key] = (_convert(key, value, default[0]),)
        else:
            result[key] = _convert(key, value, default)
    return result


def _convert(key: str, value: str, default: Any) -> Any:
    """A config argument's text as the type of its default."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"config argument {key}={value!r}: expected true/false")
        return value.lower() in ("true", "1")
    try:
        return type(default)(value)
    except ValueError:
        raise ConfigError(
            f"config argument {key}={value!r}: expected a {type(default).__name__}"
        ) from None


def iters_per_epoch(num_train: int, partition: int, batch_size: int) -> int:
    """The official `niters_per_epoch = max(N // r, N - N // r) // batch_size` (§4.2)."""
    labeled = num_train // partition
    return max(labeled, num_train - labeled) // batch_size


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every dataset config; dataset files override what differs."""
    c = ml_collections.ConfigDict()
    c.method = "mgd"  # supervised | cps | mgd
    c.seed = 0
    _data_fields(c)
    _schedule_fields(c)
    _network_fields(c)
    _loss_fields(c)
    _eval_fields(c)
    _loop_fields(c)
    return c


def _data_fields(c: ml_collections.ConfigDict) -> None:
    """The dataset, its partition and the input pipeline."""
    c.dataset = ""  # tfds builder name: mgd_voc_aug | mgd_cityscapes | mgd_synthetic
    c.data_dir = os.path.expanduser("~/tensorflow_datasets")
    c.train_split = "train"
    c.eval_split = "val"
    c.num_classes = 0
    c.partition = 8  # 1/partition of the train split is labeled
    # "lists": the standard CPS/MGD partitions (comparable with the literature): built in, or the
    # list files in `split_dir`;
    # "seeded": a seeded random partition of the train split (logged as such).
    c.partition_source = "lists"
    c.split_dir = ""  # a folder of split lists; "" = the built-in VOC / Cityscapes partitions
    c.labeled_count = 0  # seeded partitions only: an exact labeled count instead of 1/partition
    c.crop_size = 512
    c.scales = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)  # TrainPre scale set (§4.4; no 1.25)
    # Unlabeled u0/u1 orders: "independent" (two random orders), or "official" (§4.4: u0[i], u1[i]
    # one image, two augmentations; one fixed order): the default of configs/voc.py, cityscapes.py
    c.pairing = "independent"
    c.num_workers = 0  # grain worker processes (0 = in-process)
    c.prefetch = 2  # batches on the devices ahead of the step (1 = none ahead); resume stays exact


def _schedule_fields(c: ml_collections.ConfigDict) -> None:
    """The batch, the number of steps and the optimiser (§4.1)."""
    c.batch_size = 8  # GLOBAL labeled batch; the same number of u0 and of u1 images per step
    # The recipe's per-replica (per-GPU) batch. Per-GPU quantities of the official code are defined
    # through this, never through the live device count: the semantic-sensitive sum, OHEM's
    # min_kept and MobileNetV2's unsynchronised backbone BN.
    c.replica_batch = 2
    c.num_epochs = 34
    c.num_train_steps = -1  # > 0 overrides the epoch arithmetic
    c.lr = 0.0025  # effective peak lr (§4.1)
    c.weight_decay = 4e-4  # effective weight decay on conv kernels (§4.1: W x 1e-4)
    c.momentum = 0.9  # torch.optim.SGD momentum (§4.1)
    c.lr_power = 0.9  # poly power, per iteration, no warmup (§4.1)


def _network_fields(c: ml_collections.ConfigDict) -> None:
    """The student, the teachers and the CPS branches."""
    # The network `supervised` / `mgd` train: the official students are resnet18 and
    # mobilenet_v2; a teacher backbone also trains (the demo pre-trains its teachers this way).
    c.student = "resnet18"
    # A network directory whose backbone starts the student: an imported ImageNet backbone or a
    # trained network of the architecture ("" = random)
    c.student_init = ""
    c.model = ml_collections.ConfigDict()
    c.model.width = 1.0  # channel multiplier (1.0 = the official networks)
    c.model.depths = ""  # e.g. "1,1,1,1" blocks per stage ("" = the official depths)
    c.model.output_stride = 0  # 0 = the backbone's official output stride
    c.precision = "auto"  # auto = bfloat16 compute on GPU/TPU, float32 on CPU

    c.teacher_deep = ml_collections.ConfigDict()  # T_D: feeds L_I and L_P
    c.teacher_deep.backbone = "resnet101"
    c.teacher_deep.checkpoint = ""  # network directory (a CPS run's export/ or an imported .pth)
    c.teacher_deep.width = 1.0
    c.teacher_deep.depths = ""
    c.teacher_wide = ml_collections.ConfigDict()  # T_W: feeds L_R and L_P
    c.teacher_wide.backbone = "wide_resnet50_2"
    c.teacher_wide.checkpoint = ""
    c.teacher_wide.width = 1.0
    c.teacher_wide.depths = ""
    c.teacher_bn = "batch"  # official: teachers in train mode, batch statistics (§1.2)
    c.evaluate_teachers = True  # mgd: evaluate each loaded teacher on val at the start

    c.cps = ml_collections.ConfigDict()  # the teacher stage
    c.cps.backbone = "resnet101"
    c.cps.init = ""  # the backbone for both branches (as student_init)
    c.cps.weight = 1.0  # cps_weight (VOC 1, Cityscapes 5; §2.4)
    # Steps of a sigmoid ramp-up of cps.weight; 0 = the official full weight from step 0 (its
    # networks start from ImageNet weights: from random weights the early pseudo-labels are noise)
    c.cps.weight_rampup = 0


def _loss_fields(c: ml_collections.ConfigDict) -> None:
    """The loss terms and their weights."""
    c.loss = ml_collections.ConfigDict()
    c.loss.supervised = True  # L_sup
    c.loss.consistency_unlabeled = True  # L_P on mixed unlabeled images (both teachers)
    c.loss.consistency_labeled = True  # L_P on labeled images (both teachers)
    c.loss.image = True  # L_I, semantic-sensitive, vs T_D on mixed images
    c.loss.region = True  # L_R, content-aware, vs T_W on mixed images
    c.loss.pixel_teachers = "both"  # L_P's teachers: both (official) | deep | wide (ablation)
    c.loss.lambda_image = 0.002  # λ1, VOC ResNet-18 (exp.voc/voc8.resnet18 config.py)
    c.loss.lambda_region = 100.0  # λ2, VOC ResNet-18
    c.loss.region_grid = 7  # H_v = W_v = 7 (adaptive_avg_pool2d(F, (7, 7)))
    # L_sup's plain CE: "per_replica" (official: mean over each `replica_batch` group's valid
    # pixels, then over groups; the default of configs/voc.py, cityscapes.py) or "global" (one
    # mean over the batch's valid pixels); methods/base.py CE_REDUCTIONS. OHEM is per replica.
    c.loss.ce_reduction = "global"
    c.loss.ohem = False  # ProbOhemCrossEntropy2d for L_sup (Cityscapes)
    c.loss.ohem_thresh = 0.7
    c.loss.ohem_min_kept = 100000  # per replica: 50000 * 16 // 8 (city R18 train.py)
    # The student's no-grad forwards on u0/u1 only update its BN running statistics (§1.2).
    c.student_nograd_bn_updates = True
    # True: the batched step (the streams of one network in one call, each with its own BN
    # statistics, running-statistics updates in the official order; docs/performance.md).
    # False: the reference step, one network application per stream; both compute the same.
    # Unset: the backend's default (methods.base.FUSED_STEP_DEFAULT); a run records the value
    # it used in config.json (`resolve_backend_defaults`).
    c.fused_step = ml_collections.config_dict.placeholder(bool)
    # How the networks' align-corners upsampling is computed: "matmul" (two products with
    # interpolation matrices; the backward pass is one too) or "gather" (two neighbours and a
    # lerp; the backward pass is a scatter-add). Same values. Unset: matmul in the fused step,
    # the backend's default in the reference step (methods.base.RESIZE_DEFAULT); recorded in
    # config.json like `fused_step`.
    c.resize = ml_collections.config_dict.placeholder(str)
    # Recompute the trained networks' activations in the backward pass instead of keeping them
    # (fused step of cps / mgd): less device memory (e.g. 800 px crops), same values.
    c.remat = False


def _eval_fields(c: ml_collections.ConfigDict) -> None:
    """The evaluation protocol."""
    c.eval = ml_collections.ConfigDict()
    c.eval.mode = "whole"  # whole (pad to crop, one forward) | sliding (summed logits)
    c.eval.pad_to = (512, 512)  # static padded eval shape
    c.eval.crop = 512
    c.eval.stride_rate = 2 / 3
    c.eval.batch_size = 8  # global
    c.eval.flip = False  # horizontal-flip TTA (off in the recipe)
    c.eval.scales = (1.0,)  # multi-scale TTA (the recipe: single scale)
    c.eval.max_examples = -1  # > 0: evaluate a prefix only (smoke runs)
    c.eval.panels = 4  # val images in the prediction panels of every evaluation (0 = none)
    c.eval.progress_seconds = 30.0  # a progress line of a long evaluation at most this often


def _loop_fields(c: ml_collections.ConfigDict) -> None:
    """Logging, evaluation and checkpoint intervals; what a run may survive."""
    c.log_every = 50
    c.eval_every = 1000  # steps; the final step is always evaluated
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.smoke = False  # runlocal: a few steps at a small size to check paths and compilation
    # A step with a non-finite loss or gradient is never applied; False: the run stops at the next
    # host sync naming it; True: such steps are skipped and counted (train/skipped_steps).
    c.skip_nonfinite = False
    # Resume in a workdir whose config.json differs in a field that changes the run (refused
    # otherwise, listing the fields; `RESUME_SAFE` ones may always change).
    c.allow_config_change = False


# Fields a resumed run may change: they do not change what is trained (intervals, moved paths,
# worker counts; the device / host count is not a field: the global batch and the per-replica BN
# grouping are `batch_size` and `replica_batch`).
RESUME_SAFE = frozenset({
    "data_dir", "split_dir", "student_init", "cps.init", "num_workers", "prefetch", "log_every",
    "eval_every", "checkpoint_every", "keep_checkpoints", "eval.panels", "eval.progress_seconds",
    "eval.batch_size", "evaluate_teachers", "remat", "skip_nonfinite", "allow_config_change",
    "fused_step",  # the two step kinds compute the same (tests/test_fused_step.py)
    "resize",  # so do the two upsampling forms (tests/test_layers.py)
})


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
    """The config file's `get_config(arg)`, as `--config=path:arg` loads it, for code that reads a
    config without absl flags (the compile tool, a config built on another, tests)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {str(path)!r} not found")
    name = "mgd_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def resolve_backend_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `c` with the fields left to the backend set to what this backend uses (the
    step kind, the upsampling form), so that a run's config.json says what ran."""
    c = c.copy_and_resolve_references()
    with c.unlocked():
        c.fused_step = methods.base.fused(c)
        c.resize = methods.base.resize_method(c)
    return c


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"a.b.c": value} (dotted config field names)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(recorded: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """"field: recorded -> now" for every field of a workdir's recorded config (its JSON) that
    `config` changes, but the `RESUME_SAFE` ones (fields the recorded config lacks, added by a
    newer mgd_jax, keep their defaults and are not compared)."""
    then = flatten(recorded)
    now = flatten(json.loads(config.to_json_best_effort()))
    return [f"{key}: {then[key]!r} -> {now.get(key, '(absent)')!r}"
            for key in sorted(then) if key not in RESUME_SAFE and now.get(key) != then[key]]


# The arguments every dataset config takes (`configs/voc.py:method=mgd,student=resnet18,...`).
RECIPE_ARGS = {"method": "mgd", "student": "resnet18", "teacher": "resnet101", "partition": 8,
               "smoke": False}


def _set(c: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for path, value in values.items():
        *parents, leaf = path.split(".")
        target = c
        for p in parents:
            target = target[p]
        target[leaf] = value


def apply_recipe(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict, *,
                 students: Mapping[str, Mapping[str, Any]],
                 teachers: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
    """Completes a dataset config from its `RECIPE_ARGS`: the method, the partition, the
    student's recipe (`students[a.student]`, dotted field -> value), for method=cps the
    teacher's recipe, and the smoke sizes."""
    if a.partition not in VOC_EPOCHS:
        raise ConfigError(f"config argument partition={a.partition}: expected one of "
                          f"{sorted(VOC_EPOCHS)}")
    if a.student not in students:
        raise ConfigError(f"config argument student={a.student!r}: expected one of "
                          f"{sorted(students)}")
    c.method, c.partition, c.student = a.method, a.partition, a.student
    _set(c, students[a.student])
    if a.method == "cps":
        teacher = models.canonical(a.teacher)
        if teacher not in teachers:
            raise ConfigError(f"config argument teacher={a.teacher!r}: expected one of "
                              f"{sorted(teachers)}")
        c.cps.backbone = teacher
        _set(c, teachers[teacher])
    if a.smoke:
        apply_smoke(c)
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """big_vision's `runlocal`: same data and code paths, tiny sizes, a few steps."""
    c.num_train_steps = 3
    c.batch_size = c.replica_batch
    c.crop_size = 64
    c.eval.max_examples = 4
    c.eval.batch_size = 2
    c.log_every = 1
    c.eval_every = 3
    c.checkpoint_every = 3
    c.evaluate_teachers = False


def load_workdir_config(path: str) -> ml_collections.ConfigDict:
    """The config a training run recorded: `<path>/config.json`, or the one beside a network
    directory inside a workdir (`<workdir>/export`), or of the workdir of a checkpoint folder
    (`<workdir>/checkpoints/<step>`)."""
    from mgd_jax import network_dir  # local: see `validate`

    root = str(network_dir.locate(path)[0])  # a checkpoint folder inside a workdir: the workdir
    for candidate in (root, os.path.dirname(root)):
        file = os.path.join(candidate, "config.json")
        if os.path.isfile(file):
            with open(file) as f:
                return ml_collections.ConfigDict(json.load(f))
    raise ConfigError(f"{path}: no config.json here or in its parent folder; pass --config (the "
                      "config the network was trained with)")


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict, *, device_count: int = 1) -> datasets.Dataset:
    """Checks the config before any data is read or anything compiles; returns its dataset,
    resolved (the one `datasets.resolve` of a run: the data modules take the result)."""
    # Local: the step benchmark reads configs on machines without the data stack (grain, cv2).
    from mgd_jax.data import datasets, input_pipeline, splits
    from mgd_jax.evaluation import evaluate

    def one_of(field: str, value: Any, options: tuple[str, ...]) -> None:
        if value not in options:
            _fail(field, f"{value!r} is not one of {options}")

    one_of("method", c.method, methods.names())
    # float64 compute: for equality tests only, and only where jax runs with x64 enabled.
    x64 = ("float64",) if jax.config.read("jax_enable_x64") else ()
    one_of("precision", c.precision, models.PRECISIONS + x64)
    one_of("pairing", c.pairing, input_pipeline.PAIRINGS)
    if c.get("resize") is not None:
        one_of("resize", c.resize, models.RESIZE_METHODS)
    one_of("loss.ce_reduction", c.loss.ce_reduction, methods.base.CE_REDUCTIONS)
    one_of("eval.mode", c.eval.mode, evaluate.MODES)
    methods.check_config(c)
    if not c.dataset:
        _fail("dataset", "is empty")
    dataset = datasets.resolve(c.dataset)
    if c.num_classes < 2:
        _fail("num_classes", f"must be >= 2, got {c.num_classes}")
    for field, value in (("batch_size", c.batch_size), ("replica_batch", c.replica_batch),
                         ("crop_size", c.crop_size), ("eval.batch_size", c.eval.batch_size)):
        if value <= 0:
            _fail(field, f"must be positive, got {value}")
    for field, value in (("batch_size", c.batch_size), ("eval.batch_size", c.eval.batch_size)):
        parallel.process_share(value, field, device_count=device_count, process_count=1)
    if c.batch_size % c.replica_batch:
        _fail("replica_batch", f"{c.replica_batch} does not divide batch_size {c.batch_size}")
    one_of("partition_source", c.partition_source, input_pipeline.PARTITION_SOURCES)
    if c.partition_source == "lists":
        if c.split_dir and not os.path.isdir(os.path.expanduser(c.split_dir)):
            _fail("split_dir", f"{c.split_dir!r} is not a directory")
        if not c.split_dir and not splits.has_builtin(dataset):
            _fail(
                "split_dir",
                f"is empty and {c.dataset!r} has no built-in standard partitions (VOC and "
                "Cityscapes have): point it at your folder of split lists "
                "(train_aug_labeled_1-8.txt, ...), or set partition_source=seeded",
            )
    if c.partition not in (2, 4, 8, 16) and c.partition_source == "lists":
        _fail("partition", f"standard lists exist for 2, 4, 8, 16; got {c.partition}")
    if c.partition < 1:
        _fail("partition", f"must be >= 1, got {c.partition}")
    if c.lr <= 0 or not math.isfinite(c.lr):
        _fail("lr", f"must be a positive number, got {c.lr}")
    if c.weight_decay < 0:
        _fail("weight_decay", f"must be >= 0, got {c.weight_decay}")
    ph, pw = tuple(c.eval.pad_to)
    if c.eval.mode == "sliding" and c.eval.crop > min(ph, pw):
        _fail("eval.crop", f"{c.eval.crop} is larger than the padded size {c.eval.pad_to}")
    for field in ("student_init", "cps.init"):
        path = c.student_init if field == "student_init" else c.cps.init
        if path and path != methods.base.RANDOM_INIT and not paths.resolve(path).is_dir():
            _fail(field, f"{path!r} does not exist (a network directory of a backbone)")
    check_init(c, dataset)
    try:
        models.parse_depths(c.model.depths)
    except ValueError as e:
        _fail("model.depths", str(e))
    return dataset


def needs_init(dataset: datasets.Dataset) -> bool:
    """Whether training on `dataset` must name the networks' start: the paper's datasets (VOC,
    Cityscapes) and a user's own (configs/own.py applies the VOC recipe, whose schedule and loss
    weights assume ImageNet backbones); not the synthetic one (the tests, the demo)."""
    return dataset.own is not None or dataset.table().name in ("voc", "cityscapes")


def check_init(c: ml_collections.ConfigDict, dataset: datasets.Dataset) -> None:
    """Refuses a run on a dataset that `needs_init` whose method's init field is empty: the
    recipe starts every network from an ImageNet backbone, and an empty field would silently
    train from random weights. `RANDOM_INIT` ("none") says that is meant."""
    field = methods.method_class(c.method).init_field
    if not field or not needs_init(dataset):
        return
    value = functools.reduce(lambda node, key: node[key], field.split("."), c)
    if not value:
        _fail(field, f"is empty: training on {c.dataset!r} starts from an ImageNet backbone "
                     f"(docs/weights.md: mgd-import --backbone_only); pass --config.{field}=DIR, "
                     f"or --config.{field}={methods.base.RANDOM_INIT} to train from random "
                     "weights deliberately")
