"""ZeRO-1 shards -> Orbax (converters/zero_to_orbax.py) against an independent ZeRO writer and the
universal path.

The shards come from zero_writer.py (spec §2-§5 alone, no torch), built from universal_writer's
fixture tensors; the reference is universal_to_orbax on the universal checkpoint of the same
tensors: the committed fixture's tensor files (written by universal_writer with torch) or, for the
other shapes, zero_writer's copy of ds_to_universal's output. Both must agree bit for bit (params,
moments, step) with equal metadata except `source` and `created_by`. Real DeepSpeed fixtures
(tests/fixtures/zero_*/, a save root with `latest` and, where ds_to_universal worked, its
universal copy; scripts/make_zero_fixtures.py) join the same tests as extra cases when present.
Malformed shards: test_zero_bad_input.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import universal_writer as uw
import zero_writer as zw
from agpt_jax import checkpoint
from converters import pt_archive, universal_to_orbax, zero, zero_files, zero_to_orbax
from torch_reference import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
COMMITTED = FIXTURES / "universal_tiny" / f"global_step{uw.ITERATION}_universal"
# The micro shape of scripts/make_zero_fixtures.py: the norm group has N = 40, so at DP=8
# A = 16, P = 48, S = 6 and the padding (P - N = 8 > S) spans ranks 6 and 7.
MICRO = uw.with_shape("zero_micro_shape", L=2, H=8, NQ=4, NKV=2, F=24, V=100, VPAD=112, SEQ=16)

#: name -> (model module, DP, writer, dtype, universal tensors from the committed fixture)
SYNTHETIC = {
    "dp3_zero_fp32": (uw, 3, "zero", "fp32", True),
    "dp3_zero_old_bf16": (uw, 3, "zero_old", "bf16", True),
    "dp3_bf16_opt_bf16": (uw, 3, "bf16_opt", "bf16", True),
    "dp8_zero_fp32": (MICRO, 8, "zero", "fp32", False),
    "dp8_zero_old_fp32": (MICRO, 8, "zero_old", "fp32", False),
    "dp8_bf16_opt_bf16": (MICRO, 8, "bf16_opt", "bf16", False),
}
REAL = {p.name: p for p in sorted(FIXTURES.glob("zero_*"))
        if p.is_dir() and (p / "latest").is_file()}


def _make(name: str, root: str) -> dict:
    shape, dp, writer, dtype, committed = SYNTHETIC[name]
    written = zw.write_zero_checkpoint(root, shape, dp, writer, dtype)
    zw.write_universal_copy(root, shape, written, str(COMMITTED) if committed else None)
    return written


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("zero")


_converted: dict[str, dict] = {}


def converted(name: str, work) -> dict:
    """The case's save root, its ZeRO and universal conversions (made once per module)."""
    if name not in _converted:
        if name in REAL:
            root, written = str(REAL[name]), None
        else:
            root = str(work / name)
            written = _make(name, root)
        out = {"root": root, "written": written, "zero": str(work / f"{name}.zero.orbax")}
        assert zero_to_orbax.main(["--load", root, "--save", out["zero"]]) == 0
        if os.path.isfile(os.path.join(root, "latest_universal")):
            out["universal"] = str(work / f"{name}.universal.orbax")
            assert universal_to_orbax.main(["--load", root, "--save", out["universal"]]) == 0
        _converted[name] = out
    return _converted[name]


