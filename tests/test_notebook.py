"""notebooks/mgd_jax_colab.ipynb executed as a user runs it on Colab, CI-sized
(MGD_JAX_NOTEBOOK_QUICK=1: tiny images, two steps per stage), each time in a fresh kernel whose
working directory stands for /content. CI has neither Colab nor Drive nor a network, so only the
sources are substituted: the install cell clones the checkout under test (MGD_JAX_REPO_URL, a
file:// URL), Drive is a folder (MGD_JAX_DRIVE), and pip resolves offline with --dry-run
(MGD_JAX_NOTEBOOK_PIP_ARGS: this environment already has the package installed in development
mode from this checkout, which a real install would repoint to the clone). Any error fails."""

import json
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

from conftest import need

need("nbclient", "nbformat", "ipykernel")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "mgd_jax_colab.ipynb"
SKIP_TAG = "skip-in-tests"
STAGES = ("pretrain_deep", "pretrain_wide", "teacher_deep", "teacher_wide", "student_supervised",
          "student_mgd")
PIP_DRY_RUN = "--dry-run --no-index --no-build-isolation"


def _notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _install_cell(nb):
    (cell,) = [c for c in _code(nb) if "REPO_URL = " in c.source]
    return cell


def _restart_cells(nb):
    """What a user runs after a restart: from the Parameters cell on."""
    start = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    return nb.cells[start:]


