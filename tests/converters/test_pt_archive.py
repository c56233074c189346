"""converters.pt_archive against torch.save / torch.load (torch-marked) and on its own (no torch)."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from converters import pt_archive
from torch_reference import torch

DTYPES = (np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int8,
          np.uint8, np.bool_)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"a_{np.dtype(d).name}": (rng.standard_normal((3, 5)) * 4).astype(d) for d in DTYPES}
    out["scalar"] = np.array(7.5, np.float32)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    return out


@pytest.mark.torch
def test_reads_what_torch_save_writes(tmp_path):
    """Every dtype, 0-d, empty, strided views and storage shared between tensors, Parameters,
    OrderedDict and Namespace: values and dtypes equal torch.load's."""
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    obj = collections.OrderedDict(
        {k: torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16)
         if v.dtype == ml_dtypes.bfloat16 else torch.from_numpy(np.ascontiguousarray(v))
         for k, v in _arrays().items()})
    obj["view_t"] = base.t()                # strides (1, 5) over the shared storage
    obj["view_slice"] = base[1:3, 2:]       # offset 7, strides (5, 1)
    obj["param"] = torch.nn.Parameter(torch.ones(3))
    obj["ns"] = argparse.Namespace(lr=2e-4, params_dtype=torch.bfloat16, name="x")
    path = str(tmp_path / "t.pt")
    torch.save(obj, path)
    got = pt_archive.load(path)
    ref = torch.load(path, weights_only=False)
    for key, value in ref.items():
        if key == "ns":
            assert got[key].lr == 2e-4 and str(got[key].params_dtype) == "torch.bfloat16"
            continue
        want = value.detach()
        if want.dtype == torch.bfloat16:
            want_np = want.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            want_np = want.numpy()
        assert got[key].dtype == want_np.dtype and got[key].shape == want_np.shape, key
        np.testing.assert_array_equal(got[key], want_np, err_msg=key)
    assert not got["view_t"].flags.writeable  # a read-only view of the mapped file


@pytest.mark.torch
def test_torch_loads_what_it_writes_weights_only(tmp_path):
    arrays = _arrays()
    obj = {"tensors": arrays, "shape": pt_archive.TorchSize((3, 5)), "betas": (0.9, 0.95),
           "groups": [collections.OrderedDict(w=pt_archive.TorchSize((2, 2)))], "none": None}
    path = str(tmp_path / "w.pt")
    pt_archive.save(obj, path)
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert got["shape"] == torch.Size([3, 5]) and got["betas"] == (0.9, 0.95)
        assert isinstance(got["groups"][0]["w"], torch.Size) and got["none"] is None
        for key, value in arrays.items():
            t = got["tensors"][key]
            back = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                    if t.dtype == torch.bfloat16 else t.numpy())
            assert back.shape == value.shape, key
            np.testing.assert_array_equal(back, value, err_msg=key)


def test_round_trip_without_torch(tmp_path):
    arrays = _arrays()
    path = str(tmp_path / "r.pt")
    pt_archive.save({"x": arrays, "ns": argparse.Namespace(a=1)}, path)
    got = pt_archive.load(path, foreign="record")
    assert got["ns"].a == 1
    for key, value in arrays.items():
        assert got["x"][key].dtype == value.dtype and got["x"][key].shape == value.shape
        np.testing.assert_array_equal(got["x"][key], value, err_msg=key)
    # Storages start on 64-byte boundaries, as torch.save writes them (so they map in place).
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                with open(path, "rb") as f:
                    f.seek(info.header_offset + 26)
                    n, m = np.frombuffer(f.read(4), "<u2")
                assert (info.header_offset + 30 + n + m) % 64 == 0, info.filename


def test_bad_files_are_one_clear_error(tmp_path):
    good = str(tmp_path / "good.pt")
    pt_archive.save({"w": np.ones((64, 64), np.float32)}, good)
    data = open(good, "rb").read()
    truncated = str(tmp_path / "truncated.pt")
    open(truncated, "wb").write(data[: len(data) // 2])
    with pytest.raises(pt_archive.PtArchiveError, match="truncated.pt: not a torch.save zip"):
        pt_archive.load(truncated)
    legacy = str(tmp_path / "legacy.pt")
    open(legacy, "wb").write(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(pt_archive.PtArchiveError, match="legacy.pt: written in torch's pre-1.6"):
        pt_archive.load(legacy)
    with pytest.raises(pt_archive.PtArchiveError, match="numpy scalar"):
        pt_archive.save({"x": np.float32(1.0)}, str(tmp_path / "s.pt"))
    with pytest.raises(pt_archive.PtArchiveError, match="cannot be opened"):
        pt_archive.load(str(tmp_path / "missing.pt"))
    assert not os.path.exists(str(tmp_path / "missing.pt"))
