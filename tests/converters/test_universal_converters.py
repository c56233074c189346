"""Universal <-> Orbax <-> HF converters against an independent universal writer and HF Llama.

The fixture writer below follows the spec alone (§3.2, §3.5, §4.1-4.3, §7): it starts from HF
Llama weights (q_proj, k_proj, ..., [out, in]) and builds Megatron's tensors by the spec's rules,
pickling real Megatron and DeepSpeed objects from stand-in classes that the reader cannot import.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import random
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from agpt_jax import init_checkpoint as ic
from converters import orbax_to_hf, orbax_to_universal, universal_to_orbax
from converters import universal as uv

# Spec §7's tiny model: 2 layers, hidden 64, 4 heads, 2 kv heads, ffn 176, vocab 100 -> 112.
L, H, NQ, NKV, F, V, VPAD, SEQ = 2, 64, 4, 2, 176, 100, 112, 32
D = H // NQ
THETA, EPS = 500000.0, 1e-6  # non-default on purpose
ITERATION, STEP = 20, 20.0


# ----------------------------------------------------------------------------------------------
# Stand-in Megatron / DeepSpeed classes, importable only while pickling.


class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2


class DynamicLossScaler:
    def __init__(self) -> None:
        self.cur_scale = 65536.0
        self.cur_iter = 20
        self.scale_factor = 2.0


def _pickle_with_standins(obj, path: str) -> None:
    """torch.save with fake megatron/deepspeed modules in sys.modules, removed afterwards."""
    fakes = {
        "megatron": types.ModuleType("megatron"),
        "megatron.core": types.ModuleType("megatron.core"),
        "megatron.core.enums": types.ModuleType("megatron.core.enums"),
        "deepspeed": types.ModuleType("deepspeed"),
        "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
        "deepspeed.runtime.fp16": types.ModuleType("deepspeed.runtime.fp16"),
        "deepspeed.runtime.fp16.loss_scaler": types.ModuleType(
            "deepspeed.runtime.fp16.loss_scaler"),
    }
    assert not set(fakes) & set(sys.modules)
    fakes["megatron.core.enums"].ModelType = ModelType
    fakes["deepspeed.runtime.fp16.loss_scaler"].DynamicLossScaler = DynamicLossScaler
    saved = (ModelType.__module__, DynamicLossScaler.__module__, DynamicLossScaler.__qualname__)
    ModelType.__module__ = "megatron.core.enums"
    DynamicLossScaler.__module__ = "deepspeed.runtime.fp16.loss_scaler"
    sys.modules.update(fakes)
    try:
        torch.save(obj, path)
    finally:
        for name in fakes:
            del sys.modules[name]
        ModelType.__module__, DynamicLossScaler.__module__, _ = saved


# ----------------------------------------------------------------------------------------------
# The independent writer.


def make_hf_weights(seed: int) -> dict[str, np.ndarray]:
    """Random HF-Llama weights ([out, in]) with the original (unpadded) vocabulary."""
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    w = {"model.embed_tokens.weight": n(V, H), "lm_head.weight": n(V, H),
         "model.norm.weight": (1 + n(H)).astype(np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = n(NQ * D, H)
        w[p + "self_attn.k_proj.weight"] = n(NKV * D, H)
        w[p + "self_attn.v_proj.weight"] = n(NKV * D, H)
        w[p + "self_attn.o_proj.weight"] = n(H, NQ * D)
        w[p + "mlp.gate_proj.weight"] = n(F, H)
        w[p + "mlp.up_proj.weight"] = n(F, H)
        w[p + "mlp.down_proj.weight"] = n(H, F)
        w[p + "input_layernorm.weight"] = (1 + n(H)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + n(H)).astype(np.float32)
    return w


def megatron_from_hf(w: dict[str, np.ndarray], pipeline: bool) -> dict[str, np.ndarray]:
    """Megatron names -> tensors by the spec: QKV grouped [q x g, k, v] per kv head (§4.2),
    dense_h_to_4h = [gate; up] (§4.3); vocab tensors keep V rows (the universal form)."""
    g = NQ // NKV
    out = {}
    emb = ("1.word_embeddings.weight" if pipeline
           else "language_model.embedding.word_embeddings.weight")
    out[emb] = w["model.embed_tokens.weight"]
    for i in range(L):
        pre = f"{2 + i}." if pipeline else f"language_model.encoder.layers.{i}."
        hp = f"model.layers.{i}."
        q = w[hp + "self_attn.q_proj.weight"].reshape(NQ, D, H)
        k = w[hp + "self_attn.k_proj.weight"].reshape(NKV, D, H)
        v = w[hp + "self_attn.v_proj.weight"].reshape(NKV, D, H)
        rows = []
        for j in range(NKV):
            rows += [q[j * g + m] for m in range(g)] + [k[j], v[j]]
        out[pre + "input_layernorm.weight"] = w[hp + "input_layernorm.weight"]
        out[pre + "self_attention.query_key_value.weight"] = np.concatenate(rows, 0)
        out[pre + "self_attention.dense.weight"] = w[hp + "self_attn.o_proj.weight"]
        out[pre + "post_attention_layernorm.weight"] = w[hp + "post_attention_layernorm.weight"]
        out[pre + "mlp.dense_h_to_4h.weight"] = np.concatenate(
            [w[hp + "mlp.gate_proj.weight"], w[hp + "mlp.up_proj.weight"]], 0)
        out[pre + "mlp.dense_4h_to_h.weight"] = w[hp + "mlp.down_proj.weight"]
    out[f"{L + 2}.weight" if pipeline else "language_model.encoder.final_layernorm.weight"] = \
        w["model.norm.weight"]
    out[f"{L + 3}.lm_head.weight" if pipeline else "language_model.output_layer.weight"] = \
        w["lm_head.weight"]
    return out


def _megatron_args() -> argparse.Namespace:
    return argparse.Namespace(
        num_layers=L, hidden_size=H, num_attention_heads=NQ, num_key_value_heads=NKV,
        ffn_hidden_size=F, seq_length=SEQ, max_position_embeddings=SEQ, rope_theta=THETA,
        layernorm_epsilon=EPS, make_vocab_size_divisible_by=16, padded_vocab_size=VPAD,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, swiglu=True,
        normalization="rmsnorm", untie_embeddings_and_output_weights=True, add_bias_linear=False,
        model_type=ModelType.encoder_or_decoder, params_dtype=torch.bfloat16, bf16=True,
        save="/lus/flare/projects/run/checkpoints", lr=2e-4, min_lr=2e-5, seed=1234,
        consumed_train_samples=160, tokenizer_type="Llama2Tokenizer", init_method_std=0.02)


def write_universal_fixture(root: str, seed: int = 0, pipeline: bool = False,
                            extra_optimizer_state: dict | None = None) -> dict:
    """Write `root/latest_universal` + `root/global_step20_universal/` as ds_to_universal does."""
    hf = make_hf_weights(seed)
    meg = megatron_from_hf(hf, pipeline)
    rng = np.random.default_rng(seed + 1)
    tag = f"global_step{ITERATION}_universal"
    folder = os.path.join(root, tag)
    os.makedirs(os.path.join(folder, "zero"))
    moments = {}
    vocab_names = {n for n in meg if n.endswith("word_embeddings.weight") or
                   n.endswith("output_layer.weight") or n.endswith("lm_head.weight")}
    for name, w in meg.items():
        pdir = os.path.join(folder, "zero", name)
        os.makedirs(pdir)
        m = rng.standard_normal(w.shape).astype(np.float32) * 1e-3
        v = (rng.standard_normal(w.shape).astype(np.float32) * 1e-3) ** 2
        moments[name] = (m, v)
        for state, value in (("fp32", w), ("exp_avg", m), ("exp_avg_sq", v)):
            t = torch.tensor(value)
            if state == "fp32":
                t.requires_grad_(True)
            d = {"param": t, "cat_dim": 0}
            if "dense_h_to_4h" in name:
                d["param_n_sub_params"] = 2
            if name in vocab_names:
                d["vocab_tensor"] = True
            torch.save(d, os.path.join(pdir, f"{state}.pt"))
        torch.save(torch.tensor(STEP), os.path.join(pdir, "step.pt"))
    groups = [
        {"lr": 1.9e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
         "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
         "fused": None, "name": "wd_no_scale_lr", "wd_mult": 1.0, "lr_mult": 1.0,
         "params": list(range(2 + 4 * L))},
        {"lr": 1.9e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
         "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
         "fused": None, "name": "no_wd_no_scale_lr", "wd_mult": 0.0, "lr_mult": 1.0,
         "params": list(range(1 + 2 * L))},
    ]
    opt = {"loss_scaler": DynamicLossScaler(), "dynamic_loss_scale": True, "overflow": False,
           "clip_grad": 1.0, "zero_stage": 1, "group_paddings": [0, 0],
           "partition_count": [2, 2], "ds_version": "0.16.9", "param_groups": groups}
    opt.update(extra_optimizer_state or {})
    _pickle_with_standins(opt, os.path.join(folder, "zero", "optimizer_state.pt"))
    padded = {n: (np.concatenate([w, np.zeros((VPAD - V, H), np.float32)]) if n in vocab_names
                  else w) for n, w in meg.items()}
    module = {"language_model": {
        "embedding": {} if pipeline else {"word_embeddings": {"weight": torch.tensor(padded[
            "language_model.embedding.word_embeddings.weight"]).bfloat16()}},
        "encoder": {n[len("language_model.encoder."):]: torch.tensor(w).bfloat16()
                    for n, w in padded.items() if n.startswith("language_model.encoder.")},
    }}
    states = {
        "module": None if pipeline else module, "buffer_names": ["rotary_pos_emb.inv_freq"],
        "optimizer": None, "lr_scheduler": {"max_lr": 2e-4, "num_steps": 160,
                                            "lr_decay_style": "cosine"},
        "ds_config": {"train_batch_size": 8, "bf16": {"enabled": True}},
        "ds_version": "0.16.9", "args": _megatron_args(), "checkpoint_version": 3.0,
        "iteration": ITERATION, "tokens": 5120, "global_steps": ITERATION, "global_samples": 160,
        "skipped_steps": 0, "dp_world_size": 2, "mp_world_size": 1,
        "rng_state": [{"random_rng_state": random.getstate(),
                       "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
                       "rng_tracker_states": {}}],
        "universal_checkpoint_info": {
            "universal_checkpoint_version": 0.2, "original_vocab_size": V,
            "padded_vocab_size": VPAD,
            "vocabulary_parameter_patterns": sorted(vocab_names),
            "parameter_with_2_sub_params_cat_dim_0": [
                r"language_model.encoder.layers.\d+.mlp.dense_h_to_4h.weight"]},
    }
    _pickle_with_standins(states, os.path.join(folder, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest_universal"), "w") as f:
        f.write(tag)
    return {"hf": hf, "megatron": meg, "moments": moments, "groups": groups, "folder": folder}


# ----------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("conv")


@pytest.fixture(scope="module")
def universal(work):
    root = str(work / "src")
    os.makedirs(root)
    return root, write_universal_fixture(root)


@pytest.fixture(scope="module")
def converted(work, universal):
    root, _ = universal
    dst = str(work / "orbax")
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 0
    return dst


# ----------------------------------------------------------------------------------------------
# Reader and restricted unpickler.


def test_reader_needs_neither_megatron_nor_deepspeed(universal):
    root, _ = universal
    ckpt = uv.open_universal(root)
    assert "megatron" not in sys.modules and "deepspeed" not in sys.modules
    mt = ckpt.args["model_type"]
    assert isinstance(mt, uv.PickledObject)
    assert mt.pickled_class == "megatron.core.enums.ModelType" and mt.args == (1,)
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


def test_malicious_pickle_is_neutralised(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    root = str(tmp_path / "src")
    os.makedirs(root)
    write_universal_fixture(root, extra_optimizer_state={"evil": Evil()})
    ckpt = uv.open_universal(root)
    evil = ckpt.optimizer_state["evil"]
    assert isinstance(evil, uv.PickledObject)
    assert evil.pickled_class in ("posix.system", "nt.system")
    assert not marker.exists()


def test_given_config_mismatches_are_all_listed(universal):
    root, _ = universal
    from agpt_jax.model import get_preset

    given = get_preset("tiny").replace(hidden_size=128, rope_theta=10000.0)
    with pytest.raises(uv.UniversalCheckpointError) as e:
        uv.open_universal(root, given)
    msg = str(e.value)
    assert "hidden_size: given 128, checkpoint 64" in msg and "rope_theta" in msg
    assert "norm_eps" in msg  # tiny preset has 1e-5, the checkpoint 1e-6


# ----------------------------------------------------------------------------------------------
# universal -> Orbax.


def _hf_reference_logits(hf: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """HF LlamaForCausalLM on the same weights, vocab padded with zero rows as DeepSpeed does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VPAD, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=NQ, num_key_value_heads=NKV,
                      max_position_embeddings=SEQ, rms_norm_eps=EPS, rope_theta=THETA,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {k: torch.tensor(v) for k, v in hf.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(VPAD - V, H)])
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _agpt_logits(params, tokens: np.ndarray, directory: str) -> np.ndarray:
    import jax.numpy as jnp

    from agpt_jax.model import GPT

    cfg = ic.model_config(directory).replace(compute_dtype="float32", remat="none")
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens)))


