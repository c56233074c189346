"""Memory-efficient causal GQA attention in plain JAX: online softmax over key blocks.

Runs on every backend, including Intel XPU at jax 0.5.0 where Pallas cannot lower (spec/jax-stack.md
§2-3). The forward pass walks query blocks (`lax.scan`) and, inside, key blocks (`lax.fori_loop`)
with the online-softmax recurrence of FlashAttention (Dao et al. 2022, Alg. 1; FlashAttention-2,
Dao 2023, §3.1), so the largest score tile alive is [batch, heads, block_q, block_k] and memory is
O(seq x block), not O(seq^2). Under `causal`, the key loop stops at the diagonal: blocks above it
are never computed.

The backward pass is a `jax.custom_vjp` that recomputes the probabilities from the saved
log-sum-exp instead of storing them (only q, k, v, out and the fp32 log-sum-exp are residuals). It
walks key blocks in the outer loop, so dK/dV of a block are finished in registers of the loop carry,
and adds each tile's dQ into an fp32 accumulator.

GQA: query head h reads kv head h // (heads // kv_heads) (Megatron's repeat_kv grouping, spec §4.2),
by viewing q as [batch, seq, kv_heads, group, head_dim]; K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf on masked scores: exp(MASK - m) underflows to exactly 0 once a row has
# seen one real key, and never produces inf - inf = nan (the FlashAttention kernels use the same).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Largest block used by `attention`; 512 keeps a [b, h, 512, 512] fp32 score tile (1 MiB per head)
# small while matmuls stay large enough to run near peak on CPU and XPU.
DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise loops.

    Attributes:
        block_q: query rows per outer step.
        block_k: key columns per inner step.
    """

    block_q: int
    block_k: int

    def __post_init__(self) -> None:
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive, got {self}")


