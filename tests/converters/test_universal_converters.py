"""Universal <-> Orbax <-> HF converters against an independent universal writer and HF Llama.

The universal checkpoint is the committed fixture tests/fixtures/universal_tiny, written by the
independent writer of universal_writer.py with torch.save (real DeepSpeed-style pickles, stand-in
Megatron and DeepSpeed classes), with the logits HF transformers computes on its weights. Tests
without a torch marker read it with no torch installed (the Python 3.12 leg); the torch-marked
ones check the fixture is what the writer writes, and compare with HF and torch.load live.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from agpt_jax import checkpoint
from converters import orbax_to_hf, orbax_to_universal, pt_archive, universal_to_orbax
from converters import universal
from torch_reference import torch
from universal_writer import (EPS, F, H, ITERATION, L, NKV, NQ, SEQ, STEP, THETA, V, VPAD,
                              fixture_tensors, hf_reference_logits, reference_tokens,
                              write_universal_fixture)

COMMITTED = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "universal_tiny"


# ----------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("conv")


@pytest.fixture(scope="module")
def universal_root(work):
    """A copy of the committed fixture, and the tensors it holds (rebuilt from their seed)."""
    root = str(work / "src")
    shutil.copytree(COMMITTED, root, ignore=shutil.ignore_patterns("reference.npz"))
    return root, fixture_tensors(seed=0)


@pytest.fixture(scope="module")
def reference():
    with np.load(COMMITTED / "reference.npz") as ref:
        return {k: ref[k] for k in ref.files}


@pytest.fixture(scope="module")
def converted(work, universal_root):
    root, _ = universal_root
    dst = str(work / "orbax")
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 0
    return dst


# ----------------------------------------------------------------------------------------------
# Reader and restricted unpickler.


def test_reader_needs_neither_megatron_nor_deepspeed(universal_root):
    root, _ = universal_root
    ckpt = universal.open_universal(root)
    assert "megatron" not in sys.modules and "deepspeed" not in sys.modules
    mt = ckpt.args["model_type"]
    assert isinstance(mt, universal.PickledObject)
    assert mt.pickled_class == "megatron.core.enums.ModelType" and mt.args == (1,)
    assert str(ckpt.args["params_dtype"]) == "torch.bfloat16"
    scaler = ckpt.optimizer_state["loss_scaler"]
    assert scaler.pickled_class == "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"
    assert scaler.state == {"cur_scale": 65536.0, "cur_iter": 20, "scale_factor": 2.0}
    cfg = ckpt.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.ffn_hidden_size, cfg.vocab_size, cfg.padded_vocab_size, cfg.seq_length,
            cfg.rope_theta, cfg.norm_eps) == (L, H, NQ, NKV, F, V, VPAD, SEQ, THETA, EPS)
    assert ckpt.iteration == ITERATION and ckpt.read_step() == STEP
    assert ckpt.param_groups[0]["weight_decay"] == 0.1 and ckpt.param_groups[1]["betas"] == (
        0.9, 0.95)


def test_conversion_never_imports_torch(universal_root, tmp_path):
    """universal -> Orbax -> universal in a process where importing torch fails."""
    root, _ = universal_root
    code = ("import sys; sys.modules['torch'] = None\n"
            "from converters import universal_to_orbax, orbax_to_universal\n"
            f"assert universal_to_orbax.main(['--load', {root!r}, '--save', {str(tmp_path / 'o')!r}]) == 0\n"
            f"assert orbax_to_universal.main(['--load', {str(tmp_path / 'o')!r}, '--save', {str(tmp_path / 'u')!r}]) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=pathlib.Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(universal.resolve_universal_dir(str(tmp_path / "u")),
                                       "mp_rank_00_model_states.pt"))


def _zip_pickle(path: str, payload: bytes) -> None:
    """A torch.save-shaped archive around an arbitrary pickle, written without torch."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3")