def _execute(nb, cells, cwd, allow_errors=False):
    """`cells` executed in a fresh kernel in `cwd`: their code cells' outputs as text, in order."""
    run = nbformat.v4.new_notebook(cells=[c for c in cells if c.cell_type != "code"
                                          or SKIP_TAG not in c.metadata.get("tags", [])],
                                   metadata=nb.metadata)
    NotebookClient(run, timeout=600, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return ["\n".join(piece for o in c.get("outputs", [])
                      for piece in (o.get("text", ""), json.dumps(o.get("data", {})),
                                    *o.get("traceback", [])))
            for c in run.cells if c.cell_type == "code"]


def _colab_env(monkeypatch, tmp_path, repo_url):
    """The kernel inherits this environment: the quick sizes, the sources, one CPU device."""
    drive = tmp_path / "drive"
    drive.mkdir()
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.setenv("MGD_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MGD_JAX_REPO_URL", repo_url)
    monkeypatch.setenv("MGD_JAX_DRIVE", str(drive))
    monkeypatch.setenv("MGD_JAX_NOTEBOOK_PIP_ARGS", PIP_DRY_RUN)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # XLA's cheapest CPU code generation: the notebook mostly compiles (~30% less).
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return content, drive


def test_repository_url_is_pyproject_s():
    """The clone URL and the Open-in-Colab badge are pyproject's [project.urls] Repository, and the
    notebook writes no version pyproject holds."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(\.git)?", url).group(1)
    nb = _notebook()
    assert re.search(r'^REPO_URL = "([^"]*)"', _install_cell(nb).source, re.M).group(1) == url
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{owner_repo}/blob/main/"
             f"notebooks/{NOTEBOOK.name})")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(badge)
    for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("launch/*.md")]:
        for link in re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+",
                               doc.read_text()):
            assert badge.endswith(f"({link})"), f"{doc.name}: {link}"
    code = "\n".join(c.source for c in _code(nb))
    assert not re.search(r"[=<>~]=\s*\d+\.\d", code), "a version: pyproject holds them"
    assert "nvidia-smi" not in code and "from configs" not in code and "%cd" not in code


def test_colab_notebook_top_to_bottom_then_after_a_restart(tmp_path, monkeypatch):
    nb = _notebook()
    skipped = [c for c in _code(nb) if SKIP_TAG in c.metadata.get("tags", [])]
    assert len(skipped) == 1 and "%tensorboard" in skipped[0].source  # no TensorBoard in CI
    assert not any(c.get("outputs") for c in _code(nb))  # stored clean
    content, drive = _colab_env(monkeypatch, tmp_path, ROOT.as_uri())
    monkeypatch.setenv("MGD_JAX_NOTEBOOK_USE_DRIVE", "1")  # the workdir on (the stand-in) Drive
    workdir = drive / "mgd_demo"

    t0 = time.time()
    outputs = _execute(nb, nb.cells, content)
    first = time.time() - t0
    install, text = outputs[0], "\n".join(outputs)
    assert f"from {ROOT.as_uri()}" in install
    assert re.search(r"^jax \S+ \(cpu\): inside pyproject.s range \S+, kept$", install, re.M)
    assert re.search(r"^pip install -c \S+ -e \S+/mgd_jax_repo\[tensorboard\]$", install, re.M)
    assert "nothing the running Python had imported was replaced" in install
    assert (content / "mgd_jax_repo" / "configs" / "demo.py").is_file()
    assert "| MGD | resnet18 |" in text and "| Sup.l | resnet18 |" in text  # the results table
    assert "image/png" in text  # panels shown inline
    assert "teacher_deep_eval" in text  # MGD evaluated its teachers
    for stage in STAGES[2:]:
        result = json.loads((workdir / stage / "final_metrics.json").read_text())
        assert result["steps"] == 2 and 0 <= result["miou"] <= 1
        assert (workdir / stage / "log.txt").is_file()
    assert (workdir / "student_mgd" / "eval_val.json").is_file()

    # The runtime restarts after the Sup.l student's last checkpoint, before its final files.
    cut = workdir / "student_supervised"
    for name in ("final_metrics.json", "export", "export_best"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink(missing_ok=True)
    finished = {s: (workdir / s / "final_metrics.json").read_bytes() for s in STAGES
                if s != "student_supervised"}
    t0 = time.time()
    text = "\n".join(_execute(nb, _restart_cells(nb), content))
    second = time.time() - t0
    for stage, before in finished.items():
        assert f"{stage}: finished earlier" in text
        assert (workdir / stage / "final_metrics.json").read_bytes() == before
    assert "resumed from step 2" in (cut / "log.txt").read_text()
    assert json.loads((cut / "final_metrics.json").read_text())["steps"] == 2
    assert "| MGD | resnet18 |" in text and "image/png" in text
    print(f"notebook top to bottom {first:.0f} s, after the restart {second:.0f} s")


def test_install_cell_takes_a_drive_copy_else_says_why_not(tmp_path, monkeypatch):
    """An unreachable REPO_URL: the copy on Drive is used; without one, one error line."""
    nb = _notebook()
    content, drive = _colab_env(monkeypatch, tmp_path, (tmp_path / "no-such-repo").as_uri())
    (lines,) = _execute(nb, [_install_cell(nb)], content, allow_errors=True)
    assert re.search(r"^error: no copy of the repository: cloning file://\S+ failed \(.+\), and "
                     rf"{re.escape(str(drive / 'mgd_jax'))} holds none", lines, re.M)
    assert "Traceback" not in lines and not (content / "mgd_jax_repo").exists()

    subprocess.run(["git", "clone", "-q", ROOT.as_uri(), str(drive / "mgd_jax")], check=True)
    (install,) = _execute(nb, [_install_cell(nb)], content)
    assert f"mgd_jax: {content / 'mgd_jax_repo'}, from {drive / 'mgd_jax'}" in install
    assert (content / "mgd_jax_repo" / "configs" / "demo.py").is_file()
    assert not (content / "mgd_jax_repo" / ".git").exists()  # copied without its history


def test_install_cell_picks_the_accelerator_build_from_jax(tmp_path, monkeypatch):
    """The runtime's accelerator and version as its jax reports them (a stand-in jax module for
    the cell's probe): out of pyproject's range, the `tpu` / `cuda12` extra; inside it, jax kept
    with the package's other requirements only; no jax, the CPU build."""
    nb = _notebook()
    content, _ = _colab_env(monkeypatch, tmp_path, ROOT.as_uri())
    fake = tmp_path / "fake_jax" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import os\n"
        "if os.environ['FAKE_JAX'] == 'none':\n"
        "    raise ImportError('no jax')\n"
        "__version__, backend = os.environ['FAKE_JAX'].split()\n"
        "def default_backend():\n"
        "    return backend\n")
    cases = {"0.9.0 tpu": "tpu", "0.9.0 gpu": "cuda12", "0.10.2 gpu": None, "none": None}
    cells = []
    for case in cases:  # the stand-in for the probe's process only, not for this kernel
        cells += [nbformat.v4.new_code_cell(f"os.environ.update(FAKE_JAX={case!r}, "
                                            f"PYTHONPATH={str(fake.parent)!r})"),
                  nbformat.v4.new_code_cell(_install_cell(nb).source)]
    outputs = _execute(nb, [nbformat.v4.new_code_cell("import os")] + cells, content,
                       allow_errors=True)[2::2]
    repo = re.escape(str(content / "mgd_jax_repo"))
    tpu, gpu, kept, none = outputs
    assert "jax 0.9.0 (tpu): outside pyproject's range" in tpu
    assert re.search(rf"^pip install -e {repo}\[tensorboard,tpu\]$", tpu, re.M)
    assert "jax 0.9.0 (gpu): outside pyproject's range" in gpu
    assert re.search(rf"^pip install -e {repo}\[tensorboard,cuda12\]$", gpu, re.M)
    assert re.search(r"^jax 0.10.2 \(gpu\): inside pyproject.s range \S+, kept$", kept, re.M)
    assert re.search(rf"^pip install -c \S+ -e {repo}\[tensorboard\]$", kept, re.M)
    assert "no jax installed" in none
    assert re.search(rf"^pip install -e {repo}\[tensorboard\]$", none, re.M)