def _leaves(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_arrays(a: str, b: str) -> None:
    """Params and Adam state (moments and count) identical bit for bit, same paths and dtypes."""
    for restore in (checkpoint.restore_params, checkpoint.restore_adam):
        x, y = _leaves(restore(a)), _leaves(restore(b))
        assert x.keys() == y.keys()
        for key in x:
            u, v = np.atleast_1d(x[key]), np.atleast_1d(y[key])
            assert u.dtype == v.dtype and u.shape == v.shape, key
            assert np.array_equal(u.view(np.uint8), v.view(np.uint8)), key


# ----------------------------------------------------------------------------------------------
# The layout rule and the writer.


def test_layout_rule_on_the_auroragpt_example():
    """Spec §5 / DeepSpeed #6974: 65 norm weights of 4096 at DP=768."""
    lay = zero_files.group_layout({f"n{i}": (4096,) for i in range(65)}, 768)
    assert (lay.n, lay.padded, lay.size, lay.padded - lay.n) == (266240, 267264, 348, 1024)
    assert [lay.real(r) for r in (0, 764, 765, 766, 767)] == [348, 348, 20, 0, 0]
    # Rank 765 holds the last 20 elements of the last norm weight, from its partition start.
    assert lay.fragments(765) == [("n64", 0, 20)] and lay.fragments(766) == []
    assert sum(n for r in range(768) for _, _, n in lay.fragments(r)) == lay.n


def test_universal_copy_equals_the_committed_fixture(tmp_path):
    """zero_writer's ds_to_universal tensors (written without torch) are exactly what
    universal_writer wrote with torch: the stand-in for the other shapes is sound."""
    written = zw.write_zero_checkpoint(str(tmp_path), uw, 2)
    folder = zw.write_universal_copy(str(tmp_path), uw, written)
    names = sorted(os.listdir(COMMITTED / "zero"))
    assert names == sorted(os.listdir(os.path.join(folder, "zero")))
    for name in names:
        if name == "optimizer_state.pt":
            continue
        for f in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt"):
            x = pt_archive.load(str(COMMITTED / "zero" / name / f))
            y = pt_archive.load(os.path.join(folder, "zero", name, f))
            if f == "step.pt":
                assert x.dtype == y.dtype and x.shape == y.shape == () and x == y
                continue
            assert x.keys() == y.keys(), (name, f)
            np.testing.assert_array_equal(x["param"], y["param"])
            assert {k: v for k, v in x.items() if k != "param"} == {
                k: v for k, v in y.items() if k != "param"}


def test_pt_archive_reads_a_protocol_2_set(tmp_path):
    """torch.save (protocol 2) names builtins `__builtin__`: DeepSpeed's
    sparse_tensor_module_names is a set in every model-states file."""
    path = str(tmp_path / "s.pt")
    pt_archive.save({"names": {"a", "b"}, "t": np.arange(3, dtype=np.float32)}, path)
    assert pt_archive.load(path)["names"] == {"a", "b"}


@pytest.mark.torch
def test_pt_archive_reads_a_set_torch_saved(tmp_path):
    path = str(tmp_path / "s.pt")
    torch.save({"sparse_tensor_module_names": set(), "x": {1, 2}}, path)
    assert pt_archive.load(path) == {"sparse_tensor_module_names": set(), "x": {1, 2}}


# ----------------------------------------------------------------------------------------------
# The property: ZeRO shards and their universal copy convert to the same checkpoint.


@pytest.mark.parametrize("name", list(SYNTHETIC) + list(REAL))
def test_zero_equals_universal(name, work):
    out = converted(name, work)
    zero_dir = out["zero"]
    if "universal" in out:
        assert_same_arrays(zero_dir, out["universal"])
        a, b = checkpoint.read_metadata(zero_dir), checkpoint.read_metadata(out["universal"])
        assert a.pop("created_by") == "converters.zero_to_orbax"
        assert b.pop("created_by") == "converters.universal_to_orbax"
        a.pop("source"), b.pop("source")
        assert a == b
    else:  # a real fixture whose ds_to_universal crashed (spec §10): the conversion stands alone
        assert checkpoint.has_adam(zero_dir)
    meta = checkpoint.read_metadata(zero_dir)
    assert meta["source"] == zero.resolve_zero_dir(out["root"])
    cfg = checkpoint.model_config(zero_dir)
    params, adam = checkpoint.restore_params(zero_dir), checkpoint.restore_adam(zero_dir)
    v = cfg.vocab_size
    for tree in (params, adam["mu"], adam["nu"]):  # the universal path's rows: zero padding
        assert not np.any(tree["embed"]["embedding"][v:])
        assert not np.any(tree["lm_head"]["kernel"][:, v:])
    if out["written"] is not None:
        shape = SYNTHETIC[name][0]
        t = out["written"]["tensors"]
        emb = "language_model.embedding.word_embeddings.weight"
        assert np.any(t["fp32"][emb][v:])  # the shards did hold non-zero padded rows
        np.testing.assert_array_equal(params["embed"]["embedding"][:v], t["fp32"][emb][:v])
        down = "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"
        np.testing.assert_array_equal(adam["mu"]["layers"]["mlp"]["down"][1], t["exp_avg"][down].T)
        np.testing.assert_array_equal(adam["nu"]["layers"]["mlp"]["down"][1],
                                      t["exp_avg_sq"][down].T)
        norm = "language_model.encoder.final_layernorm.weight"
        np.testing.assert_array_equal(params["final_norm"]["scale"], t["fp32"][norm])
        assert int(adam["count"]) == int(shape.STEP) == meta["adam_step"]


def _fragment_reference(root: str) -> tuple[dict, dict, float, dict]:
    """Spec §5's second path, written here and not in converters/: every rank's
    param_slice_mappings windows narrowed out of its fp32 partition, exp_avg and exp_avg_sq, a
    parameter's fragments concatenated in rank order and shaped by param_shapes. Returns
    ({state: {name: value}}, {name: module weight}, the Adam step, universal_checkpoint_info)."""
    import collections
    import re

    folder = os.path.join(root, open(os.path.join(root, "latest")).read().strip())
    ranks = sorted((int(re.search(r"zero_pp_rank_(\d+)_", n).group(1)), n)
                   for n in os.listdir(folder) if n.endswith("_optim_states.pt"))
    assert [r for r, _ in ranks] == list(range(len(ranks)))
    states = pt_archive.load(os.path.join(folder, "mp_rank_00_model_states.pt"), foreign="record")
    shapes = {n: tuple(s) for group in states["param_shapes"] for n, s in group.items()}
    pieces = {k: collections.defaultdict(list) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    steps = set()
    for _, name in ranks:
        osd = pt_archive.load(os.path.join(folder, name), foreign="record")["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            st = osd["base_optimizer_state"]["state"][g]
            steps.add(float(st["step"]))
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g], "exp_avg": st["exp_avg"],
                    "exp_avg_sq": st["exp_avg_sq"]}
            for param, frag in mapping.items():
                start, numel = frag.state["start"], frag.state["numel"]
                for k in pieces:
                    pieces[k][param].append(np.asarray(flat[k][start:start + numel]))
    assert len(steps) == 1
    ref = {k: {n: np.concatenate(v).reshape(shapes[n]) for n, v in by.items()}
           for k, by in pieces.items()}
    assert all(ref[k].keys() == shapes.keys() for k in ref)

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", np.asarray(value)

    module = dict(flatten(states["module"]))
    return ref, module, steps.pop(), dict(states["universal_checkpoint_info"])


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_fixture_equals_the_fragment_path(name, work, tmp_path):
    """Every real DeepSpeed fixture, those where ds_to_universal crashed (spec §10) included:
    the conversion, exported again as universal tensors by orbax_to_universal (bit-exact round
    trips: test_universal_converters), equals the fragment path of §5, cut to the original
    vocabulary as the universal format is, with the Adam step of the shards; and the fragment
    path's fp32 master cast to the module dtype is the module weight bit for bit (§6)."""
    from converters import orbax_to_universal

    ref, module, step, info = _fragment_reference(str(REAL[name]))
    for param, w in module.items():
        cast = ref["fp32"][param].astype(w.dtype)
        assert np.array_equal(cast.view(np.uint8), w.view(np.uint8)), param
    out = str(tmp_path / "universal")
    assert orbax_to_universal.main(["--load", converted(name, work)["zero"], "--save", out]) == 0
    folder = os.path.join(out, open(os.path.join(out, "latest_universal")).read().strip(), "zero")
    assert sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))) == \
        sorted(ref["fp32"])
    vocab = info["original_vocab_size"]
    for param in ref["fp32"]:
        for k in ref:
            want = ref[k][param]
            if param in info["vocabulary_parameter_patterns"]:
                assert want.shape[0] == info["padded_vocab_size"]
                want = want[:vocab]
            got = pt_archive.load(os.path.join(folder, param, f"{k}.pt"))["param"]
            assert got.dtype == np.float32 and got.shape == want.shape, (param, k)
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (param, k)
        assert float(pt_archive.load(os.path.join(folder, param, "step.pt"))) == step


