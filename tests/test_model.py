"""The Flax GPT against HF transformers' LlamaForCausalLM (torch, CPU), an independent reference.

Weights are copied HF -> Flax with the HF<->Megatron correspondence of spec §4.7 (q/k/v/o, gate/up,
down, norms, embed, lm_head), so logits must agree to fp32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agpt_jax import model as model_lib
from torch_reference import llama_config, torch, transformers


def _hf_model(cfg: model_lib.GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = llama_config(cfg, initializer_range=0.05)
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to one; random norms exercise the scale too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return hf


def _params_from_hf(hf, cfg: model_lib.GPTConfig) -> dict:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    h, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def stack(fmt, fn):
        return np.stack([fn(sd[fmt.format(i)]) for i in range(cfg.num_layers)])

    lp = "model.layers.{}."
    return {
        "embed": {"embedding": sd["model.embed_tokens.weight"]},
        "layers": {
            "attn_norm": {"scale": stack(lp + "input_layernorm.weight", lambda w: w)},
            "attn": {
                "q": stack(lp + "self_attn.q_proj.weight", lambda w: w.T.reshape(h, nq, d)),
                "k": stack(lp + "self_attn.k_proj.weight", lambda w: w.T.reshape(h, nkv, d)),
                "v": stack(lp + "self_attn.v_proj.weight", lambda w: w.T.reshape(h, nkv, d)),
                "o": stack(lp + "self_attn.o_proj.weight", lambda w: w.T.reshape(nq, d, h)),
            },
            "mlp_norm": {"scale": stack(lp + "post_attention_layernorm.weight", lambda w: w)},
            "mlp": {
                "gate": stack(lp + "mlp.gate_proj.weight", lambda w: w.T),
                "up": stack(lp + "mlp.up_proj.weight", lambda w: w.T),
                "down": stack(lp + "mlp.down_proj.weight", lambda w: w.T),
            },
        },
        "final_norm": {"scale": sd["model.norm.weight"]},
        "lm_head": {"kernel": sd["lm_head.weight"].T},
    }


PARITY_CFG = model_lib.GPTConfig(
    num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, ffn_hidden_size=176,
    vocab_size=100, make_vocab_size_divisible_by=16, seq_length=32, rope_theta=5000.0,
    norm_eps=1e-6, compute_dtype="float32", remat="none")


@pytest.mark.torch
@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "full")])
def test_logits_and_loss_match_hf_llama(scan_layers: bool, remat: str):
    cfg = PARITY_CFG.replace(scan_layers=scan_layers, remat=remat)
    hf = _hf_model(cfg)
    params = _params_from_hf(hf, cfg)
    # The copied tree has exactly the model's structure and shapes.
    abstract = jax.eval_shape(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0))))
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.padded_vocab_size, size=(3, cfg.seq_length + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = model_lib.GPT(cfg).apply({"params": params}, jnp.asarray(inputs, jnp.int32))
    with torch.no_grad():
        out = hf(torch.from_numpy(inputs), labels=torch.from_numpy(tokens[:, :-1]))
        ref = out.logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-5)

    loss = jnp.mean(model_lib.cross_entropy(logits, jnp.asarray(labels)))
    with torch.no_grad():
        ref_loss = torch.nn.functional.cross_entropy(
            torch.from_numpy(ref).reshape(-1, ref.shape[-1]),
            torch.from_numpy(labels).reshape(-1)).item()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)


@pytest.mark.torch
def test_bf16_compute_stays_close_to_fp32_reference():
    cfg = PARITY_CFG.replace(compute_dtype="bfloat16")
    hf = _hf_model(cfg, seed=1)
    params = _params_from_hf(hf, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, cfg.seq_length))
    logits = model_lib.GPT(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    assert logits.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
        ref16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.from_numpy(tokens)).logits.float().numpy()
    # The model computes in bf16 (matmul inputs and outputs, residual adds; norms and softmax in
    # fp32), so it cannot match fp32 to fp32 rounding. The bound is the reference's own bf16
    # computation (the HF model cast to bfloat16, the same rounding points): ours may be at most
    # 25% further from the fp32 logits than it, in RMS and in the worst logit (the rounding order
    # differs). Here that error is ~2 units of the bf16 roundoff 2**-8 of the logits' RMS, so a 1%
    # error in a logit formula (adding in quadrature) exceeds the bound.
    ours, theirs = np.asarray(logits, np.float32) - ref, ref16 - ref
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(ours) <= 1.25 * rms(theirs), (rms(ours), rms(theirs))
    assert np.abs(ours).max() <= 1.25 * np.abs(theirs).max(), (np.abs(ours).max(),
                                                               np.abs(theirs).max())


def test_presets_have_megatron_parameter_counts():
    # spec §1.5: 2*32000*4096 + 32*177,217,536 + 4096; spec jax-stack §8 for bench_125m.
    assert model_lib.get_preset("agpt_7b").num_params() == 5_933_109_248
    assert model_lib.get_preset("bench_125m").num_params() == 124_668_672
    assert model_lib.get_preset("bench_125m").flops_per_token() == 713_687_040


def test_vocab_padding_follows_megatron():
    assert model_lib.vocab_size_with_padding(32000, 128, 1) == 32000
    assert model_lib.vocab_size_with_padding(100, 16, 1) == 112
    assert model_lib.vocab_size_with_padding(50257, 128, 2) == 50432


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=6), "not divisible by num_heads"),
    (dict(num_kv_heads=3), "not a multiple of num_kv_heads"),
    (dict(remat="sometimes"), "remat"),
    (dict(compute_dtype="fp8"), "compute_dtype"),
])
def test_impossible_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PARITY_CFG, **change)
