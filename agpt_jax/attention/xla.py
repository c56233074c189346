"""Reference causal GQA attention in plain jnp (materialises the [seq, seq] scores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True) -> jax.Array:
    """Softmax attention with grouped K/V heads.

    Args:
        q: [batch, seq, heads, head_dim].
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads.
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.

    Returns:
        [batch, seq, heads, head_dim] in q's dtype. Scores and softmax are computed in fp32; the
        scale is 1/sqrt(head_dim) (Megatron's norm_factor without layer scaling, spec §4.5). Query
        head h reads kv head h // (heads // kv_heads), the grouping of Megatron's repeat_kv (spec
        §4.2); K/V are not copied per query head, the heads are grouped instead.
    """
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    if causal:
        mask = jnp.tril(jnp.ones((s, k.shape[1]), dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)