def test_converted_logits_match_hf(universal, converted):
    _, fx = universal
    tokens = np.random.default_rng(3).integers(0, V, (2, SEQ)).astype(np.int32)
    params = ic.restore_params(converted)
    ours = _agpt_logits(params, tokens, converted)
    ref = _hf_reference_logits(fx["hf"], tokens)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    assert np.all(ours[..., V:] == 0)  # padded rows are zero after a universal load (spec §7)


def test_converted_metadata_and_moments(universal, converted):
    _, fx = universal
    meta = ic.read_metadata(converted)
    assert meta["iteration"] == ITERATION and meta["adam_step"] == STEP
    assert meta["original_vocab_size"] == V and meta["padded_vocab_size"] == VPAD
    assert meta["param_groups"][0]["lr"] == 1.9e-4 and meta["param_groups"][1]["weight_decay"] == 0
    assert meta["megatron_args"]["rope_theta"] == THETA
    adam = ic.restore_adam(converted)
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

    params = ic.restore_params(converted)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    spec = lambda x: P("fsdp") if x.shape[0] % 4 == 0 else P()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=NamedSharding(mesh, spec(x))),
                          params)
    sharded = ic.restore_params(converted, target)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
        assert isinstance(a, jax.Array) and a.sharding.mesh.shape == {"data": 2, "fsdp": 4}
        np.testing.assert_array_equal(np.asarray(a), b)


