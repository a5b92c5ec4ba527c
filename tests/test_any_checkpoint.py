"""Any checkpoint, anywhere: a run killed mid-way (the state of a run still training) read by the
tools through its workdir, a step, its best checkpoint or a checkpoint folder; the exported meta
(format 2: dataset, palette, input, evaluation protocol), so prediction needs no protocol flags;
and a network directory of the previous format (1) still loads."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from mgd_jax import network_dir, train
from mgd_jax.runtime.errors import ExportError
from mgd_jax.serving import predict
from mgd_jax.tools import evaluate as eval_main
from mgd_jax.tools import export as export_main
from mgd_jax.tools import predict as predict_main

from conftest import Killed, killed_after_checkpoint, make_tiny_config, save_tiny_network


@pytest.fixture(scope="module")
def killed_run(synthetic_dir, tmp_path_factory):
    """A 6-step run killed right after its step-4 checkpoint (evaluations at steps 2 and 4)."""
    config = make_tiny_config("supervised", synthetic_dir, num_train_steps=6, eval_every=2,
                              checkpoint_every=2)
    workdir = tmp_path_factory.mktemp("killed") / "run"
    with killed_after_checkpoint(4), pytest.raises(Killed):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "export").exists()
    return workdir


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _logged_miou(workdir, step):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return next(r["eval/miou"] for r in rows if r["step"] == step and "eval/miou" in r)


def test_every_path_to_a_checkpoint(killed_run):
    latest = network_dir.load_network(str(killed_run))
    assert latest.step == 4 and latest.meta["eval"]["crop"] == 32
    at_2 = network_dir.load_network(str(killed_run), step=2)
    assert at_2.step == 2 and not _leaves_equal(at_2.variables, latest.variables)
    folder = network_dir.load_network(str(killed_run / "checkpoints" / "2"))
    assert folder.step == 2 and _leaves_equal(folder.variables, at_2.variables)
    best = network_dir.load_network(str(killed_run / "checkpoints" / "best"))
    assert best.step == (2 if _logged_miou(killed_run, 2) > _logged_miou(killed_run, 4) else 4)
    with pytest.raises(ExportError, match="names step 2, but step=4"):
        network_dir.load_network(str(killed_run / "checkpoints" / "2"), step=4)
    with pytest.raises(ExportError, match="saved steps: \\[2, 4\\]"):
        network_dir.load_network(str(killed_run), step=6)


def test_eval_main_on_a_killed_run_reproduces_the_logged_score(killed_run, tmp_path):
    # No --config: the workdir's config.json, found from the checkpoint folder.
    assert eval_main.main(["eval_main", f"--checkpoint={killed_run}/checkpoints/2",
                           f"--output={tmp_path}"]) == 0
    saved = json.loads((tmp_path / "eval_val.json").read_text())
    assert saved["miou"] == pytest.approx(_logged_miou(killed_run, 2), abs=1e-6)


def test_export_and_predict_use_the_recorded_protocol(killed_run, tmp_path, synthetic_dir):
    out = tmp_path / "net"
    assert export_main.main(["export_main", f"--checkpoint={killed_run}", "--step=2",
                             f"--output={out}"]) == 0
    meta = json.loads((out / network_dir.META_FILE).read_text())
    assert meta["version"] == network_dir.FORMAT_VERSION == 2 and meta["step"] == 2
    assert meta["dataset"]["name"] == synthetic_dir[1]
    assert len(meta["dataset"]["class_names"]) == len(meta["dataset"]["palette"]) == 5
    assert meta["eval"] == {"mode": "whole", "crop": 32, "pad_to": [32, 32],
                            "stride_rate": pytest.approx(2 / 3)}
    assert meta["input"]["channel_order"] == "RGB" and len(meta["input"]["mean"]) == 3
    network = network_dir.load_network(str(out))
    killed = network_dir.load_network(str(killed_run), step=2)
    assert _leaves_equal(network.variables, killed.variables)

    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(images / f"{i}.png")
    assert predict_main.main(["predict_main", f"--checkpoint={out}", f"--input={images}",
                              f"--output={tmp_path / 'pred'}", "--nooverlay"]) == 0
    report = json.loads((tmp_path / "pred" / predict.REPORT_FILE).read_text())
    assert {k: report["settings"][k] for k in ("mode", "crop", "pad_to")} == {
        "mode": "whole", "crop": 32, "pad_to": [32, 32]}
    expected = predict.Predictor(network, mode="whole", crop=32, pad_to=(32, 32))(arrays)
    for i, labels in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred/labels" / f"{i}.png")),
                                      labels)
    palette = np.asarray(Image.open(tmp_path / "pred/labels/0.png").getpalette()[:15])
    assert palette.reshape(5, 3).tolist() == meta["dataset"]["palette"]
    # Explicit flags override the recorded protocol.
    assert predict_main.main(["predict_main", f"--checkpoint={out}", f"--input={images}",
                              f"--output={tmp_path / 'pred2'}", "--mode=sliding", "--crop=16",
                              "--nooverlay"]) == 0
    settings = json.loads((tmp_path / "pred2" / predict.REPORT_FILE).read_text())["settings"]
    assert (settings["mode"], settings["crop"], settings["pad_to"]) == ("sliding", 16, [32, 32])


def test_previous_format_still_loads(tmp_path):
    model, variables = save_tiny_network(tmp_path / "old")
    old_meta = {"format": "mgd_jax.variables", "version": 1, "backbone": "resnet18",
                "num_classes": 5, "build_options": {"depths": [1, 1, 1, 1], "width": 0.125}}
    # as version 1 wrote it
    (tmp_path / "old" / network_dir.META_FILE).write_text(json.dumps(old_meta))
    network = network_dir.load_network(str(tmp_path / "old"))
    assert network.meta["version"] == 1 and _leaves_equal(network.variables, variables)
    assert predict.protocol(network) == {"mode": "sliding", "crop": 512, "stride_rate": 2 / 3,
                                         "pad_to": None}
    assert predict.network_palette(network)[:5].tolist() == predict.palette_for(5)[:5].tolist()
    image = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    assert predict.Predictor(network, crop=32)([image])[0].shape == (24, 40)

    (tmp_path / "old" / network_dir.META_FILE).write_text(json.dumps(dict(old_meta, version=3)))
    with pytest.raises(ExportError, match="format version 3"):
        network_dir.load_network(str(tmp_path / "old"))
