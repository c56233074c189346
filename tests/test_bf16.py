"""bf16 params and bf16 exports, against torch bf16 and HF transformers' LlamaForCausalLM.

- The Flax GPT with param_dtype and compute_dtype bfloat16 against LlamaForCausalLM run in torch
  bf16 on the same bf16 weights, both within a bound derived from bf16's precision of the fp32
  reference (the same weights upcast, HF in fp32).
- The HF export (`orbax_to_hf --dtype bfloat16`) of a training run's checkpoint writes BF16
  safetensors equal bit for bit to torch's `.to(torch.bfloat16)` of the params, from fp32 params
  (rounded to nearest even, ties included) and from bf16 params (copied).
- The universal export keeps fp32 master weights exactly (bf16 params upcast, fp32 params as they
  are), its `module` equals the master cast to the module's dtype, and converting back to Orbax
  gives the original params and moments bit for bit.

Weights are mapped HF <-> Flax here with the correspondence of spec §4.7, independently of the
converters (`_flax_from_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from agpt_jax import checkpoint
from agpt_jax import model as model_lib
from converters import orbax_to_hf, orbax_to_universal, universal_to_orbax
from converters import universal
from torch_reference import torch, transformers

pytestmark = pytest.mark.torch

CFG = model_lib.get_preset("tiny").replace(param_dtype="bfloat16", compute_dtype="bfloat16")
H, D, NQ, NKV = CFG.hidden_size, CFG.head_dim, CFG.num_heads, CFG.num_kv_heads
F, L, V, VPAD = CFG.ffn_hidden_size, CFG.num_layers, CFG.vocab_size, CFG.padded_vocab_size
BF16 = np.dtype(ml_dtypes.bfloat16)

# bf16 keeps 8 significant bits: a spacing of 2^-8 relative, so one rounding to nearest moves a
# value by at most 2^-9 of itself and two implementations that round at different points differ
# by up to 2^-8 per rounding. On the way to the logits each layer rounds about 12 times in either
# implementation (norm output; q, k, v; rotary; attention probabilities and output; o-proj;
# residual add; norm output; gate and up; silu(gate) * up; down; residual add), plus the final
# norm and the LM head: R = 12 L + 2 = 26 for the two layers. These errors have independent signs,
# so they add in quadrature: rms(difference) / rms(reference) <= sqrt(R) * 2^-8 = 0.020. The bound
# uses the full 2^-8 per rounding (twice the worst case of one rounding) as room for the
# amplification through softmax and the norms. Measured: 0.004-0.008 for the three pairs below; a
# transposed weight or a gate/up swap moves the logits by 0.5-0.9 of their rms, leaving out one
# norm's scale by 0.09, every norm's by 0.17.
ROUNDINGS = 12 * L + 2
BF16_RMS_TOL = math.sqrt(ROUNDINGS) * 2.0**-8


def _hf_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VPAD, H), "model.norm.weight": (H,),
              "lm_head.weight": (VPAD, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (NQ * D, H), p + "self_attn.k_proj.weight": (NKV * D, H),
            p + "self_attn.v_proj.weight": (NKV * D, H), p + "self_attn.o_proj.weight": (H, NQ * D),
            p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
            p + "mlp.down_proj.weight": (H, F), p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,)})
    return shapes


def _random_hf_weights(seed: int, dtype) -> dict[str, np.ndarray]:
    """HF-layout weights: linear weights of std 1/sqrt(fan_in) (every sublayer moves the logits),
    embedding std 1, norms 1 + 0.1 N(0, 1), padded vocab rows zero (as after a universal load:
    universal files keep only the real vocab rows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _hf_shapes().items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = (1.0 if "embed" in name else shape[1] ** -0.5) * rng.standard_normal(shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w[V:] = 0.0
        out[name] = w.astype(np.float32).astype(dtype)
    return out


def _flax_from_hf(hf: dict[str, np.ndarray]) -> dict:
    """The Flax params tree of HF-layout weights (spec §4.7; HF Linear weights are [out, in])."""

    def stack(name, fn):
        return np.stack([fn(hf[f"model.layers.{i}.{name}"]) for i in range(L)])

    return {
        "embed": {"embedding": hf["model.embed_tokens.weight"]},
        "layers": {
            "attn_norm": {"scale": stack("input_layernorm.weight", lambda w: w)},
            "attn": {
                "q": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(H, NQ, D)),
                "k": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(H, NKV, D)),
                "v": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(H, NKV, D)),
                "o": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(NQ, D, H)),
            },
            "mlp_norm": {"scale": stack("post_attention_layernorm.weight", lambda w: w)},
            "mlp": {
                "gate": stack("mlp.gate_proj.weight", lambda w: w.T),
                "up": stack("mlp.up_proj.weight", lambda w: w.T),
                "down": stack("mlp.down_proj.weight", lambda w: w.T),
            },
        },
        "final_norm": {"scale": hf["model.norm.weight"]},
        "lm_head": {"kernel": hf["lm_head.weight"].T},
    }


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    return {prefix: np.asarray(tree)}


