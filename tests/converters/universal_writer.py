"""An independent writer of DeepSpeed universal checkpoints (torch.save), and the tiny model's data.

It follows the spec alone (§3.2, §3.5, §4.1-4.3, §7): it starts from HF Llama weights (q_proj,
k_proj, ..., [out, in]) and builds Megatron's tensors by the spec's rules, pickling real Megatron
and DeepSpeed objects from stand-in classes that the reader cannot import. The tensors come from
numpy generators (`fixture_tensors`), so a test without torch can rebuild what the committed
fixture holds; only writing needs torch.

    PYTHONPATH=tests python tests/converters/universal_writer.py tests/fixtures/universal_tiny

rewrites the committed fixture (seed 0) with `reference.npz`: the token batch and the logits HF
transformers' LlamaForCausalLM (torch, fp32) computes on it.
"""

from __future__ import annotations

import argparse
import enum
import os
import random
import sys
import types

import numpy as np

from torch_reference import torch

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


def fixture_tensors(seed: int = 0, pipeline: bool = False) -> dict:
    """HF weights, their Megatron tensors and the Adam moments the fixture of `seed` holds."""
    hf = make_hf_weights(seed)
    meg = megatron_from_hf(hf, pipeline)
    rng = np.random.default_rng(seed + 1)
    moments = {}
    for name, w in meg.items():
        m = rng.standard_normal(w.shape).astype(np.float32) * 1e-3
        v = (rng.standard_normal(w.shape).astype(np.float32) * 1e-3) ** 2
        moments[name] = (m, v)
    return {"hf": hf, "megatron": meg, "moments": moments}


def write_universal_fixture(root: str, seed: int = 0, pipeline: bool = False,
                            extra_optimizer_state: dict | None = None) -> dict:
    """Write `root/latest_universal` + `root/global_step20_universal/` as ds_to_universal does."""
    fx = fixture_tensors(seed, pipeline)
    hf, meg, moments = fx["hf"], fx["megatron"], fx["moments"]
    tag = f"global_step{ITERATION}_universal"
    folder = os.path.join(root, tag)
    os.makedirs(os.path.join(folder, "zero"))
    vocab_names = {n for n in meg if n.endswith("word_embeddings.weight") or
                   n.endswith("output_layer.weight") or n.endswith("lm_head.weight")}
    for name, w in meg.items():
        pdir = os.path.join(folder, "zero", name)
        os.makedirs(pdir)
        m, v = moments[name]
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
        "rng_state": [{"random_rng_state": random.Random(seed).getstate(),
                       "np_rng_state": np.random.RandomState(seed).get_state(),
                       "torch_rng_state": torch.Generator().manual_seed(seed).get_state(),
                       "cuda_rng_state": None,
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




def hf_reference_logits(hf: dict[str, np.ndarray], tokens: np.ndarray,
                        dtype: str = "float32") -> np.ndarray:
    """HF LlamaForCausalLM on the same weights, vocab padded with zero rows as DeepSpeed does."""
    from torch_reference import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VPAD, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=NQ, num_key_value_heads=NKV, max_position_embeddings=SEQ,
        rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    sd = {k: torch.tensor(v) for k, v in hf.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(VPAD - V, H)])
    model.load_state_dict(sd, strict=True)
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


#: The token batch of the committed fixture's reference logits.
def reference_tokens() -> np.ndarray:
    return np.random.default_rng(3).integers(0, V, (2, SEQ)).astype(np.int32)


def write_committed_fixture(root: str) -> None:
    """The committed fixture: the seed-0 checkpoint and reference.npz (tokens, HF logits)."""
    os.makedirs(root)
    fx = write_universal_fixture(root, seed=0)
    tokens = reference_tokens()
    np.savez(os.path.join(root, "reference.npz"), tokens=tokens,
             hf_logits=hf_reference_logits(fx["hf"], tokens))



def with_shape(name: str, **dims):
    """A private copy of this module with other model shape constants (L, H, NQ, NKV, F, V,
    VPAD, SEQ; D follows from H // NQ); a separate module object keeps the change away from the
    tests that import the shared one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, __file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in dims.items():
        assert hasattr(module, key), key
        setattr(module, key, value)
    module.D = module.H // module.NQ
    return module

if __name__ == "__main__":
    import sys

    from absl import flags

    from agpt_jax import cli

    _, rest = cli.parse_args(flags.FlagValues(), None,
                             __doc__ + "\nusage: universal_writer.py OUT (a folder to create)")
    if len(rest) != 1:
        print("error: pass one OUT folder (it must not exist)", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    write_committed_fixture(rest[0])
