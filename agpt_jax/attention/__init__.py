"""One attention entry point with several implementations.

The model calls only `attention`; `impl` picks the implementation ("xla" for now; "blockwise",
"pallas" and "auto" are added by the kernels module).
"""

from __future__ import annotations

import jax

from agpt_jax.attention import xla

IMPLEMENTATIONS = ("xla",)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              impl: str = "xla") -> jax.Array:
    """Causal GQA attention; q [b, s, h, d], k/v [b, s, kv_h, d] -> [b, s, h, d]."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if impl == "xla":
        return xla.attention(q, k, v, causal=causal)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