def _torch_tensor(w: np.ndarray):
    """A numpy array (bf16 through ml_dtypes) as a torch tensor of the same dtype and bits."""
    w = np.ascontiguousarray(w)
    if w.dtype == BF16:
        return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(w)


def _torch_bf16_bits(w: np.ndarray) -> np.ndarray:
    """torch's own `.to(torch.bfloat16)` of w, as uint16 bit patterns."""
    t = _torch_tensor(w).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _hf_model(dtype):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VPAD, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=NQ, num_key_value_heads=NKV, head_dim=D,
        max_position_embeddings=CFG.seq_length, rms_norm_eps=CFG.norm_eps,
        rope_theta=CFG.rope_theta, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="eager")
    # Built under the default dtype, as from_pretrained(torch_dtype=...) builds it: the weights
    # take the dtype and the rotary inv_freq buffer stays fp32 (a .to(dtype) would round it).
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = transformers.LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    assert {b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")} == {
        torch.float32}
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def _agpt_logits(cfg: model_lib.GPTConfig, params: dict, tokens: np.ndarray):
    import jax
    import jax.numpy as jnp

    tree = jax.tree.map(jnp.asarray, params)
    return model_lib.GPT(cfg).apply({"params": tree}, jnp.asarray(tokens, jnp.int32))


# ----------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def bf16_hf_weights():
    return _random_hf_weights(seed=0, dtype=BF16)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, V, size=(2, CFG.seq_length)).astype(np.int64)


@pytest.fixture(scope="module")
def torch_logits(bf16_hf_weights, tokens):
    """HF logits on the bf16 weights: in torch bf16, and in fp32 on the same weights upcast."""
    out = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = _hf_model(dtype)
        model.load_state_dict({k: _torch_tensor(w).to(dtype) for k, w in bf16_hf_weights.items()},
                              strict=True)
        assert next(model.parameters()).dtype == dtype
        out[key] = _hf_logits(model, tokens)
    return out


# ----------------------------------------------------------------------------------------------
# bf16 params: logits against torch bf16.


def test_bf16_params_and_compute_match_torch_bf16(bf16_hf_weights, tokens, torch_logits):
    """param_dtype and compute_dtype bfloat16: every param is bf16, the logits are bf16, and they,
    HF's torch-bf16 logits and the fp32 reference are pairwise within BF16_RMS_TOL."""
    import flax.linen as nn
    import jax

    abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(CFG, jax.random.PRNGKey(0))))
    params = _flax_from_hf(bf16_hf_weights)
    shapes = {tuple(k.key for k in path): (v.shape, v.dtype)
              for path, v in jax.tree_util.tree_leaves_with_path(abstract)}
    assert shapes == {k: (v.shape, BF16) for k, v in _leaves(params).items()}

    logits = _agpt_logits(CFG, params, tokens)
    assert logits.dtype == BF16
    ours = np.asarray(logits, np.float32)
    bf16_torch, fp32_ref = torch_logits["bf16"], torch_logits["fp32"]
    errors = {"agpt vs torch bf16": _rel_rms(ours, bf16_torch),
              "agpt vs fp32 reference": _rel_rms(ours, fp32_ref),
              "torch bf16 vs fp32 reference": _rel_rms(bf16_torch, fp32_ref)}
    assert max(errors.values()) <= BF16_RMS_TOL, (errors, BF16_RMS_TOL)
    # Both really computed in bf16 (they are not the fp32 reference rounded once at the end).
    assert errors["agpt vs fp32 reference"] > 2.0**-10 and errors[
        "torch bf16 vs fp32 reference"] > 2.0**-10, errors


