"""mgd_jax.pytorch.weight_files: .pth (torch.save's zip format) and .safetensors read without torch,
checked against torch.load / safetensors.torch on files written by torch, the pickle allow-list
(a malicious file is refused and nothing of it runs), and the import path with torch unavailable.
Only `jax.eval_shape` runs on the JAX side: nothing is compiled."""

from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from mgd_jax.pytorch import importer, weight_files
from mgd_jax.runtime.errors import WeightImportError
from mgd_jax.tools import import_weights as import_main

from torch_reference import timm, torch

TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                  torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
                  torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


def _tensors():
    """Every dtype a state dict holds, plus views: offsets, strides, shared storages, 0-d and
    empty tensors, a parameter."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.randn(20, generator=g, dtype=torch.float64)
    out = collections.OrderedDict(
        f32=torch.randn(3, 5, generator=g),
        bf16=torch.randn(7, 3, generator=g).to(torch.bfloat16),
        f16=torch.randn(2, 3, 4, generator=g).to(torch.float16),
        transposed=base.t(),  # strides (1, 6)
        sliced=base[1:3, 2:5],  # an offset and a row stride
        strided=shared[3:15:4],  # offset 3, stride 4, sharing its storage with `shared`
        shared=shared,
        bf16_view=torch.randn(5, 8, generator=g).to(torch.bfloat16)[::2, 1::3],
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        long=torch.arange(-3, 4),
        int32=torch.arange(5, dtype=torch.int32),
        int8=torch.arange(-4, 4, dtype=torch.int8),
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    )
    return out


def _assert_same(ours, reference):
    assert isinstance(ours, np.ndarray), type(ours)
    ref = reference.detach()
    assert ours.dtype == np.dtype(TORCH_TO_NUMPY[ref.dtype]) and ours.shape == tuple(ref.shape)
    if ref.dtype == torch.bfloat16:  # numpy cannot take bf16 from torch: compare the bits
        np.testing.assert_array_equal(ours.view(np.uint16),
                                      ref.contiguous().view(torch.int16).numpy().view(np.uint16))
    else:
        np.testing.assert_array_equal(ours, ref.numpy())


def test_pth_matches_torch_load(tmp_path):
    tensors = _tensors()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    checkpoint = {"model": model.state_dict(), "tensors": tensors, "epoch": 7,
                  "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}},
                                "param_groups": [{"lr": 0.01, "params": [0, 1]}]}}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    ours = weight_files.read(path)
    reference = torch.load(path, weights_only=True)
    assert ours["epoch"] == 7 and ours["optimizer"]["param_groups"] == [{"lr": 0.01,
                                                                         "params": [0, 1]}]
    _assert_same(ours["optimizer"]["state"][0]["momentum_buffer"],
                 reference["optimizer"]["state"][0]["momentum_buffer"])
    for group in ("model", "tensors"):
        assert list(ours[group]) == list(reference[group])
        for key in reference[group]:
            _assert_same(ours[group][key], reference[group][key])
    assert isinstance(ours["model"], collections.OrderedDict)
    assert ours["model"]._metadata == reference["model"]._metadata  # the state dict's BUILD


def test_safetensors_match_the_reference_reader(tmp_path):
    import safetensors.torch  # here: it imports torch, which torch_reference checks first

    tensors = {k: v.detach().contiguous() for k, v in _tensors().items()}
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    ours = weight_files.read(path)
    reference = safetensors.torch.load_file(path)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        _assert_same(ours[key], reference[key])
    # a cut file and a file that is not safetensors name the file
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(WeightImportError, match=r"cut\.safetensors: tensor .* does not fit"):
        weight_files.read(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightImportError, match=r"junk\.safetensors: not a safetensors file"):
        weight_files.read(tmp_path / "junk.safetensors")


class _Payload:
    """A pickle that would run a shell command when unpickled by pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Storage:
    """Pickled as torch pickles a 4-element float32 storage."""


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Storage) else None