def test_repartition_to_768_ranks_gives_the_same_checkpoint(work, tmp_path):
    """The DP=8 state re-partitioned by the rule to DP=768 (group 0: S=6, ranks 555.. padding
    only; the norm group: S=2, 748 ranks padding only), old writer: identical conversion."""
    root = str(tmp_path / "dp768")
    written = zw.write_zero_checkpoint(root, MICRO, 768, "zero_old", "fp32")
    assert written["sizes"] == [(3328, 6), (40, 2)]
    dst = str(tmp_path / "orbax")
    assert zero_to_orbax.main(["--load", root, "--save", dst]) == 0
    assert_same_arrays(dst, converted("dp8_zero_fp32", work)["zero"])
    a, b = (checkpoint.read_metadata(d) for d in (dst, converted("dp8_zero_fp32", work)["zero"]))
    assert a["zero_optimizer_state"]["partition_count"] == [768, 768]
    assert a["param_groups"] == b["param_groups"] and a["model"] == b["model"]


def test_chunked_writes_give_the_same_checkpoint(work, tmp_path, monkeypatch):
    """Chunks cut far below a tensor (four rows of the output layer's kernel per write, a few rows
    of every other array) and one pending write at a time: the same arrays as the default."""
    from agpt_jax.checkpoint import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 2000)
    small = zero_to_orbax.ConvertOptions(max_inflight_bytes=1, progress=False)
    out = converted("dp3_zero_fp32", work)
    dst = str(tmp_path / "zero_small_chunks")
    zero_to_orbax.convert(out["root"], dst, small)
    assert_same_arrays(dst, out["zero"])
    dst = str(tmp_path / "universal_small_chunks")
    universal_to_orbax.convert(out["root"], dst, small)
    assert_same_arrays(dst, out["universal"])