def test_malicious_pickle_is_refused_naming_file_and_global(universal_root, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root = str(tmp_path / "src")
    shutil.copytree(universal_root[0], root)
    opt_path = os.path.join(root, f"global_step{ITERATION}_universal", "zero",
                            "optimizer_state.pt")
    opt = universal.load_restricted(opt_path)
    _zip_pickle(opt_path, pickle.dumps({"param_groups": opt["param_groups"], "evil": Evil()},
                                       protocol=2))
    with pytest.raises(universal.UniversalCheckpointError) as e:
        universal.open_universal(root)
    assert opt_path in str(e.value) and ("posix.system" in str(e.value)
                                         or "nt.system" in str(e.value))
    assert not marker.exists()
    # A tensor file may not even hold Megatron or DeepSpeed records.
    step_path = os.path.join(root, f"global_step{ITERATION}_universal", "zero",
                             "language_model.output_layer.weight", "step.pt")
    _zip_pickle(step_path, b"\x80\x02cdeepspeed.runtime.zero\nZeroStageEnum\n)\x81.")
    with pytest.raises(universal.UniversalCheckpointError,
                       match="deepspeed.runtime.zero.ZeroStageEnum"):
        universal.read_step_file(step_path)


def test_given_config_mismatches_are_all_listed(universal_root):
    root, _ = universal_root
    from agpt_jax.model import get_preset

    given = get_preset("tiny").replace(hidden_size=128, rope_theta=10000.0)
    with pytest.raises(universal.UniversalCheckpointError) as e:
        universal.open_universal(root, given)
    msg = str(e.value)
    assert "hidden_size: given 128, checkpoint 64" in msg and "rope_theta" in msg
    assert "norm_eps" in msg  # tiny preset has 1e-5, the checkpoint 1e-6


# ----------------------------------------------------------------------------------------------
# universal -> Orbax.


def _agpt_logits(params, tokens: np.ndarray, directory: str) -> np.ndarray:
    import jax.numpy as jnp

    from agpt_jax.model import GPT

    cfg = checkpoint.model_config(directory).replace(compute_dtype="float32", remat="none")
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))


def test_converted_logits_match_hf(converted, reference):
    """Against the logits HF computed when the fixture was written (torch not needed here)."""
    tokens = reference["tokens"]
    ours = _agpt_logits(checkpoint.restore_params(converted), tokens, converted)
    np.testing.assert_allclose(ours, reference["hf_logits"], atol=2e-4, rtol=1e-4)
    assert np.all(ours[..., V:] == 0)  # padded rows are zero after a universal load (spec §7)