def test_bf16_params_with_fp32_compute_match_hf_fp32(bf16_hf_weights, tokens, torch_logits):
    """bf16 params under compute_dtype float32 are upcast exactly and nothing else is rounded:
    the logits equal HF fp32's on the upcast weights to fp32 rounding."""
    logits = _agpt_logits(CFG.replace(compute_dtype="float32"), _flax_from_hf(bf16_hf_weights),
                          tokens)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), torch_logits["fp32"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bf16 exports.


def _fp32_source_params() -> dict:
    """fp32 params with values bf16 cannot hold, including exact ties between two bf16 values
    (low 16 bits 0x8000, both parities), which round to the even neighbour."""
    hf = _random_hf_weights(seed=2, dtype=np.float32)
    emb = hf["model.embed_tokens.weight"]
    bits = emb[:V].view(np.uint32)
    bits[:8] = (bits[:8] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    assert np.any(bits[:8] >> 16 & 1) and np.any(~(bits[:8] >> 16) & 1)
    return _flax_from_hf(hf)


def _save_run(run: str, params: dict, cfg: model_lib.GPTConfig) -> dict:
    """A training run's checkpoint (agpt_jax.checkpoint.RunCheckpointer, as the loop saves it)
    holding `params` and Adam moments in the params' dtype, as optax keeps them."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    leaves = _leaves(params)

    def like(scale):
        out: dict = {}
        for path, w in leaves.items():
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            m = (scale * rng.standard_normal(w.shape)).astype(w.dtype)
            if path in (("embed", "embedding"),):
                m[V:] = 0
            if path == ("lm_head", "kernel"):
                m[:, V:] = 0
            node[path[-1]] = m
        return out

    mu, nu = like(1e-3), jax.tree.map(lambda x: np.abs(x) * np.asarray(1e-3, x.dtype), like(1e-3))
    adam = {"mu": mu, "nu": nu, "count": np.int32(7)}
    groups = [{"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": wd,
               "wd_mult": 1.0 if wd else 0.0, "lr_mult": 1.0} for wd in (0.1, 0.0)]
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "iteration": 7,
            "adam_step": 7, "has_optimizer_state": True, "model": dataclasses.asdict(cfg),
            "original_vocab_size": V, "padded_vocab_size": VPAD, "param_groups": groups}
    progress = checkpoint.TrainProgress(iteration=7, schedule_count=7,
                                      consumed_samples=0, data_start_iteration=0,
                                      consumed_tokens_per_corpus={})
    ckpt = checkpoint.RunCheckpointer(run, keep=1, async_save=False)
    ckpt.save(7, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, adam), progress,
              {}, meta, wait=True)
    return adam


def _safetensors_dtypes(path: str) -> dict[str, str]:
    """The dtype string of every tensor in a safetensors file's JSON header, read raw."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_exports_round_trip(param_dtype, bf16_hf_weights, tokens, torch_logits, tmp_path):
    """A run's checkpoint with fp32 or bf16 params:
    -> HF --dtype bfloat16: BF16 tensors equal torch's .to(bfloat16) of the params bit for bit
       (bf16 params: the HF model loaded in torch bf16 gives the torch-bf16 logits exactly);
    -> universal: fp32.pt holds the params exactly in fp32 and `module` the master cast to its
       own dtype; -> Orbax again: fp32 params and moments equal the original (upcast) bit for bit.
    """
    from safetensors.numpy import load_file

    from converters import megatron_layout

    cfg = CFG.replace(param_dtype=param_dtype)
    params = _flax_from_hf(bf16_hf_weights) if param_dtype == "bfloat16" else _fp32_source_params()
    source = _leaves(params)
    assert {w.dtype for w in source.values()} == {np.dtype(cfg.weight_dtype)}
    run = str(tmp_path / "run")
    adam = _save_run(run, params, cfg)

    # Orbax -> HF, bf16.
    hf_dir = str(tmp_path / "hf")
    assert orbax_to_hf.main(["--load", run, "--save", hf_dir, "--dtype", "bfloat16"]) == 0
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    st = os.path.join(hf_dir, "model.safetensors")
    assert set(_safetensors_dtypes(st).values()) == {"BF16"}
    hf = load_file(st)
    assert set(hf) == set(_hf_shapes())
    exported = _leaves(_flax_from_hf(hf))
    assert exported.keys() == source.keys()
    for path, w in source.items():
        assert exported[path].dtype == BF16, path
        np.testing.assert_array_equal(exported[path].view(np.uint16), _torch_bf16_bits(w),
                                      err_msg=".".join(path))
    if param_dtype == "bfloat16":
        model = transformers.LlamaForCausalLM.from_pretrained(
            hf_dir, torch_dtype=torch.bfloat16, attn_implementation="eager").eval()
        assert next(model.parameters()).dtype == torch.bfloat16
        np.testing.assert_array_equal(_hf_logits(model, tokens), torch_logits["bf16"])

    # Orbax -> universal: fp32 masters, module = master cast to the module's dtype.
    uni = str(tmp_path / "universal")
    assert orbax_to_universal.main(["--load", run, "--save", uni]) == 0
    folder = universal.resolve_universal_dir(uni)
    masters = {}
    for t in megatron_layout.megatron_tensors(cfg, megatron_layout.NameScheme.MODULE):
        sd = torch.load(os.path.join(folder, "zero", t.name, "fp32.pt"), weights_only=True)
        assert sd["param"].dtype == torch.float32, t.name
        masters[t.name] = sd["param"]
    up = lambda w: torch.from_numpy(np.asarray(w, np.float32))
    # Tensors whose Megatron layout is a plain transpose of the Flax leaf, checked directly.
    direct = {"language_model.embedding.word_embeddings.weight": up(params["embed"]["embedding"][:V]),
              "language_model.output_layer.weight": up(params["lm_head"]["kernel"].T[:V]),
              "language_model.encoder.final_layernorm.weight": up(params["final_norm"]["scale"])}
    for i in range(L):
        p = f"language_model.encoder.layers.{i}."
        direct[p + "mlp.dense_4h_to_h.weight"] = up(params["layers"]["mlp"]["down"][i].T)
        direct[p + "input_layernorm.weight"] = up(params["layers"]["attn_norm"]["scale"][i])
    for name, want in direct.items():
        assert torch.equal(masters[name].view(torch.int32), want.view(torch.int32)), name
    if param_dtype == "bfloat16":  # the masters are bf16 values: their low 16 bits are zero
        for name, m in masters.items():
            assert not torch.any(m.view(torch.int32) & 0xFFFF), name
    states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)
    lm = states["module"]["language_model"]
    module = {"language_model.embedding.word_embeddings.weight":
              lm["embedding"]["word_embeddings"]["weight"],
              "language_model.output_layer.weight": lm["output_layer"]["weight"],
              **{"language_model.encoder." + k: v for k, v in lm["encoder"].items()}}
    assert module.keys() == masters.keys()
    for name, w in module.items():
        assert w.dtype in (torch.float32, torch.bfloat16), name
        m = masters[name]
        if w.shape[0] != m.shape[0]:  # vocab tensors: V_pad rows, the padded ones zero
            assert w.shape[0] == VPAD and not torch.any(w[V:]), name
            w = w[:V]
        assert torch.equal(w, m.to(w.dtype)), name
        assert torch.equal(w.to(torch.bfloat16).view(torch.int16),
                           m.to(torch.bfloat16).view(torch.int16)), name

    # universal -> Orbax: the original params and moments, bit for bit (fp32 where stored).
    back = str(tmp_path / "back")
    assert universal_to_orbax.main(["--load", uni, "--save", back]) == 0
    back_params, back_adam = _leaves(checkpoint.restore_params(back)), checkpoint.restore_adam(back)
    assert back_params.keys() == source.keys()
    for path, w in source.items():
        got = back_params[path]
        assert got.dtype == np.float32, path
        np.testing.assert_array_equal(got.view(np.uint32),
                                      np.asarray(w, np.float32).view(np.uint32),
                                      err_msg=".".join(path))
        np.testing.assert_array_equal(got.astype(BF16).view(np.uint16), _torch_bf16_bits(w),
                                      err_msg=".".join(path))
    for key in ("mu", "nu"):
        got, want = _leaves(back_adam[key]), _leaves(adam[key])
        assert got.keys() == want.keys()
        for path, w in want.items():
            np.testing.assert_array_equal(got[path].view(np.uint32),
                                          np.asarray(w, np.float32).view(np.uint32),
                                          err_msg=f"{key}.{'.'.join(path)}")
    assert int(back_adam["count"]) == 7
