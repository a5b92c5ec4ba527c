"""The package's shape: the import graph (imports inside functions included) has no circles and
only points down the layers below; every module imports on its own; the networks import without
the data, checkpoint or PyTorch stacks; and a method defined outside the package trains through
the unchanged trainer."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from mgd_jax import methods, train
from mgd_jax.methods import base, losses

from conftest import need

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mgd_jax"
# The modules that import torch, torchvision and timm at their top (the `torch` extra).
NEEDS_TORCH = ("mgd_jax.pytorch.nets", "mgd_jax.pytorch.step")

# The folders, top to bottom: a folder imports only folders below it (and the root modules).
FOLDERS = ("tools", "workflows", "methods", "serving", "pytorch", "evaluation", "data", "models",
           "runtime")

# Modules, top to bottom. A module may import only modules of the layers below its own. Each
# folder's modules are one block, in the order of FOLDERS; the root modules sit between them.
LAYERS = (
    ("main",),
    # tools/: command-line entry points (flags and printing over importable functions)
    ("tools.evaluate", "tools.predict", "tools.export", "tools.import_weights", "tools.prepare",
     "tools.bench", "tools.grid", "tools.demo_stage"),
    ("tools.cli",),
    ("tools",),
    # workflows/: runs made of runs
    ("workflows.tpu_compile",),  # the bench's FLOP count, compiled for TPU topologies
    ("workflows.demo", "workflows.bench", "workflows.grid"),
    ("workflows",),
    # the trainer and the config
    ("train",),
    ("config_lib",),
    # methods/: the training methods and their losses
    ("methods",),
    ("methods.cps", "methods.mgd", "methods.supervised"),
    ("methods.base",),
    ("methods.losses",),
    # serving/: trained networks used
    ("serving.deploy",),
    ("serving.predict", "serving.onnx_export"),
    ("serving",),
    # pytorch/: PyTorch interop
    ("pytorch.importer", "pytorch.step"),
    ("pytorch.nets", "pytorch.weight_files"),
    ("pytorch",),
    # evaluation/
    ("evaluation.panels",),
    ("evaluation.evaluate",),
    ("evaluation",),
    # root: the network-directory format and the optimiser
    ("network_dir", "optim"),
    # data/: from files to batches
    ("data.prepare", "data.bench"),
    ("data.input_pipeline", "data.builders"),
    ("data.builders.cityscapes", "data.builders.folder", "data.builders.synthetic",
     "data.builders.voc_aug"),
    ("data.builders.common",),
    ("data.sources", "data.splits"),
    ("data.synthetic", "data.augment", "data.cutmix"),
    ("data.datasets",),
    ("data",),
    # models/: the networks
    ("models.summary",),
    ("models",),
    ("models.deeplabv3plus",),
    ("models.mobilenet_v2", "models.resnet"),
    ("models.layers",),
    # runtime/: what every run stands on
    ("runtime.checkpoint",),
    ("runtime.reporting", "runtime.parallel", "runtime.workdir_lock"),
    ("runtime.integrity", "runtime.interrupts", "runtime.logs", "runtime.paths",
     "runtime.errors"),
    ("runtime", ""),  # "" = the package itself
)

ROOT_MODULES_AT_MOST = 6


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            # `from pkg import name`: the submodule if there is one, else the package
            names = [n for n in names[:-1] if n[len("mgd_jax."):] in modules] or names[-1:]
        else:
            continue
        for name in names:
            if name == "mgd_jax" or name.startswith("mgd_jax."):
                out.add(name[len("mgd_jax."):] if name != "mgd_jax" else "")
    return out


def test_import_graph_points_down_the_layers_without_circles():
    modules = _modules()
    layer = {name: i for i, group in enumerate(LAYERS) for name in group}
    assert set(layer) == set(modules), (
        f"modules not placed in LAYERS: {sorted(set(modules) - set(layer))}; "
        f"stale entries: {sorted(set(layer) - set(modules))}"
    )
    wrong = []
    graph = {}
    for name, path in modules.items():
        graph[name] = _imports(path, modules) - {name}
        wrong += [f"{name} -> {t}" for t in graph[name] if layer[t] <= layer[name]]
    assert not wrong, "imports that do not point down: " + ", ".join(sorted(wrong))
    # (strictly descending layers already exclude circles; checked explicitly for the message)
    done, active = set(), []

    def visit(node):
        assert node not in active, "circle: " + " -> ".join(active[active.index(node):] + [node])
        if node in done:
            return
        active.append(node)
        for target in graph[node]:
            visit(target)
        active.pop()
        done.add(node)

    for name in graph:
        visit(name)


def test_the_folders_are_the_layers():
    """Few modules at the package root; each folder one block of LAYERS, in FOLDERS' order; no
    folder imports a folder above it."""
    modules = _modules()
    root = sorted(n for n in modules if n and "." not in n and n not in FOLDERS)
    assert len(root) <= ROOT_MODULES_AT_MOST, f"modules at the package root: {root}"
    folder_of = {n: n.split(".")[0] for n in modules if n.split(".")[0] in FOLDERS}
    assert set(folder_of.values()) == set(FOLDERS), "FOLDERS and the package's folders differ"
    blocks = [folder_of.get(n) for group in LAYERS for n in group]
    blocks = [f for i, f in enumerate(blocks) if f and (i == 0 or blocks[i - 1] != f)]
    assert blocks == list(FOLDERS), f"folder blocks in LAYERS: {blocks}"
    upward = sorted(f"{name} -> {target}"
                    for name, path in modules.items() if name in folder_of
                    for target in _imports(path, modules) if target in folder_of
                    and FOLDERS.index(folder_of[target]) < FOLDERS.index(folder_of[name]))
    assert not upward, "imports from a folder above: " + ", ".join(upward)


def _import_each_first(names: list[str]) -> str:
    """Imports each module in turn with no other module of the package loaded (third-party
    libraries stay cached between modules); returns the failures."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'mgd_jax']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return proc.stdout.strip() + ("" if proc.returncode == 0 else proc.stderr[-3000:])