def test_converted_params_are_the_writers_tensors(universal_root, converted):
    """Every Flax param equals the fixture's HF weight in Flax layout (independent numpy)."""
    _, fx = universal_root
    hf, params = fx["hf"], checkpoint.restore_params(converted)
    d = H // NQ
    np.testing.assert_array_equal(params["embed"]["embedding"][:V], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"][:, :V], hf["lm_head.weight"].T)
    for i in range(L):
        p = f"model.layers.{i}."
        layer = lambda *k: params["layers"][k[0]][k[1]][i] if len(k) == 2 else params["layers"][k[0]][i]
        np.testing.assert_array_equal(layer("attn", "q").reshape(H, NQ * d),
                                      hf[p + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(layer("attn", "k").reshape(H, NKV * d),
                                      hf[p + "self_attn.k_proj.weight"].T)
        np.testing.assert_array_equal(layer("mlp", "gate"), hf[p + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(layer("mlp", "down"), hf[p + "mlp.down_proj.weight"].T)


@pytest.mark.torch
def test_committed_fixture_is_the_writers_output(tmp_path, reference):
    """The committed files equal what the writer writes now (torch.load both), and the committed
    logits are what HF transformers computes now."""
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    fx = write_universal_fixture(fresh, seed=0)
    a, b = universal.resolve_universal_dir(str(COMMITTED)), universal.resolve_universal_dir(fresh)
    fa, fb = _load_all(a), _load_all(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert torch.equal(x["param"], y["param"]) and x.keys() == y.keys(), key
    tokens = reference_tokens()
    np.testing.assert_array_equal(reference["tokens"], tokens)
    # The committed logits were computed on another CPU: its fp32 BLAS kernels sum in another
    # order (2.6e-6 apart at logits of |x| <= 5 between two x86 machines). 1e-5 is fp32 noise for
    # this two-layer model; a wrong weight or layout moves logits by 1e-2 and more.
    np.testing.assert_allclose(reference["hf_logits"], hf_reference_logits(fx["hf"], tokens),
                               rtol=1e-5, atol=1e-5)


def test_converted_metadata_and_moments(universal_root, converted):
    _, fx = universal_root
    meta = checkpoint.read_metadata(converted)
    assert meta["iteration"] == ITERATION and meta["adam_step"] == STEP
    assert meta["original_vocab_size"] == V and meta["padded_vocab_size"] == VPAD
    assert meta["param_groups"][0]["lr"] == 1.9e-4 and meta["param_groups"][1]["weight_decay"] == 0
    assert meta["megatron_args"]["rope_theta"] == THETA
    adam = checkpoint.restore_adam(converted)
    assert int(adam["count"]) == int(STEP)
    # exp_avg of the first layer's dense_4h_to_h [H, F] is mu/layers/mlp/down[0] [F, H].
    m, v = fx["moments"]["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    np.testing.assert_array_equal(adam["mu"]["layers"]["mlp"]["down"][1], m.T)
    np.testing.assert_array_equal(adam["nu"]["layers"]["mlp"]["down"][1], v.T)
    m, _ = fx["moments"]["language_model.embedding.word_embeddings.weight"]
    np.testing.assert_array_equal(adam["mu"]["embed"]["embedding"][:V], m)
    assert np.all(adam["mu"]["embed"]["embedding"][V:] == 0)


def test_restore_into_sharded_arrays(converted):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    params = checkpoint.restore_params(converted)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    spec = lambda x: P("fsdp") if x.shape[0] % 4 == 0 else P()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=NamedSharding(mesh, spec(x))),
                          params)
    sharded = checkpoint.restore_params(converted, target)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
        assert isinstance(a, jax.Array) and a.sharding.mesh.shape == {"data": 2, "fsdp": 4}
        np.testing.assert_array_equal(np.asarray(a), b)


def test_no_optimizer_state(universal_root, work):
    root, _ = universal_root
    dst = str(work / "noopt")
    assert universal_to_orbax.main(["--load", root, "--save", dst, "--no-optimizer-state"]) == 0
    assert not checkpoint.has_adam(dst) and checkpoint.read_metadata(dst)["adam_step"] is None


# ----------------------------------------------------------------------------------------------
# Orbax -> universal: the round trip is bit-exact.


def _load_all(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(os.path.join(folder, "zero"))):
        pdir = os.path.join(folder, "zero", name)
        if os.path.isdir(pdir):
            for f in sorted(os.listdir(pdir)):
                out[(name, f)] = torch.load(os.path.join(pdir, f), weights_only=True)
    return out


def _assert_same_universal(a_root: str, b_root: str) -> None:
    a = universal.resolve_universal_dir(a_root)
    b = universal.resolve_universal_dir(b_root)
    assert os.path.basename(a) == os.path.basename(b)
    fa, fb = _load_all(a), _load_all(b)  # every file of ours loads with weights_only=True
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key
            continue
        assert set(x) == set(y), key
        assert x["param"].dtype == y["param"].dtype == torch.float32
        assert torch.equal(x["param"].detach(), y["param"].detach()), key
        assert {k: v for k, v in x.items() if k != "param"} == {
            k: v for k, v in y.items() if k != "param"}, key
    oa = universal.load_restricted(os.path.join(a, "zero", "optimizer_state.pt"))
    ob = torch.load(os.path.join(b, "zero", "optimizer_state.pt"), weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    for k in ("dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "group_paddings",
              "partition_count", "ds_version"):
        assert oa[k] == ob[k], k
    sa = universal.load_restricted(os.path.join(a, "mp_rank_00_model_states.pt"))
    sb = universal.load_restricted(os.path.join(b, "mp_rank_00_model_states.pt"))
    for k in ("iteration", "checkpoint_version", "universal_checkpoint_info", "tokens",
              "global_steps", "global_samples", "skipped_steps", "lr_scheduler", "ds_config",
              "ds_version", "buffer_names"):
        assert sa[k] == sb[k], k
    assert isinstance(sb["args"], argparse.Namespace)
    for k, v in vars(sa["args"]).items():
        if not isinstance(v, (universal.PickledObject, universal.TorchDtype)):
            assert getattr(sb["args"], k) == v, k


def test_round_trip_is_bit_exact_without_torch(universal_root, converted, work):
    """Every tensor file written back equals the source's (read torch-free both), with the same
    keys and flags; the torch-marked test below checks the same with torch.load."""
    root, _ = universal_root
    back = str(work / "back_np")
    assert orbax_to_universal.main(["--load", converted, "--save", back]) == 0
    a, b = universal.resolve_universal_dir(root), universal.resolve_universal_dir(back)
    names = sorted(n for n in os.listdir(os.path.join(a, "zero"))
                   if os.path.isdir(os.path.join(a, "zero", n)))
    assert names == sorted(n for n in os.listdir(os.path.join(b, "zero"))
                           if os.path.isdir(os.path.join(b, "zero", n)))
    for name in names:
        for f in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt"):
            x = pt_archive.load(os.path.join(a, "zero", name, f))
            y = pt_archive.load(os.path.join(b, "zero", name, f))
            if f == "step.pt":
                assert x.dtype == y.dtype and x.shape == y.shape and x == y, name
                continue
            assert x.keys() == y.keys() and x["param"].dtype == y["param"].dtype, (name, f)
            np.testing.assert_array_equal(x["param"], y["param"], err_msg=f"{name}/{f}")
            assert {k: v for k, v in x.items() if k != "param"} == {
                k: v for k, v in y.items() if k != "param"}, (name, f)


@pytest.mark.torch
def test_universal_orbax_universal_is_bit_exact(universal_root, converted, work):
    root, _ = universal_root
    back = str(work / "back")
    assert orbax_to_universal.main(["--load", converted, "--save", back]) == 0
    _assert_same_universal(root, back)
    folder = universal.resolve_universal_dir(back)
    module = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"),
                        weights_only=False)["module"]["language_model"]
    fp32 = torch.load(os.path.join(folder, "zero", "language_model.output_layer.weight",
                                   "fp32.pt"), weights_only=True)["param"]
    assert module["output_layer"]["weight"].shape == (VPAD, H)
    assert torch.equal(module["output_layer"]["weight"][:V], fp32)
    # And the result converts again to the same Orbax checkpoint.
    again = str(work / "again")
    assert universal_to_orbax.main(["--load", back, "--save", again]) == 0
    import jax

    for x, y in zip(jax.tree.leaves(checkpoint.restore_adam(converted)),
                    jax.tree.leaves(checkpoint.restore_adam(again))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.torch
def test_pipeline_names_round_trip(tmp_path):
    root = str(tmp_path / "pipe")
    os.makedirs(root)
    fx = write_universal_fixture(root, seed=5, pipeline=True)
    ckpt = universal.open_universal(root)
    assert ckpt.scheme.value == "pipeline"
    dst = str(tmp_path / "orbax")
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 0
    tokens = np.random.default_rng(4).integers(0, V, (1, SEQ)).astype(np.int32)
    np.testing.assert_allclose(_agpt_logits(checkpoint.restore_params(dst), tokens, dst),
                               hf_reference_logits(fx["hf"], tokens), atol=2e-4, rtol=1e-4)
    back = str(tmp_path / "back")
    assert orbax_to_universal.main(["--load", dst, "--save", back]) == 0
    _assert_same_universal(root, back)
    folder = universal.resolve_universal_dir(back)
    layer = torch.load(os.path.join(folder, f"layer_{L + 3:02d}-model_00-model_states.pt"),
                       weights_only=True)
    assert layer["lm_head.weight"].shape == (VPAD, H)


def test_project_writer_fixture_round_trip(tmp_path):
    """A universal checkpoint from the project's own writer converts to exactly its params."""
    from agpt_jax.model import get_preset
    from converters import megatron_layout

    cfg = get_preset("tiny").replace(num_layers=3)
    rng = np.random.default_rng(7)
    tree = {path: rng.standard_normal(shape).astype(np.float32)
            for path, shape in megatron_layout.flax_shapes(cfg).items()}
    for path in (megatron_layout.EMBED,):
        tree[path][cfg.vocab_size:] = 0  # universal files cannot hold padded rows
    tree[megatron_layout.LM_HEAD][:, cfg.vocab_size:] = 0

    def source(t, state):
        parts = {p: (tree[p][t.layer] if megatron_layout.is_stacked(p) else tree[p])
                 for p in megatron_layout.flax_paths_of(t.kind)}
        w = megatron_layout.from_flax(t, parts, cfg)
        return w if state == "fp32" else w * (0.5 if state == "exp_avg" else 0.25)

    contents = orbax_to_universal.UniversalContents(
        config=cfg, scheme=megatron_layout.NameScheme.MODULE, iteration=7, step=7.0,
        param_groups=[{"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}],
        args={"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "ffn_hidden_size": 176, "seq_length": 32,
              "rope_theta": 10000.0, "layernorm_epsilon": 1e-5,
              "make_vocab_size_divisible_by": 16})
    root = str(tmp_path / "own")
    os.makedirs(root)
    orbax_to_universal.write_universal(root, contents, source)
    dst = str(tmp_path / "orbax")
    universal_to_orbax.convert(root, dst, universal_to_orbax.ConvertOptions(progress=False))
    params = checkpoint.restore_params(dst)
    adam = checkpoint.restore_adam(dst)
    for path, value in tree.items():
        got = params
        mu = adam["mu"]
        for k in path:
            got, mu = got[k], mu[k]
        np.testing.assert_array_equal(got, value)
        np.testing.assert_array_equal(mu, value * 0.5)


def test_training_run_root_is_resolved(converted, work):
    """orbax_to_universal reads a run's newest finalized CheckpointManager step."""
    import orbax.checkpoint as ocp

    params, adam = checkpoint.restore_params(converted), checkpoint.restore_adam(converted)
    meta = checkpoint.read_metadata(converted)
    run = str(work / "run")
    mgr = ocp.CheckpointManager(os.path.join(run, "checkpoints"),
                                item_names=("params", "adam", "metadata"))
    for step in (3, 5):
        meta = dict(meta, iteration=step)
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                               adam=ocp.args.PyTreeSave(adam),
                                               metadata=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    os.makedirs(os.path.join(run, "checkpoints", "9.orbax-checkpoint-tmp-1", "params"))
    assert checkpoint.resolve_checkpoint_dir(run).endswith(os.path.join("checkpoints", "5"))
    back = str(work / "from_run")
    assert orbax_to_universal.main(["--load", run, "--save", back]) == 0
    assert os.path.basename(universal.resolve_universal_dir(back)) == "global_step5_universal"


def test_metadata_without_megatron_args_still_exports_a_loadable_checkpoint(converted, work):
    """A checkpoint that never came from Megatron (e.g. pretrained from scratch) records no
    Megatron args; the export derives the model's args from its config so it converts back."""
    import orbax.checkpoint as ocp

    meta = {k: v for k, v in checkpoint.read_metadata(converted).items() if k != "megatron_args"}
    run = str(work / "no_args_run")
    mgr = ocp.CheckpointManager(os.path.join(run, "checkpoints"),
                                item_names=("params", "adam", "metadata"))
    mgr.save(1, args=ocp.args.Composite(params=ocp.args.PyTreeSave(checkpoint.restore_params(converted)),
                                        adam=ocp.args.PyTreeSave(checkpoint.restore_adam(converted)),
                                        metadata=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    back, again = str(work / "no_args_universal"), str(work / "no_args_again")
    assert orbax_to_universal.main(["--load", run, "--save", back]) == 0
    assert universal_to_orbax.main(["--load", back, "--save", again]) == 0
    # The expected model is the one the independent writer put in the fixture (universal_writer:
    # its sizes, and the non-default rope theta and norm eps), not what the converter read back.
    b = checkpoint.model_config(again)
    assert (b.num_layers, b.hidden_size, b.num_heads, b.num_kv_heads, b.ffn_hidden_size,
            b.padded_vocab_size, b.rope_theta, b.norm_eps) == (L, H, NQ, NKV, F, VPAD, THETA, EPS)


# ----------------------------------------------------------------------------------------------
# HF export.


def test_hf_export_tensors_without_torch(universal_root, converted, work):
    """The safetensors hold the fixture's HF weights (vocab padded with zero rows), in every dtype,
    rounded as torch's .to(dtype) rounds (to nearest even, via ml_dtypes)."""
    import ml_dtypes
    from safetensors.numpy import load_file

    _, fx = universal_root
    for dtype in ("float32", "bfloat16"):
        dst = str(work / f"hf_np_{dtype}")
        assert orbax_to_hf.main(["--load", converted, "--save", dst, "--dtype", dtype]) == 0
        tensors = load_file(os.path.join(dst, "model.safetensors"))
        assert set(tensors) == set(fx["hf"])
        want = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        for name, w in fx["hf"].items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                w = np.concatenate([w, np.zeros((VPAD - V, H), np.float32)])
            assert tensors[name].dtype == want, name
            np.testing.assert_array_equal(tensors[name], w.astype(want), err_msg=name)


@pytest.mark.torch
def test_hf_export_logits(universal_root, converted, work, tmp_path):
    from transformers import LlamaForCausalLM

    _, fx = universal_root
    dst = str(work / "hf")
    assert orbax_to_hf.main(["--load", converted, "--save", dst]) == 0
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"],
            cfg["num_key_value_heads"]) == (THETA, EPS, VPAD, NKV)
    model = LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(9).integers(0, V, (2, SEQ)).astype(np.int32)
    with torch.no_grad():
        hf_logits = model(torch.tensor(tokens)).logits.numpy()
    ours = _agpt_logits(checkpoint.restore_params(converted), tokens, converted)
    np.testing.assert_allclose(hf_logits, ours, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(hf_logits, hf_reference_logits(fx["hf"], tokens), atol=1e-5)
    # Sharded output with an index, and a tokenizer folder copied along.
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    sharded = str(work / "hf_sharded")
    assert orbax_to_hf.main(["--load", converted, "--save", sharded, "--max-shard-gb", "0.0001",
                             "--tokenizer", str(tok)]) == 0
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert os.path.isfile(os.path.join(sharded, "tokenizer_config.json"))
    model2 = LlamaForCausalLM.from_pretrained(sharded, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(model2(torch.tensor(tokens)).logits.numpy(), hf_logits)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 1, nothing at --save.


def _break_missing_folder(root):
    shutil.rmtree(os.path.join(root, f"global_step{ITERATION}_universal", "zero",
                               "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    return "missing parameter folder"


def _break_shape(root):
    p = os.path.join(root, f"global_step{ITERATION}_universal", "zero",
                     "language_model.encoder.layers.1.self_attention.dense.weight", "fp32.pt")
    pt_archive.save({"param": np.zeros((H, H + 8), np.float32), "cat_dim": 0}, p)
    return "does not match the config"


def _break_truncated(root):
    p = os.path.join(root, f"global_step{ITERATION}_universal", "zero",
                     "language_model.encoder.layers.1.mlp.dense_h_to_4h.weight", "exp_avg.pt")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return "truncated"


def _break_tag(root):
    open(os.path.join(root, "latest_universal"), "w").write("global_step99_universal")
    return "does not exist"


def _break_not_universal(root):
    shutil.rmtree(root)
    os.makedirs(os.path.join(root, "global_step20"))
    open(os.path.join(root, "latest"), "w").write("global_step20")
    open(os.path.join(root, "global_step20",
                      "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb").write(b"x")
    return "not a universal"


@pytest.mark.parametrize("breaker", [_break_missing_folder, _break_shape, _break_truncated,
                                     _break_tag, _break_not_universal])
def test_bad_input(universal_root, tmp_path, capsys, breaker):
    src_root, _ = universal_root
    root = str(tmp_path / "src")
    shutil.copytree(src_root, root)
    expected = breaker(root)
    dst = str(tmp_path / "out")
    capsys.readouterr()
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert os.listdir(tmp_path) == ["src"] or sorted(os.listdir(tmp_path)) == ["src"]


def test_orbax_side_bad_input(tmp_path, capsys, converted):
    assert orbax_to_universal.main(["--load", str(tmp_path / "nothing"),
                                    "--save", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint directory" in err and str(tmp_path / "nothing") in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert orbax_to_hf.main(["--load", str(empty), "--save", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "not an agpt-jax checkpoint" in err and str(empty) in err, err
    assert orbax_to_hf.main(["--load", converted, "--save", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: already exists" in err, err
    assert sorted(os.listdir(tmp_path)) == ["empty"]