def _zip_pth(path, payload, storages=None):
    """A file in torch.save's zip layout around an arbitrary pickle."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(payload)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)


def test_malicious_pickles_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _zip_pth(path, {"model": {"w": _Payload(marker)}})
    with pytest.raises(weight_files.RefusedPickle, match=r"evil\.pth: the pickle names "
                                                         r"(posix|os)\.system"):
        weight_files.read(path)
    # through the importer: torch's weights_only loader refuses it too
    with pytest.raises(WeightImportError, match=r"(posix|os)\.system.*allow_pickle"):
        importer.load_torch_file(str(path))

    # other callables, and a tensor reaching past its storage
    for name, call in [("eval.pth", (eval, ("1+1",))), ("import.pth", (__import__, ("os",)))]:
        _zip_pth(tmp_path / name, {"w": _Reduce(*call)})
        with pytest.raises(weight_files.RefusedPickle, match=r"(builtins|__builtin__)\."):
            weight_files.read(tmp_path / name)
    tensor = _Reduce(torch._utils._rebuild_tensor_v2,
                     (_Storage(), 0, (5,), (1,), False, collections.OrderedDict()))
    _zip_pth(tmp_path / "oob.pth", {"w": tensor}, {"0": np.arange(4, dtype=np.float32).tobytes()})
    with pytest.raises(WeightImportError, match=r"oob\.pth: tensor .* reaches element 4 of a "
                                                r"storage of 4"):
        weight_files.read(tmp_path / "oob.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the [torch] extra
    with pytest.raises(WeightImportError, match=r"system.*needs torch"):
        importer.load_torch_file(str(path))
    assert not marker.exists()


def _small_resnet18():
    torch.manual_seed(0)
    net = timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1],
                                    stem_type="deep", stem_width=8, channels=(16, 32, 64, 128))
    return {k: v for k, v in net.state_dict().items()}


def test_import_without_torch_pth_and_safetensors(tmp_path, monkeypatch, capsys):
    """A backbone imported from .pth and from .safetensors with torch unavailable gives the
    variables and the report of the in-memory state dict (as torch holds it)."""
    import safetensors.torch

    sd = _small_resnet18()
    options = {"width": 0.25, "depths": (1, 1, 1, 1)}
    reference, ref_report = importer.convert(sd, "resnet18", 21, part="backbone", **options)
    # the file stores bf16: the importer casts to the model's float32
    torch.save({"state_dict": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                               for k, v in sd.items()}}, tmp_path / "r18_bf16.pth")
    safetensors.torch.save_file(sd, tmp_path / "r18.safetensors")
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in ("r18.safetensors", "r18_bf16.pth"):
        variables, report = importer.convert(str(tmp_path / name), "resnet18", 21,
                                             part="backbone", **options)
        assert report.loaded == ref_report.loaded and report.skipped == ref_report.skipped
        assert report.missing == ref_report.missing
        flat, ref_flat = (traverse_util.flatten_dict(v)
                          for v in (variables, reference))
        assert flat.keys() == ref_flat.keys()
        for k in flat:
            want = ref_flat[k]
            if name.endswith("bf16.pth"):
                want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(flat[k], want, err_msg=str(k))
            assert flat[k].dtype == np.float32
    # the tool takes a .safetensors file
    out = tmp_path / "r18"
    assert import_main.main(["import_main", f"--torch={tmp_path / 'r18.safetensors'}",
                             "--backbone=resnet18", "--backbone_only", "--width=0.25",
                             "--depths=1,1,1,1", f"--output={out}"]) == 0
    assert "backbone.conv1.0.weight" not in capsys.readouterr().out


def test_what_only_torch_reads(tmp_path, monkeypatch):
    """The legacy format goes to torch when it is installed, else one clear error."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(importer.load_torch_file(str(path))["w"].numpy(), [1, 1])
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightImportError, match=r"legacy\.pth: not a zip archive.*"
                                                r"needs torch \(pip install 'mgd_jax\[torch\]'\)"):
        importer.load_torch_file(str(path))
    with pytest.raises(WeightImportError, match="allow_pickle needs torch"):
        importer.load_torch_file(str(path), allow_pickle=True)
    buf = io.BytesIO()
    np.savez(buf, w=np.ones(3, np.float32))
    (tmp_path / "w.npz").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(importer.load_torch_file(str(tmp_path / "w.npz"))["w"],
                                  np.ones(3))


def test_import_records_what_it_read_and_checks_torch_hub_names(tmp_path, capsys):
    """mgd-import writes the file's size and SHA-256 (hashlib over the bytes on disk) into
    meta.json and prints them; a name in torch.hub's form (`-<hex>.`) must match the SHA-256's
    first digits, as torch.hub checks a download: a mismatch is one error naming both."""
    import hashlib
    import json
    import shutil

    import safetensors.torch

    source = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(_small_resnet18(), source)
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    flags = ["--backbone=resnet18", "--backbone_only", "--width=0.25", "--depths=1,1,1,1"]
    good = tmp_path / f"resnet18-{sha[:8]}.safetensors"
    bad = tmp_path / f"resnet18-{'0' if sha[0] != '0' else '1'}{sha[1:8]}.safetensors"
    shutil.copy(source, good)
    shutil.copy(source, bad)
    for name, out in ((source, tmp_path / "plain"), (good, tmp_path / "named")):
        assert import_main.main(["mgd-import", f"--torch={name}", *flags, f"--output={out}"]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert (meta["source_bytes"], meta["source_sha256"]) == (len(data), sha)
        assert f"read {len(data)} bytes, sha256 {sha}" in capsys.readouterr().out
    assert import_main.main(["mgd-import", f"--torch={bad}", *flags,
                             f"--output={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: its name says its SHA-256 starts "
                                               f"with {bad.name[9:17]}") and sha in err[0], err
    assert not (tmp_path / "bad").exists()
