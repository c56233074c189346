"""Flash attention with GQA as Pallas kernels: Triton on CUDA GPUs, interpret mode elsewhere.

The kernels of jax 0.5.0 (`jax.experimental.pallas.ops.gpu.attention.mha`) have no GQA: passing
fewer kv heads silently computes wrong numbers (spec/jax-stack.md §2). These kernels are written for GQA:
a query head's program reads its kv head, h // (heads // kv_heads) (Megatron's repeat_kv grouping,
spec §4.2), through the BlockSpec index map, so K/V are never repeated in memory.

Three `pallas_call`s (FlashAttention-2, Dao 2023, Alg. 1 and 2):
- forward, grid (batch, heads, query blocks): online softmax over key blocks, writes the output
  and the fp32 log-sum-exp of each row;
- dQ, grid (batch, heads, query blocks): recomputes the probabilities from the log-sum-exp;
- dK/dV, grid (batch, kv_heads, key blocks): loops over the query heads of the group and the
  query blocks, so a kv head's gradient is summed over its group inside the kernel.
Under `causal`, key loops stop at the diagonal and query loops start there (`lax.fori_loop` bounds
from the program's block index): blocks above the diagonal are skipped, not masked. Sequences
that are not a multiple of the block are zero-padded to one, and the padded keys are masked.

Softmax statistics and accumulators are fp32; inputs may be bf16 or fp32 (fp32 matmuls run at
`Precision.HIGHEST`, no TF32). On platforms other than CUDA, `interpret=True` runs the same kernels
as plain HLO, which is how the CPU tests exercise them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from agpt_jax.compat import TritonCompilerParams

# Finite stand-in for -inf on masked scores (no inf - inf = nan in the running max).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Triton's tl.dot needs every tile dimension >= 16 and a power of two.
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and Triton launch parameters (all blocks powers of two, >= 16).

    Attributes:
        fwd_q, fwd_k: query and key tile of the forward kernel.
        dq_q, dq_k: query and key tile of the dQ kernel.
        dkv_q, dkv_k: query and key tile of the dK/dV kernel.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.
    """

    fwd_q: int
    fwd_k: int
    dq_q: int
    dq_k: int
    dkv_q: int
    dkv_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("fwd_q", "fwd_k", "dq_q", "dq_k", "dkv_q", "dkv_k"):
            value = getattr(self, name)
            if value < _MIN_BLOCK or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}={value} must be a power of two >= "
                                 f"{_MIN_BLOCK} (Triton tile constraint)")

    @property
    def tile(self) -> int:
        """The sequence is padded to a multiple of this (the largest block; all are powers of 2)."""
        return max(self.fwd_q, self.fwd_k, self.dq_q, self.dq_k, self.dkv_q, self.dkv_k)