def test_no_optimizer_state(work, tmp_path):
    root = converted("dp3_zero_fp32", work)["root"]
    dst = str(tmp_path / "noopt")
    assert zero_to_orbax.main(["--load", root, "--save", dst, "--no-optimizer-state"]) == 0
    assert not checkpoint.has_adam(dst) and checkpoint.read_metadata(dst)["adam_step"] is None
    x = _leaves(checkpoint.restore_params(dst))
    y = _leaves(checkpoint.restore_params(converted("dp3_zero_fp32", work)["zero"]))
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_conversion_never_imports_torch(work, tmp_path):
    root = converted("dp8_bf16_opt_bf16", work)["root"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from converters import zero_to_orbax\n"
            f"assert zero_to_orbax.main(['--load', {root!r}, '--save', "
            f"{str(tmp_path / 'o')!r}]) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kinds_of_a_root_holding_both(work):
    """A save root after ds_to_universal holds `latest` and `latest_universal`: the border reads
    it as universal, zero_to_orbax follows `latest`."""
    from converters import load

    out = converted("dp3_zero_fp32", work)
    assert load.is_universal(out["root"]) and not load.is_zero(out["root"])
    folder = zero.resolve_zero_dir(out["root"])
    assert load.is_zero(folder) and folder.endswith(f"global_step{uw.ITERATION}")


# ----------------------------------------------------------------------------------------------
# The checkpoint border (converters/load.py).


def _rank(root: str, r: int, prefix: str = "") -> str:
    return os.path.join(root, f"global_step{uw.ITERATION}",
                        f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def _run_config(tmp_path, load_path: str, model, **over):
    import importlib.util

    import jax

    from agpt_jax import config as config_lib
    from agpt_jax.data import write_indexed_dataset

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_indexed_dataset(str(data / "web"), (np.arange(1, 60) % 97 for _ in range(50)),
                          np.uint16)
    (data / "web.txt").write_text("1.0 web web\n")
    spec = importlib.util.spec_from_file_location("zero_cfg_legacy", ROOT / "configs" / "legacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config("smoke", environ={})
    cd.progress_bar = False
    cd.data_file_list, cd.load, cd.save = str(data / "web.txt"), load_path, str(tmp_path / "run")
    for k, v in over.items():
        setattr(cd, k, v)
    import dataclasses

    cfg = config_lib.from_config(cd, jax.device_count())
    return dataclasses.replace(cfg, model=model)


def test_border_converts_a_zero_load_once(tmp_path):
    from agpt_jax.config import ConfigError
    from converters import load

    root = str(tmp_path / "zero_root")
    zw.write_zero_checkpoint(root, MICRO, 3, "bf16_opt", "bf16")
    model = zero.open_zero(root).config
    rt = types.SimpleNamespace(is_main_process=True, process_count=1)
    assert load.is_zero(root) and not load.is_universal(root)
    assert "DeepSpeed ZeRO checkpoint" in load.describe(root)
    cfg = _run_config(tmp_path, root, model)
    out = load.prepare(cfg, rt)
    dst = os.path.join(cfg.run_dir, load.CONVERTED_INIT)
    assert out.checkpoint.load == checkpoint.resolve_checkpoint_dir(dst)
    assert out.checkpoint.origin == root and not out.checkpoint.universal_checkpoint
    record = json.load(open(os.path.join(dst, load.SOURCE_RECORD)))
    assert record == load.fingerprint(root, optimizer_state=True)
    assert record["zero_folder"] == zero.resolve_zero_dir(root) and record["files"] == 4
    direct = str(tmp_path / "direct")
    zero_to_orbax.convert(root, direct, zero_to_orbax.ConvertOptions(progress=False))
    assert_same_arrays(dst, direct)
    # A second start reuses the conversion; a changed rank file is refused, naming both.
    stamp = os.stat(os.path.join(dst, "_CHECKPOINT_METADATA")).st_mtime_ns
    load.prepare(cfg, rt)
    assert os.stat(os.path.join(dst, "_CHECKPOINT_METADATA")).st_mtime_ns == stamp
    rank = _rank(root, 2, "bf16_")
    st = os.stat(rank)
    os.utime(rank, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(checkpoint.CheckpointError, match="was converted from .*global_step20"):
        load.prepare(cfg, rt)
    # Megatron's --universal-checkpoint insists on a universal LOAD.
    flagged = _run_config(tmp_path, root, model, universal_checkpoint=True)
    with pytest.raises(ConfigError, match="not a DeepSpeed universal checkpoint.*ZeRO"):
        load.prepare(flagged, rt)
