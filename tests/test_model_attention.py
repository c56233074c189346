"""The model computes the same logits and gradients with every attention implementation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agpt_jax import model as model_lib

CFG = model_lib.GPTConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=176, vocab_size=100, make_vocab_size_divisible_by=16,
                          seq_length=24, compute_dtype="float32", remat="none")


def _loss_and_grads(impl: str):
    cfg = CFG.replace(attention=impl)
    params = nn.unbox(model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.seq_length + 1), 0, cfg.vocab_size)

    def loss_fn(p):
        logits = model_lib.GPT(cfg).apply({"params": p}, tokens[:, :-1])
        return jnp.mean(model_lib.cross_entropy(logits, tokens[:, 1:])), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, logits, grads


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads("xla")


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_logits_and_grads_match_xla(reference, impl):
    ref_loss, ref_logits, ref_grads = reference
    loss, logits, grads = _loss_and_grads(impl)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(np.max(np.abs(np.asarray(r)))) + 1e-12
        err = float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
        assert err <= 1e-4 * scale, (jax.tree_util.keystr(path), err, scale)