def test_no_optimizer_state(universal, work):
    root, _ = universal
    dst = str(work / "noopt")
    assert universal_to_orbax.main(["--load", root, "--save", dst, "--no-optimizer-state"]) == 0
    assert not ic.has_adam(dst) and ic.read_metadata(dst)["adam_step"] is None


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
    a = uv.resolve_universal_dir(a_root)
    b = uv.resolve_universal_dir(b_root)
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
    oa = uv.load_restricted(os.path.join(a, "zero", "optimizer_state.pt"))
    ob = torch.load(os.path.join(b, "zero", "optimizer_state.pt"), weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    for k in ("dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "group_paddings",
              "partition_count", "ds_version"):
        assert oa[k] == ob[k], k
    sa = uv.load_restricted(os.path.join(a, "mp_rank_00_model_states.pt"))
    sb = uv.load_restricted(os.path.join(b, "mp_rank_00_model_states.pt"))
    for k in ("iteration", "checkpoint_version", "universal_checkpoint_info", "tokens",
              "global_steps", "global_samples", "skipped_steps", "lr_scheduler", "ds_config",
              "ds_version", "buffer_names"):
        assert sa[k] == sb[k], k
    assert isinstance(sb["args"], argparse.Namespace)
    for k, v in vars(sa["args"]).items():
        if not isinstance(v, (uv.PickledObject, torch.dtype)):
            assert getattr(sb["args"], k) == v, k


def test_universal_orbax_universal_is_bit_exact(universal, converted, work):
    root, _ = universal
    back = str(work / "back")
    assert orbax_to_universal.main(["--load", converted, "--save", back]) == 0
    _assert_same_universal(root, back)
    folder = uv.resolve_universal_dir(back)
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

    for x, y in zip(jax.tree.leaves(ic.restore_adam(converted)),
                    jax.tree.leaves(ic.restore_adam(again))):
        np.testing.assert_array_equal(x, y)


def test_pipeline_names_round_trip(tmp_path):
    root = str(tmp_path / "pipe")
    os.makedirs(root)
    fx = write_universal_fixture(root, seed=5, pipeline=True)
    ckpt = uv.open_universal(root)
    assert ckpt.scheme.value == "pipeline"
    dst = str(tmp_path / "orbax")
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 0
    tokens = np.random.default_rng(4).integers(0, V, (1, SEQ)).astype(np.int32)
    np.testing.assert_allclose(_agpt_logits(ic.restore_params(dst), tokens, dst),
                               _hf_reference_logits(fx["hf"], tokens), atol=2e-4, rtol=1e-4)
    back = str(tmp_path / "back")
    assert orbax_to_universal.main(["--load", dst, "--save", back]) == 0
    _assert_same_universal(root, back)
    folder = uv.resolve_universal_dir(back)
    layer = torch.load(os.path.join(folder, f"layer_{L + 3:02d}-model_00-model_states.pt"),
                       weights_only=True)
    assert layer["lm_head.weight"].shape == (VPAD, H)


def test_project_writer_fixture_round_trip(tmp_path):
    """A universal checkpoint from the project's own writer converts to exactly its params."""
    from agpt_jax.model import get_preset
    from converters import megatron_layout as ml

    cfg = get_preset("tiny").replace(num_layers=3)
    rng = np.random.default_rng(7)
    tree = {path: rng.standard_normal(shape).astype(np.float32)
            for path, shape in ml.flax_shapes(cfg).items()}
    for path in (ml.EMBED,):
        tree[path][cfg.vocab_size:] = 0  # universal files cannot hold padded rows
    tree[ml.LM_HEAD][:, cfg.vocab_size:] = 0

    def source(t, state):
        parts = {p: (tree[p][t.layer] if ml.is_stacked(p) else tree[p])
                 for p in ml.flax_paths_of(t.kind)}
        w = ml.from_flax(t, parts, cfg)
        return w if state == "fp32" else w * (0.5 if state == "exp_avg" else 0.25)

    contents = orbax_to_universal.UniversalContents(
        config=cfg, scheme=ml.NameScheme.MODULE, iteration=7, step=7.0,
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
    params = ic.restore_params(dst)
    adam = ic.restore_adam(dst)
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

    params, adam = ic.restore_params(converted), ic.restore_adam(converted)
    meta = ic.read_metadata(converted)
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
    assert ic.resolve_checkpoint_dir(run).endswith(os.path.join("checkpoints", "5"))
    back = str(work / "from_run")
    assert orbax_to_universal.main(["--load", run, "--save", back]) == 0
    assert os.path.basename(uv.resolve_universal_dir(back)) == "global_step5_universal"


def test_metadata_without_megatron_args_still_exports_a_loadable_checkpoint(converted, work):
    """A checkpoint that never came from Megatron (e.g. pretrained from scratch) records no
    Megatron args; the export derives the model's args from its config so it converts back."""
    import orbax.checkpoint as ocp

    meta = {k: v for k, v in ic.read_metadata(converted).items() if k != "megatron_args"}
    run = str(work / "no_args_run")
    mgr = ocp.CheckpointManager(os.path.join(run, "checkpoints"),
                                item_names=("params", "adam", "metadata"))
    mgr.save(1, args=ocp.args.Composite(params=ocp.args.PyTreeSave(ic.restore_params(converted)),
                                        adam=ocp.args.PyTreeSave(ic.restore_adam(converted)),
                                        metadata=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    back, again = str(work / "no_args_universal"), str(work / "no_args_again")
    assert orbax_to_universal.main(["--load", run, "--save", back]) == 0
    assert universal_to_orbax.main(["--load", back, "--save", again]) == 0
    shape_fields = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
                    "padded_vocab_size", "rope_theta", "norm_eps")
    a, b = ic.model_config(converted), ic.model_config(again)
    assert [getattr(a, f) for f in shape_fields] == [getattr(b, f) for f in shape_fields]


# ----------------------------------------------------------------------------------------------
# HF export.


def test_hf_export_logits(universal, converted, work, tmp_path):
    from transformers import LlamaForCausalLM

    _, fx = universal
    dst = str(work / "hf")
    assert orbax_to_hf.main(["--load", converted, "--save", dst]) == 0
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["vocab_size"],
            cfg["num_key_value_heads"]) == (THETA, EPS, VPAD, NKV)
    model = LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(9).integers(0, V, (2, SEQ)).astype(np.int32)
    with torch.no_grad():
        hf_logits = model(torch.tensor(tokens)).logits.numpy()
    ours = _agpt_logits(ic.restore_params(converted), tokens, converted)
    np.testing.assert_allclose(hf_logits, ours, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(hf_logits, _hf_reference_logits(fx["hf"], tokens), atol=1e-5)
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
    torch.save({"param": torch.zeros(H, H + 8), "cat_dim": 0}, p)
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
def test_bad_input(universal, tmp_path, capsys, breaker):
    src_root, _ = universal
    root = str(tmp_path / "src")
    shutil.copytree(src_root, root)
    expected = breaker(root)
    dst = str(tmp_path / "out")
    capsys.readouterr()
    assert universal_to_orbax.main(["--load", root, "--save", dst]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert os.listdir(tmp_path) == ["src"] or sorted(os.listdir(tmp_path)) == ["src"]


def test_orbax_side_bad_input(tmp_path, capsys, converted):
    assert orbax_to_universal.main(["--load", str(tmp_path / "nothing"),
                                    "--save", str(tmp_path / "u")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert orbax_to_hf.main(["--load", str(empty), "--save", str(tmp_path / "h")]) == 1
    assert "not an agpt-jax checkpoint" in capsys.readouterr().err
    assert orbax_to_hf.main(["--load", converted, "--save", str(empty)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["empty"]
