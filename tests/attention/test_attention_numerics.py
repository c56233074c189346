"""Every attention implementation against an independent reference, forward and dq/dk/dv.

The reference is written here from the definition (softmax(QK^T / sqrt(d)) V with K/V heads
repeated as Megatron's repeat_kv does, spec/megatron-deepspeed.md §4.2), in fp32 at HIGHEST
precision from the same (possibly bf16-rounded) inputs. Errors are measured relative to the largest
reference value; tolerances per dtype:

- fp32: 2e-5 (the kernels reorder fp32 sums; observed errors are ~1e-6 relative).
- bf16: 3e-2 (probabilities are rounded to bf16 before the PV matmul and outputs to bf16,
  2^-8 relative each, accumulated over a few roundings).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agpt_jax import attention as attention_lib
from agpt_jax.attention import blockwise
from agpt_jax.attention import pallas
from agpt_jax.attention import xla

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """fp32 attention with K/V repeated per query head (head h reads kv head h // group)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[1]
        scores = jnp.where(np.tril(np.ones((s, s), bool)), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=hi)


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape / dtype / tiling to compare."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: type
    block: int  # tile for the blockwise / pallas loops; seq % block != 0 exercises padding
    causal: bool = True

    def __str__(self) -> str:
        mask = "causal" if self.causal else "full"
        return (f"b{self.batch}-s{self.seq}-h{self.heads}/{self.kv_heads}-d{self.head_dim}-"
                f"{jnp.dtype(self.dtype).name}-blk{self.block}-{mask}")


CASES = [
    Case(2, 128, 4, 4, 64, jnp.float32, 32),            # MHA, seq a multiple of the block
    Case(1, 100, 8, 2, 64, jnp.float32, 32),            # GQA 8/2, partial last block
    Case(2, 72, 4, 1, 128, jnp.bfloat16, 32),           # GQA 4/1 (MQA), head_dim 128, bf16
    Case(1, 48, 32, 8, 64, jnp.float32, 16),            # the production 32/8 grouping, tiny seq
    Case(2, 80, 4, 2, 64, jnp.float32, 32, causal=False),  # non-causal: padded keys masked
    Case(1, 64, 8, 2, 128, jnp.bfloat16, 16),           # bf16 GQA, several diagonal blocks
]


def make_inputs(case: Case, seed: int = 0) -> tuple[jax.Array, ...]:
    """q, k, v and an output cotangent, normal(0, 1) in the case's dtype."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q_shape = (case.batch, case.seq, case.heads, case.head_dim)
    kv_shape = (case.batch, case.seq, case.kv_heads, case.head_dim)
    return (jax.random.normal(kq, q_shape, case.dtype), jax.random.normal(kk, kv_shape, case.dtype),
            jax.random.normal(kv, kv_shape, case.dtype), jax.random.normal(kd, q_shape, case.dtype))


def implementation(name: str, case: Case):
    """The implementation under test with the case's tiles (several blocks even at small seq)."""
    if name == "xla":
        return lambda q, k, v: xla.attention(q, k, v, causal=case.causal)
    if name == "blockwise":
        blocks = blockwise.BlockSizes(case.block, max(8, case.block // 2))
        return lambda q, k, v: blockwise.blockwise_attention(q, k, v, causal=case.causal,
                                                              blocks=blocks)
    b = case.block
    config = pallas.KernelConfig(fwd_q=b, fwd_k=max(16, b // 2), dq_q=b, dq_k=max(16, b // 2),
                                 dkv_q=max(16, b // 2), dkv_k=b)
    return lambda q, k, v: pallas.flash_attention(q, k, v, causal=case.causal, config=config,
                                                  interpret=True)


def relative_error(actual: jax.Array, expected: jax.Array) -> float:
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def value_and_grads(fn, q: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array
                    ) -> tuple[jax.Array, ...]:
    """(out, dq, dk, dv) of `fn` for the cotangent `dout`, in one compiled function."""

    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))

    return run(q, k, v, dout)


@functools.cache
def reference_results(case: Case) -> tuple[np.ndarray, ...]:
    """(out, dq, dk, dv) of the fp32 reference on the case's inputs (computed once per case)."""
    q, k, v, dout = (x.astype(jnp.float32) for x in make_inputs(case))
    results = value_and_grads(lambda *a: reference_attention(*a, case.causal), q, k, v, dout)
    return tuple(np.asarray(r) for r in results)


def assert_matches_reference(fn, case: Case) -> None:
    """Forward output and dq, dk, dv of `fn` (jitted) match the fp32 reference."""
    q, k, v, dout = make_inputs(case)
    out, *grads = value_and_grads(fn, q, k, v, dout)
    ref_out, *ref_grads = reference_results(case)
    assert out.dtype == q.dtype and out.shape == q.shape
    for grad, x in zip(grads, (q, k, v)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
    tol = TOLERANCE[case.dtype]
    names = ("out", "dq", "dk", "dv")
    errors = {n: relative_error(a, e)
              for n, a, e in zip(names, (out, *grads), (ref_out, *ref_grads))}
    assert all(e <= tol for e in errors.values()), (str(case), errors, tol)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_plain_jax_implementations_match_reference(impl: str, case: Case) -> None:
    assert_matches_reference(implementation(impl, case), case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pallas_interpret_matches_reference(case: Case) -> None:
    assert_matches_reference(implementation("pallas", case), case)


@pytest.mark.parametrize("impl", attention_lib.IMPLEMENTATIONS)
def test_entry_point_default_tiles_at_seq_300(impl: str) -> None:
    """The public entry point with blocks chosen from the shape (pallas pads 300 up to 384)."""
    case = Case(1, 300, 4, 1, 128, jnp.bfloat16, block=0)
    fn = lambda q, k, v: attention_lib.attention(q, k, v, causal=True, impl=impl, platform="cpu")
    assert_matches_reference(fn, case)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_causal_blocks_above_the_diagonal_are_skipped(impl: str) -> None:
    """NaN K/V in key blocks after the first query block's diagonal never reach its rows.

    A masked block still multiplies its zero probabilities with V (0 * NaN = NaN); a skipped one
    is never read. The reference (which masks) turns those rows to NaN, the kernels must not.
    """
    case = Case(1, 96, 4, 2, 64, jnp.float32, block=32)
    q, k, v, _ = make_inputs(case)
    k = k.at[:, 64:].set(jnp.nan)
    v = v.at[:, 64:].set(jnp.nan)
    out = np.asarray(jax.jit(implementation(impl, case))(q, k, v))
    assert np.all(np.isfinite(out[:, :32]))
    masked = np.asarray(xla.attention(q, k, v, causal=True))
    assert np.all(np.isnan(masked[:, :32])), "the masking reference should propagate NaN"
    expected = reference_attention(q[:, :32], k[:, :32], v[:, :32], causal=True)
    assert relative_error(out[:, :32], expected) <= TOLERANCE[jnp.float32]
