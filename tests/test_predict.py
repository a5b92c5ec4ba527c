"""predict / mgd-predict: images -> palette PNGs + overlays with a tiny random network; corrupt
files reported."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mgd_jax import network_dir
from mgd_jax.data import augment, datasets
from mgd_jax.runtime.errors import DataError, ExportError
from mgd_jax.serving import predict
from mgd_jax.tools import predict as predict_main

from conftest import NUM_CLASSES


@pytest.fixture(scope="module")
def tiny(tiny_network):
    return tiny_network  # (<workdir>/export, model, variables)


def _rgb(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_canvas_shapes_and_names(tmp_path):
    assert predict.canvas_shape(20, 30, crop=32) == (32, 32)
    assert predict.canvas_shape(40, 24, crop=32, bucket=16) == (48, 32)
    assert predict.canvas_shape(40, 24, crop=32, pad_to=(64, 64)) == (64, 64)
    assert predict.canvas_shape(1024, 2048, crop=800, bucket=128) == (1024, 2048)
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "a.png", "b.JPEG", "sub/c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    stems = [s for _, s in predict.list_inputs([str(tmp_path)])]
    assert stems == ["a_jpg", "a_png", "b", "sub/c"]
    with pytest.raises(DataError, match="nope"):
        predict.list_inputs([str(tmp_path / "nope")])


def test_palettes():
    assert (datasets.palette_for(21)[:21] == np.asarray(datasets.DATASETS["voc"].palette)).all()
    city = datasets.palette_for(19)
    assert tuple(city[0]) == (128, 64, 128)  # road
    generic = datasets.palette_for(7)
    assert (generic[:7] == np.asarray(datasets.voc_colormap(7))).all()
    assert len({tuple(c) for c in generic[:7]}) == 7


def test_load_network_resolves_and_errors(tmp_path, tiny):
    ckpt = tiny[0]
    assert network_dir.load_network(str(ckpt.parent)).directory == str(ckpt)  # a workdir -> export/
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ExportError, match="training workdir"):
        network_dir.load_network(str(tmp_path))


def test_predict_files_writes_palette_pngs_and_reports_corrupt(tmp_path, tiny):
    ckpt, model, variables = tiny
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    small = _rgb(0, 20, 30)  # fits the crop: one padded forward
    tall = _rgb(1, 40, 24)  # long side > crop: sliding windows on a 48x32 canvas
    Image.fromarray(small).save(inputs / "small.png")
    Image.fromarray(tall).save(inputs / "sub" / "tall.png")
    Image.fromarray(_rgb(2, 32, 32)).save(inputs / "photo.jpg", quality=95)
    Image.fromarray(_rgb(3, 30, 20)).convert("L").save(inputs / "gray.png")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (inputs / "small.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])

    network = network_dir.load_network(str(ckpt), precision="float32")
    out = tmp_path / "out"
    report = predict.predict_files(network, [str(inputs)], out, crop=32, bucket=16, batch_size=2)

    failed = {f["input"].rsplit("/", 1)[-1]: f["error"] for f in report.failed}
    assert set(failed) == {"corrupt.jpg", "truncated.png"}
    assert all("cannot read the image" in e and str(inputs) in e for e in failed.values())
    assert len(report.written) == 4
    saved = json.loads((out / predict.REPORT_FILE).read_text())
    assert len(saved["written"]) == 4 and len(saved["failed"]) == 2
    assert sorted(map(tuple, saved["canvases"])) == [(32, 32), (48, 32)]

    for stem, image in (("small", small), ("sub/tall", tall)):
        png = Image.open(out / "labels" / f"{stem}.png")
        assert png.mode == "P" and png.size == (image.shape[1], image.shape[0])
        labels = np.asarray(png)
        assert labels.max() < NUM_CLASSES
        palette = np.asarray(png.getpalette()[: 3 * NUM_CLASSES]).reshape(-1, 3)
        assert (palette == np.asarray(datasets.voc_colormap(NUM_CLASSES))).all()
        overlay = Image.open(out / "overlays" / f"{stem}.jpg")
        assert overlay.size == png.size and overlay.mode == "RGB"
    assert (out / "labels" / "gray.png").is_file() and (out / "labels" / "photo.png").is_file()

    # The image that fits the crop follows the official whole branch: normalise, pad centred
    # with 0 to crop x crop, one forward, crop back.
    canvas, valid, (top, left) = predict.pad_centered(small, (32, 32))
    x = augment.normalize(canvas[None], valid[None])
    logits = model.apply(variables, jnp.asarray(x), train=False).logits[0]
    expected = np.asarray(jnp.argmax(logits, -1))[top:top + 20, left:left + 30]
    assert len(np.unique(expected)) > 1  # the random network is not degenerate
    got = np.asarray(Image.open(out / "labels" / "small.png"))
    assert (got == expected).mean() > 0.999  # float32 reassociation may flip a near-tie


def test_main_exit_codes(tmp_path, tiny, capsys):
    ckpt = tiny[0]
    Image.fromarray(_rgb(5, 24, 24)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    rc = predict_main.main([
        "predict_main", f"--checkpoint={ckpt.parent}", f"--input={tmp_path / 'ok.png'}",
        f"--input={tmp_path / 'bad.png'}", f"--output={tmp_path / 'o'}", "--crop=32",
        "--nooverlay", "--precision=float32"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 input(s) FAILED" in err and "bad.png" in err
    assert (tmp_path / "o" / "labels" / "ok.png").is_file()
    assert not (tmp_path / "o" / "overlays").exists()
    assert predict_main.main(["predict_main", f"--checkpoint={tmp_path}", f"--input={tmp_path}",
                              f"--output={tmp_path / 'p'}"]) == 2