def test_every_module_imports_alone():
    names = sorted(f"mgd_jax.{m}" if m else "mgd_jax" for m in _modules())
    # A tfds builder registers itself once per interpreter: each gets a fresh one.
    builders = [n for n in names if n.startswith("mgd_jax.data.builders")]
    failures = [_import_each_first([n for n in names if n not in builders + list(NEEDS_TORCH)])]
    failures += [_import_each_first([n]) for n in builders]
    assert not any(failures), "\n".join(failures)


def test_the_torch_modules_import_alone():
    need("torch", "torchvision", "timm")
    failures = _import_each_first(list(NEEDS_TORCH))
    assert not failures, failures


def test_networks_import_without_data_checkpoint_or_torch_stacks():
    script = (
        "import json, sys\n"
        "import mgd_jax.models\n"
        "heavy = ['torch', 'tensorflow_datasets', 'grain', 'cv2', 'orbax', 'tensorflow']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


class LabelSmoothing(base.StudentMethod):
    """A method the package does not know: the student on labeled images with label-smoothed
    cross-entropy. Everything but the loss comes from `base.StudentMethod`."""

    def loss(self, params, batch_stats, frozen, batch, rng, step=0):
        labeled = batch["labeled"]
        out, batch_stats = base.forward(self.eval_model, params, batch_stats,
                                        base.normalize(labeled))
        labels = labeled["label"]
        valid = labels != 255
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
        target = jax.nn.one_hot(jnp.where(valid, labels, 0), logp.shape[-1]) * 0.9 + 0.1 / (
            logp.shape[-1])
        per_pixel = -jnp.sum(target * logp, axis=-1)
        loss = jnp.sum(jnp.where(valid, per_pixel, 0)) / jnp.maximum(jnp.sum(valid), 1)
        plain = losses.cross_entropy(out.logits, labels)
        return loss, (batch_stats, {"loss": loss, "plain_ce": plain})


def test_a_method_defined_outside_the_package_trains(synthetic_dir, tmp_path, tiny_config):
    methods.register("label_smoothing", LabelSmoothing)
    try:
        config = tiny_config("label_smoothing", synthetic_dir, num_train_steps=3,
                             eval_every=3, checkpoint_every=3)
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    finally:
        del methods.REGISTRY["label_smoothing"]
    assert result["method"] == "label_smoothing" and result["steps"] == 3
    assert 0 <= result["miou"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("train/plain_ce" in row for row in rows)
    assert (tmp_path / "run" / "export" / "meta.json").is_file()