def default_config(seq_len: int, head_dim: int, interpret: bool) -> KernelConfig:
    """Blocks chosen from the shape.

    Compiled (GPU): 128 x 128 forward tiles as in the FlashAttention-2 Triton kernels, and the
    backward split that keeps the fp32 accumulators of each kernel at 128 x head_dim (dQ: 128
    queries x 64 keys; dK/dV: 64 queries x 128 keys); 8 warps for head_dim > 64. Interpret mode
    (CPU, XPU): the largest tile up to 128, since each loop step costs an interpreter iteration.
    Short sequences use one tile of the next power of two.

    Args:
        seq_len: sequence length.
        head_dim: per-head width.
        interpret: whether the kernels run in interpret mode.

    Returns:
        The KernelConfig.
    """
    base = min(128, max(_MIN_BLOCK, 1 << (seq_len - 1).bit_length()))
    if interpret:
        return KernelConfig(base, base, base, base, base, base)
    half = max(_MIN_BLOCK, base // 2)
    return KernelConfig(fwd_q=base, fwd_k=base, dq_q=base, dq_k=half, dkv_q=half, dkv_k=base,
                        num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              interpret: bool = True) -> jax.Array:
    """Flash attention with grouped K/V heads, blocks chosen from the shape.

    Args:
        q: [batch, seq, heads, head_dim], bf16 or fp32.
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads.
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.
        interpret: run the kernels in Pallas interpret mode (required off CUDA).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype; scale 1/sqrt(head_dim).
    """
    config = default_config(q.shape[1], q.shape[3], interpret)
    return flash_attention(q, k, v, causal=causal, config=config, interpret=interpret)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    config: KernelConfig, interpret: bool) -> jax.Array:
    """`attention` with explicit tiles (tests use small tiles to cross several blocks).

    Args:
        q: [batch, seq, heads, head_dim].
        k: [batch, seq, kv_heads, head_dim].
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.
        config: tiles and launch parameters.
        interpret: run in Pallas interpret mode.

    Returns:
        [batch, seq, heads, head_dim] in q's dtype.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    return _flash(q, k, v, causal, config, interpret)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Python-level facts the kernels are specialised on."""

    seq: int
    padded: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    precision: lax.Precision | None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def _static(q: jax.Array, k: jax.Array, causal: bool, config: KernelConfig) -> _Static:
    _, s, h, d = q.shape
    padded = -(-s // config.tile) * config.tile
    # fp32 inputs: IEEE fp32 matmuls (Triton would otherwise use TF32 on Ampere and later).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    return _Static(s, padded, h, k.shape[2], d, causal, precision)


def _pad_seq(x: jax.Array, padded: int) -> jax.Array:
    """Zero-pads axis 1 (seq) to `padded` rows."""
    extra = padded - x.shape[1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _compiler_params(config: KernelConfig) -> TritonCompilerParams:
    return TritonCompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False,
         precision: lax.Precision | None = None) -> jax.Array:
    """A tile matmul with fp32 accumulation and result, optionally with a transposed operand.

    What ``pl.dot`` did (removed from jax.experimental.pallas in jax 0.11): a ``dot_general``,
    which the Triton lowering and interpret mode both take.
    """
    dims = (((a.ndim - 2 if trans_a else a.ndim - 1,), (b.ndim - 1 if trans_b else b.ndim - 2,)),
            ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked_scores(st: _Static, q: jax.Array, k: jax.Array, q_start: jax.Array,
                   k_start: jax.Array) -> jax.Array:
    """Scaled fp32 scores of a [block_q, d] x [block_k, d] tile, causal and padding masked."""
    block_q, block_k = q.shape[0], k.shape[0]
    s = _dot(q, k, trans_b=True, precision=st.precision) * st.scale
    k_pos = k_start + jnp.arange(block_k)
    keep = None
    if st.padded != st.seq:
        keep = (k_pos < st.seq)[None, :]
    if st.causal:
        q_pos = q_start + jnp.arange(block_q)
        diag = q_pos[:, None] >= k_pos[None, :]
        keep = diag if keep is None else jnp.logical_and(keep, diag)
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    return s


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static, block_k: int) -> None:
    """One (batch, head, query block): o [block_q, d] and lse [block_q]."""
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        k_start = j * block_k
        kb = k_ref[pl.ds(k_start, block_k), :]
        vb = v_ref[pl.ds(k_start, block_k), :]
        s = _masked_scores(st, q, kb, q_start, k_start)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * correction + jnp.sum(p, axis=1)
        pv = _dot(p.astype(vb.dtype), vb, precision=st.precision)
        return acc * correction[:, None] + pv, m_new, l

    init = (jnp.zeros((block_q, st.head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    # Causal: stop at the key block holding this query block's last row (skip, not mask).
    upper = (lax.div(q_start + block_q + block_k - 1, block_k) if st.causal
             else st.padded // block_k)
    acc, m, l = lax.fori_loop(0, upper, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static,
               block_k: int) -> None:
    """One (batch, head, query block): dq [block_q, d]."""
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def body(j, dq):
        k_start = j * block_k
        kb = k_ref[pl.ds(k_start, block_k), :]
        vb = v_ref[pl.ds(k_start, block_k), :]
        p = jnp.exp(_masked_scores(st, q, kb, q_start, k_start) - lse[:, None])
        dp = _dot(do, vb, trans_b=True, precision=st.precision)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(kb.dtype), kb, precision=st.precision)

    upper = (lax.div(q_start + block_q + block_k - 1, block_k) if st.causal
             else st.padded // block_k)
    dq = lax.fori_loop(0, upper, body, jnp.zeros((block_q, st.head_dim), jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                st: _Static, block_q: int) -> None:
    """One (batch, kv head, key block): dk, dv [block_k, d] summed over the group's query heads.

    q_ref/do_ref hold [padded, group * head_dim] (the group's heads side by side), lse_ref and
    delta_ref [group * padded]; query head `gi` of the group is a column / row slice of them.
    """
    block_k = k_ref.shape[0]
    d = st.head_dim
    k_start = pl.program_id(2) * block_k
    kb = k_ref[...]
    vb = v_ref[...]
    # Causal: query blocks that end before this key block starts are above the diagonal.
    lower = lax.div(k_start, block_q) if st.causal else 0

    def head(gi, carry):
        def body(i, carry):
            dk, dv = carry
            q_start = i * block_q
            rows = pl.ds(q_start, block_q)
            qb = q_ref[rows, pl.ds(gi * d, d)]
            dob = do_ref[rows, pl.ds(gi * d, d)]
            lse = lse_ref[pl.ds(gi * st.padded + q_start, block_q)]
            delta = delta_ref[pl.ds(gi * st.padded + q_start, block_q)]
            p = jnp.exp(_masked_scores(st, qb, kb, q_start, k_start) - lse[:, None])
            dv = dv + _dot(p.astype(dob.dtype), dob, trans_a=True, precision=st.precision)
            dp = _dot(dob, vb, trans_b=True, precision=st.precision)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot(ds.astype(qb.dtype), qb, trans_a=True, precision=st.precision)
            return dk, dv

        return lax.fori_loop(lower, st.padded // block_q, body, carry)

    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, st.group, head, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, config: KernelConfig,
             interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Returns out [b, s, h, d] and lse [b, h, padded] fp32."""
    st = _static(q, k, causal, config)
    b = q.shape[0]
    g, d, bq = st.group, st.head_dim, config.fwd_q
    qp, kp, vp = (_pad_seq(x, st.padded) for x in (q, k, v))
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    # GQA: the program of query head h_ reads kv head h_ // group (no repeated K/V).
    kv_spec = pl.BlockSpec((None, st.padded, None, d),
                           lambda b_, h_, i: (b_, 0, lax.div(h_, g), 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_k=config.fwd_k),
        grid=(b, st.heads, st.padded // bq),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, st.heads, st.padded), jnp.float32)],
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="gqa_flash_fwd",
    )(qp, kp, vp)
    return out[:, :st.seq], lse


def _backward(causal: bool, config: KernelConfig, interpret: bool,
              res: tuple[jax.Array, ...], dout: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv from the saved q, k, v, out and log-sum-exp."""
    q, k, v, out, lse = res
    st = _static(q, k, causal, config)
    b = q.shape[0]
    h, kvh, g, d = st.heads, st.kv_heads, st.group, st.head_dim
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij (FlashAttention-2 Alg. 2, line 4), fp32.
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = jnp.pad(delta, [(0, 0), (0, 0), (0, st.padded - st.seq)])
    qp, kp, vp, dop = (_pad_seq(x, st.padded) for x in (q, k, v, dout))
    params = _compiler_params(config)

    bq = config.dq_q
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    kv_spec = pl.BlockSpec((None, st.padded, None, d),
                           lambda b_, h_, i: (b_, 0, lax.div(h_, g), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, block_k=config.dq_k),
        grid=(b, h, st.padded // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="gqa_flash_dq",
    )(qp, kp, vp, dop, lse, delta)

    bk = config.dkv_k
    # Free reshapes: a kv head's `group` query heads are adjacent (h = kv * group + gi).
    q_group = qp.reshape(b, st.padded, kvh, g * d)
    do_group = dop.reshape(b, st.padded, kvh, g * d)
    lse_group = lse.reshape(b, kvh, g * st.padded)
    delta_group = delta.reshape(b, kvh, g * st.padded)
    group_spec = pl.BlockSpec((None, st.padded, None, g * d), lambda b_, j_, i: (b_, 0, j_, 0))
    group_rows = pl.BlockSpec((None, None, g * st.padded), lambda b_, j_, i: (b_, j_, 0))
    k_spec = pl.BlockSpec((None, bk, None, d), lambda b_, j_, i: (b_, i, j_, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, block_q=config.dkv_q),
        grid=(b, kvh, st.padded // bk),
        in_specs=[group_spec, k_spec, k_spec, group_spec, group_rows, group_rows],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="gqa_flash_dkv",
    )(q_group, kp, vp, do_group, lse_group, delta_group)
    return dq[:, :st.seq], dk[:, :st.seq], dv[:, :st.seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, config: KernelConfig,
           interpret: bool) -> jax.Array:
    return _forward(q, k, v, causal, config, interpret)[0]


def _flash_fwd(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, config: KernelConfig,
               interpret: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, causal, config, interpret)
    return out, (q, k, v, out, lse)


_flash.defvjp(_flash_fwd, _backward)
