"""Memory-efficient causal GQA attention in plain JAX: online softmax over key blocks.

Runs on every backend, including Intel XPU at jax 0.5.0 where Pallas cannot lower (spec/jax-stack.md
§2-3). The forward pass walks query blocks (`lax.scan`) and, inside, key blocks (`lax.fori_loop`)
with the online-softmax recurrence of FlashAttention (Dao et al. 2022, Alg. 1; FlashAttention-2,
Dao 2023, §3.1), so the largest score tile alive is [batch, heads, block_q, block_k] and memory is
O(seq x block), not O(seq^2). Under `causal`, the key loop stops at the diagonal: blocks above it
are never computed, and only tiles that touch the diagonal (or hold padded keys) build a mask.

Layout: the query heads that share a K/V head become the rows of one matmul (q is viewed as
[batch, kv_heads, seq * group, head_dim], position-major), so a score tile is a single batched
matmul with block_q * group rows, K/V are never repeated (Megatron's repeat_kv grouping: query
head h reads kv head h // group, spec §4.2), and every tile slice is contiguous.

The backward pass is a `jax.custom_vjp` that recomputes the probabilities from the saved
log-sum-exp instead of storing them (only q, k, v, out and the fp32 log-sum-exp are residuals). It
walks key blocks in the outer loop, so dK/dV of a block are finished in registers of the loop carry,
and adds each tile's dQ into an fp32 accumulator.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from agpt_jax.runtime import Capabilities, capabilities_for

# Finite stand-in for -inf on masked scores: exp(MASK - m) underflows to exactly 0 once a row has
# seen one real key, and never produces inf - inf = nan (the FlashAttention kernels use the same).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The largest block `attention` uses is the platform's (Capabilities.blockwise_block: 512 on
# accelerators, 256 on CPU; the measurements are in agpt_jax/runtime/capabilities.py).


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise loops.

    Attributes:
        block_q: query positions per outer step (times the query heads per K/V head: the rows of
            one score tile).
        block_k: key columns per inner step.
    """

    block_q: int
    block_k: int

    def __post_init__(self) -> None:
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive, got {self}")