def default_block_sizes(seq_len: int) -> BlockSizes:
    """Block sizes for a sequence length: one block up to 512, else 512 x 512 tiles.

    Args:
        seq_len: the sequence length of q and k.

    Returns:
        BlockSizes with block_q == block_k == min(512, seq_len rounded up to a multiple of 8).
    """
    block = min(DEFAULT_BLOCK, -(-seq_len // 8) * 8)
    return BlockSizes(block, block)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True) -> jax.Array:
    """Blockwise softmax attention with grouped K/V heads, blocks chosen from the shape.

    Args:
        q: [batch, seq, heads, head_dim], bf16 or fp32.
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads.
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position (blocks above the diagonal are skipped).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype; scale 1/sqrt(head_dim), fp32 softmax statistics.
    """
    return blockwise_attention(q, k, v, causal=causal, blocks=default_block_sizes(q.shape[1]))


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                        blocks: BlockSizes) -> jax.Array:
    """`attention` with explicit block sizes (tests use small blocks to exercise the tiling).

    Args:
        q: [batch, seq, heads, head_dim].
        k: [batch, seq, kv_heads, head_dim].
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.
        blocks: tile sizes; seq need not be a multiple of either (the tail is padded and masked).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype.
    """
    return _attention(q, k, v, causal, blocks.block_q, blocks.block_k)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shape facts shared by the forward and backward passes."""

    batch: int
    seq: int
    padded: int
    heads: int
    kv_heads: int
    head_dim: int
    block_q: int
    block_k: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def num_q_blocks(self) -> int:
        return self.padded // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.padded // self.block_k

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def _geometry(q: jax.Array, k: jax.Array, block_q: int, block_k: int) -> _Geometry:
    b, s, h, d = q.shape
    block_q = min(block_q, s)
    block_k = min(block_k, s)
    tile = math.lcm(block_q, block_k)
    return _Geometry(b, s, -(-s // tile) * tile, h, k.shape[2], d, block_q, block_k)


def _pad_seq(x: jax.Array, padded: int) -> jax.Array:
    """Zero-pads axis 1 (seq) to `padded` rows."""
    extra = padded - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _scores(geo: _Geometry, qb: jax.Array, kb: jax.Array, q_start: jax.Array,
            k_start: jax.Array, causal: bool) -> jax.Array:
    """Scaled, masked fp32 scores of one tile.

    Args:
        geo: shapes.
        qb: [batch, block_q, kv_heads, group, head_dim].
        kb: [batch, block_k, kv_heads, head_dim].
        q_start: first query position of the tile (int32 scalar).
        k_start: first key position of the tile (int32 scalar).
        causal: mask keys after the query.

    Returns:
        [batch, kv_heads, group, block_q, block_k] fp32.
    """
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
    s = s * geo.scale
    k_pos = k_start + jnp.arange(geo.block_k)
    keep = None
    if geo.padded != geo.seq:
        # Padded keys must not take part in any real row's softmax (matters when not causal).
        keep = (k_pos < geo.seq)[None, :]
    if causal:
        q_pos = q_start + jnp.arange(geo.block_q)
        diag = q_pos[:, None] >= k_pos[None, :]
        keep = diag if keep is None else keep & diag
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    return s


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, block_q: int,
             block_k: int) -> tuple[jax.Array, jax.Array]:
    """Forward pass; returns out [b, s, h, d] and lse [b, kv_heads, group, padded] fp32."""
    geo = _geometry(q, k, block_q, block_k)
    b, kvh, g, d = geo.batch, geo.kv_heads, geo.group, geo.head_dim
    bq, bk = geo.block_q, geo.block_k
    qg = _pad_seq(q, geo.padded).reshape(b, geo.padded, kvh, g, d)
    kp = _pad_seq(k, geo.padded)
    vp = _pad_seq(v, geo.padded)

    def q_step(carry: None, i: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        q_start = i * bq
        qb = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)

        def k_step(j: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
            acc, m, l = state
            kb = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
            vb = lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
            s = _scores(geo, qb, kb, q_start, j * bk, causal)
            m_new = jnp.maximum(m, s.max(axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * correction + p.sum(axis=-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vb,
                            preferred_element_type=jnp.float32)
            return acc * correction[..., None] + pv, m_new, l

        init = (jnp.zeros((b, kvh, g, bq, d), jnp.float32),
                jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g, bq), jnp.float32))
        # Causal: key blocks starting after this query block's last row are above the diagonal
        # and skipped (the loop bound), not masked.
        upper = (lax.div(q_start + bq + bk - 1, bk) if causal else geo.num_k_blocks)
        acc, m, l = lax.fori_loop(0, upper, k_step, init)
        out = jnp.einsum("bkgqd->bqkgd", acc / l[..., None]).astype(q.dtype)
        return carry, (out, m + jnp.log(l))

    _, (out, lse) = lax.scan(q_step, None, jnp.arange(geo.num_q_blocks, dtype=jnp.int32))
    # out: [nq, b, bq, kvh, g, d]; lse: [nq, b, kvh, g, bq].
    out = jnp.moveaxis(out, 0, 1).reshape(b, geo.padded, geo.heads, d)[:, :geo.seq]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, geo.padded)
    return out, lse


def _backward(causal: bool, block_q: int, block_k: int,
              res: tuple[jax.Array, ...], dout: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backward pass recomputing probabilities tile by tile (FlashAttention-2, Alg. 2)."""
    q, k, v, out, lse = res
    geo = _geometry(q, k, block_q, block_k)
    b, kvh, g, d = geo.batch, geo.kv_heads, geo.group, geo.head_dim
    bq, bk = geo.block_q, geo.block_k
    qg = _pad_seq(q, geo.padded).reshape(b, geo.padded, kvh, g, d)
    dog = _pad_seq(dout, geo.padded).reshape(b, geo.padded, kvh, g, d)
    kp = _pad_seq(k, geo.padded)
    vp = _pad_seq(v, geo.padded)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax-backward row term, fp32.
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = jnp.pad(delta, [(0, 0), (0, 0), (0, geo.padded - geo.seq)])
    delta = delta.reshape(b, kvh, g, geo.padded)

    def k_step(dq: jax.Array, j: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        k_start = j * bk
        kb = lax.dynamic_slice_in_dim(kp, k_start, bk, axis=1)
        vb = lax.dynamic_slice_in_dim(vp, k_start, bk, axis=1)

        def q_step(i: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
            dq, dk, dv = state
            q_start = i * bq
            qb = lax.dynamic_slice_in_dim(qg, q_start, bq, axis=1)
            dob = lax.dynamic_slice_in_dim(dog, q_start, bq, axis=1)
            lse_b = lax.dynamic_slice_in_dim(lse, q_start, bq, axis=3)
            delta_b = lax.dynamic_slice_in_dim(delta, q_start, bq, axis=3)
            s = _scores(geo, qb, kb, q_start, k_start, causal)
            p = jnp.exp(s - lse_b[..., None])
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), dob,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_b[..., None]) * geo.scale
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qb,
                                 preferred_element_type=jnp.float32)
            dq_tile = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), kb,
                                 preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, q_start, bq, axis=1) + dq_tile, q_start, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros((b, bk, kvh, d), jnp.float32)
        # Causal: query blocks ending before this key block are above the diagonal; skip them.
        lower = lax.div(k_start, bq) if causal else 0
        dq, dk, dv = lax.fori_loop(lower, geo.num_q_blocks, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros((b, geo.padded, kvh, g, d), jnp.float32)
    dq, (dk, dv) = lax.scan(k_step, dq0, jnp.arange(geo.num_k_blocks, dtype=jnp.int32))
    dq = dq.reshape(b, geo.padded, geo.heads, d)[:, :geo.seq].astype(q.dtype)
    # dk, dv: [nk, b, bk, kvh, d] -> [b, seq, kvh, d].
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, geo.padded, kvh, d)[:, :geo.seq].astype(k.dtype)
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, geo.padded, kvh, d)[:, :geo.seq].astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, block_q: int,
               block_k: int) -> jax.Array:
    return _forward(q, k, v, causal, block_q, block_k)[0]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, block_q: int,
                   block_k: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, causal, block_q, block_k)
    return out, (q, k, v, out, lse)


_attention.defvjp(_attention_fwd, _backward)