def default_block_sizes(seq_len: int, platform: str | Capabilities = "xpu") -> BlockSizes:
    """Block sizes for a sequence length: square tiles, one block when it fits.

    Where the platform asks for it (``blockwise_split_single_block``: CPU) a sequence is always
    cut into at least two blocks: with a single block XLA's CPU runtime fuses the online-softmax
    update into the P V matmul as a oneDNN broadcast post-op that runs about 80x slower (0.85 s
    instead of 11 ms forward + backward at seq 256, 8 / 2 heads, head_dim 128).

    Args:
        seq_len: the sequence length of q and k.
        platform: a Capabilities or a target's name ("cpu" | "gpu" | "xpu" | "tpu"): its
            ``blockwise_block`` is the largest block (256 on CPU, 512 elsewhere).

    Returns:
        BlockSizes with block_q == block_k == min(block, seq_len rounded up to a multiple of 8),
        halved (on CPU) when that would be a single block.
    """
    caps = capabilities_for(platform)
    block = min(caps.blockwise_block, -(-seq_len // 8) * 8)
    if caps.blockwise_split_single_block and block >= seq_len and seq_len > 8:
        block = -(-seq_len // 16) * 8
    return BlockSizes(block, block)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              platform: str | Capabilities = "xpu") -> jax.Array:
    """Blockwise softmax attention with grouped K/V heads, blocks chosen from the shape.

    Args:
        q: [batch, seq, heads, head_dim], bf16 or fp32.
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads.
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position (blocks above the diagonal are skipped).
        platform: a Capabilities or a target's name ("cpu" | "gpu" | "xpu" | "tpu"): picks the
            tile size (`default_block_sizes`).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype; scale 1/sqrt(head_dim), fp32 softmax statistics.
    """
    return blockwise_attention(q, k, v, causal=causal,
                               blocks=default_block_sizes(q.shape[1], platform))


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


def _rows(geo: _Geometry, x: jax.Array) -> jax.Array:
    """[b, seq, heads, ...] -> [b, kv_heads, padded * group, ...]: query heads as matmul rows.

    Row r of kv head k is position r // group, query head k * group + r % group, so one tile's
    scores for all heads sharing a K/V head are a single matmul with block_q * group rows.
    """
    b, kvh, g = geo.batch, geo.kv_heads, geo.group
    x = _pad_seq(x, geo.padded)
    tail = x.shape[3:]
    x = x.reshape(b, geo.padded, kvh, g, *tail)
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(b, kvh, geo.padded * g, *tail)


def _unrows(geo: _Geometry, x: jax.Array) -> jax.Array:
    """Inverse of `_rows`, dropping the padding: -> [b, seq, heads, ...]."""
    b, kvh, g = geo.batch, geo.kv_heads, geo.group
    tail = x.shape[3:]
    x = x.reshape(b, kvh, geo.padded, g, *tail)
    x = jnp.moveaxis(x, 1, 2).reshape(b, geo.padded, geo.heads, *tail)
    return x[:, :geo.seq]


def _heads_first(geo: _Geometry, x: jax.Array) -> jax.Array:
    """K or V [b, seq, kv_heads, d] -> [b, kv_heads, padded, d]."""
    return jnp.swapaxes(_pad_seq(x, geo.padded), 1, 2)


def _matmul(spec: str, a: jax.Array, b: jax.Array, *, exact: bool) -> jax.Array:
    """A tile matmul with an fp32 result.

    `exact` keeps the fp32 product of bf16 inputs (scores, dP: softmax and its backward subtract
    nearly equal numbers). Otherwise the product is rounded to the inputs' dtype and then widened,
    as a bf16 matmul would return it: XLA's CPU runtime runs bf16 x bf16 -> bf16 on oneDNN about
    2.5x faster than bf16 x bf16 -> fp32, and these products (P V, dV, dK, dQ tiles) are summed in
    fp32 and rounded to bf16 at the end anyway.
    """
    if exact:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, a, b).astype(jnp.float32)


def _scores(geo: _Geometry, qb: jax.Array, kb: jax.Array, q_start: jax.Array,
            k_start: jax.Array, causal: bool, masked: bool) -> jax.Array:
    """Scaled fp32 scores of one tile, masked when the tile needs it.

    Args:
        geo: shapes.
        qb: [batch, kv_heads, block_q * group, head_dim] (`_rows` layout).
        kb: [batch, kv_heads, block_k, head_dim].
        q_start: first query position of the tile (int32 scalar).
        k_start: first key position of the tile (int32 scalar).
        causal: mask keys after the query.
        masked: whether this tile can hold a masked entry (on the diagonal, or holding padded
            keys); tiles wholly below the diagonal skip the mask.

    Returns:
        [batch, kv_heads, block_q * group, block_k] fp32.
    """
    s = _matmul("bkmd,bksd->bkms", qb, kb, exact=True) * geo.scale
    if not masked:
        return s
    k_pos = k_start + jnp.arange(geo.block_k)
    keep = None
    if geo.padded != geo.seq and not causal:
        # Padded keys must not take part in any real row's softmax. Under causal they sit after
        # every real query, so the causal mask already removes them.
        keep = (k_pos < geo.seq)[None, :]
    if causal:
        q_pos = q_start + jnp.arange(geo.block_q * geo.group) // geo.group
        diag = q_pos[:, None] >= k_pos[None, :]
        keep = diag if keep is None else keep & diag
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    return s


def _key_ranges(geo: _Geometry, q_start: jax.Array, causal: bool
                ) -> tuple[jax.Array, jax.Array]:
    """For a query block: key blocks [0, free) need no mask, [free, upper) do, the rest are skipped.

    Under `causal`, key blocks starting after the block's last query are above the diagonal and
    never computed (the loop bound), not masked.
    """
    if causal:
        free = lax.div(q_start + 1, geo.block_k)
        upper = jnp.minimum(lax.div(q_start + geo.block_q + geo.block_k - 1, geo.block_k),
                            geo.num_k_blocks)
        return free, upper
    return jnp.int32(geo.seq // geo.block_k), jnp.int32(geo.num_k_blocks)


def _query_ranges(geo: _Geometry, k_start: jax.Array, j: jax.Array, causal: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """For a key block: query blocks [lower, mid) need a mask, [mid, n) do not; [0, lower) skip."""
    if causal:
        lower = lax.div(k_start, geo.block_q)
        mid = jnp.minimum(lax.div(k_start + geo.block_k + geo.block_q - 2, geo.block_q),
                          geo.num_q_blocks)
        return lower, mid
    # Non-causal: only key blocks holding padded keys need the mask, for every query block.
    padded_keys = j >= geo.seq // geo.block_k
    return jnp.int32(0), jnp.where(padded_keys, geo.num_q_blocks, 0).astype(jnp.int32)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, block_q: int,
             block_k: int) -> tuple[jax.Array, jax.Array]:
    """Forward pass; returns out [b, s, h, d] and lse [b, kv_heads, padded * group] fp32."""
    geo = _geometry(q, k, block_q, block_k)
    b, kvh, d = geo.batch, geo.kv_heads, geo.head_dim
    rows = geo.block_q * geo.group
    qr = _rows(geo, q)
    kh = _heads_first(geo, k)
    vh = _heads_first(geo, v)

    def q_step(carry: None, i: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        q_start = i * geo.block_q
        qb = lax.dynamic_slice_in_dim(qr, i * rows, rows, axis=2)

        def k_step(masked: bool):
            def step(j: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
                acc, m, l = state
                k_start = j * geo.block_k
                kb = lax.dynamic_slice_in_dim(kh, k_start, geo.block_k, axis=2)
                vb = lax.dynamic_slice_in_dim(vh, k_start, geo.block_k, axis=2)
                s = _scores(geo, qb, kb, q_start, k_start, causal, masked)
                m_new = jnp.maximum(m, s.max(axis=-1))
                correction = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                l = l * correction + p.sum(axis=-1)
                pv = _matmul("bkms,bksd->bkmd", p.astype(v.dtype), vb, exact=False)
                return acc * correction[..., None] + pv, m_new, l
            return step

        state = (jnp.zeros((b, kvh, rows, d), jnp.float32),
                 jnp.full((b, kvh, rows), -jnp.inf, jnp.float32),
                 jnp.zeros((b, kvh, rows), jnp.float32))
        free, upper = _key_ranges(geo, q_start, causal)
        state = lax.fori_loop(0, free, k_step(False), state)
        acc, m, l = lax.fori_loop(free, upper, k_step(True), state)
        return carry, ((acc / l[..., None]).astype(q.dtype), m + jnp.log(l))

    _, (out, lse) = lax.scan(q_step, None, jnp.arange(geo.num_q_blocks, dtype=jnp.int32))
    # out: [nq, b, kvh, rows, d]; lse: [nq, b, kvh, rows] -> row layout over the padded seq.
    out = jnp.moveaxis(out, 0, 2).reshape(b, kvh, geo.padded * geo.group, d)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, kvh, geo.padded * geo.group)
    return _unrows(geo, out), lse


def _backward(causal: bool, block_q: int, block_k: int,
              res: tuple[jax.Array, ...], dout: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backward pass recomputing probabilities tile by tile (FlashAttention-2, Alg. 2)."""
    q, k, v, out, lse = res
    geo = _geometry(q, k, block_q, block_k)
    b, kvh, d = geo.batch, geo.kv_heads, geo.head_dim
    rows = geo.block_q * geo.group
    qr = _rows(geo, q)
    dor = _rows(geo, dout)
    kh = _heads_first(geo, k)
    vh = _heads_first(geo, v)
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax-backward row term, fp32. A
    # multiply-and-sum, not an einsum: XLA's CPU runtime turned the einsum into a oneDNN matmul
    # of [1, head_dim] x [head_dim, 1] per row (2.6 ms per bench_125m layer).
    delta = _rows(geo, jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1))

    def k_step(dq: jax.Array, j: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        k_start = j * geo.block_k
        kb = lax.dynamic_slice_in_dim(kh, k_start, geo.block_k, axis=2)
        vb = lax.dynamic_slice_in_dim(vh, k_start, geo.block_k, axis=2)

        def q_step(masked: bool):
            def step(i: jax.Array, state: tuple[jax.Array, jax.Array, jax.Array]
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
                dq, dk, dv = state
                r0 = i * rows
                qb = lax.dynamic_slice_in_dim(qr, r0, rows, axis=2)
                dob = lax.dynamic_slice_in_dim(dor, r0, rows, axis=2)
                lse_b = lax.dynamic_slice_in_dim(lse, r0, rows, axis=2)
                delta_b = lax.dynamic_slice_in_dim(delta, r0, rows, axis=2)
                s = _scores(geo, qb, kb, i * geo.block_q, k_start, causal, masked)
                p = jnp.exp(s - lse_b[..., None])
                dv = dv + _matmul("bkms,bkmd->bksd", p.astype(dout.dtype), dob, exact=False)
                dp = _matmul("bkmd,bksd->bkms", dob, vb, exact=True)
                ds = (p * (dp - delta_b[..., None]) * geo.scale).astype(q.dtype)
                dk = dk + _matmul("bkms,bkmd->bksd", ds, qb, exact=False)
                dq_tile = _matmul("bkms,bksd->bkmd", ds, kb, exact=False)
                dq = lax.dynamic_update_slice_in_dim(
                    dq, lax.dynamic_slice_in_dim(dq, r0, rows, axis=2) + dq_tile, r0, axis=2)
                return dq, dk, dv
            return step

        zeros = jnp.zeros((b, kvh, geo.block_k, d), jnp.float32)
        lower, mid = _query_ranges(geo, k_start, j, causal)
        state = lax.fori_loop(lower, mid, q_step(True), (dq, zeros, zeros))
        dq, dk, dv = lax.fori_loop(mid, geo.num_q_blocks, q_step(False), state)
        return dq, (dk, dv)

    dq0 = jnp.zeros((b, kvh, geo.padded * geo.group, d), jnp.float32)
    dq, (dk, dv) = lax.scan(k_step, dq0, jnp.arange(geo.num_k_blocks, dtype=jnp.int32))
    dq = _unrows(geo, dq).astype(q.dtype)
    # dk, dv: [nk, b, kvh, bk, d] -> [b, seq, kvh, d].
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kvh, geo.padded, d)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kvh, geo.padded, d)
    dk = jnp.swapaxes(dk, 1, 2)[:, :geo.seq].astype(k.dtype)
    dv = jnp.swapaxes(dv, 1, 2)[:, :geo.seq].astype(v.dtype)
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
