"""One attention entry point with several implementations, chosen per platform.

The model calls only `attention`. Implementations (one module each, same core signature
`attention(q, k, v, *, causal=True)`):

- "xla": plain jnp reference; materialises the [seq, seq] scores.
- "blockwise": online softmax over key blocks in plain JAX with a recomputing custom_vjp;
  O(seq x block) memory on every backend, the fast path on Intel XPU (spec/jax-stack.md §2).
- "pallas": a Pallas flash-attention kernel (forward and backward) with GQA inside the kernel;
  compiled with Triton on CUDA GPUs, run in Pallas interpret mode everywhere else.
- "auto": resolved by `select` from the platform and the sequence length.

The platform ("cpu" | "gpu" | "xpu" | "tpu", `Runtime.platform`) is an argument because only the
runtime module reads jax's backend. When it is not passed, the module default applies: the one set
with `set_default_platform`, else the platform of `agpt_jax.runtime.initialize()` (imported lazily;
idempotent, so it returns the already initialised runtime).
"""

from __future__ import annotations

from absl import logging
import jax

from agpt_jax.attention import blockwise
from agpt_jax.attention import pallas
from agpt_jax.attention import xla

IMPLEMENTATIONS = ("xla", "blockwise", "pallas")
CHOICES = IMPLEMENTATIONS + ("auto",)
PLATFORMS = ("cpu", "gpu", "xpu", "tpu")

# From these sequence lengths on, "auto" avoids the materialised [seq, seq] scores: CPU_LONG_SEQUENCE
# on CPU, LONG_SEQUENCE on TPU. Measured on CPU with benchmarks/attention.py (8 / 2 heads, head_dim
# 128, fp32, fwd + bwd, BENCHMARKS.md): blockwise takes 1.17x xla's time at 128, 0.68x at 256,
# 0.44x at 512, 0.21x at 1024 and 0.23x at 2048, with 0.94x to 0.076x of its temporary memory.
CPU_LONG_SEQUENCE = 256
LONG_SEQUENCE = 1024

_default_platform: str | None = None
_logged_choices: set[tuple[str, str, str]] = set()


def set_default_platform(platform: str | None) -> None:
    """Sets the platform used when `attention` is called without one (None clears it).

    Args:
        platform: "cpu" | "gpu" | "xpu" | "tpu" (Runtime.platform), or None.
    """
    global _default_platform
    if platform is not None:
        _check_platform(platform)
    _default_platform = platform


def default_platform() -> str:
    """The platform for calls that pass none: the one set, else the runtime's.

    Returns:
        "cpu" | "gpu" | "xpu" | "tpu".

    Raises:
        ValueError: when none was set and agpt_jax.runtime cannot provide one.
    """
    if _default_platform is not None:
        return _default_platform
    try:
        from agpt_jax import runtime  # pylint: disable=import-outside-toplevel
        platform = runtime.initialize().platform
    except (ImportError, AttributeError, RuntimeError) as err:
        raise ValueError(
            "attention: the platform is unknown; pass platform=Runtime.platform or call "
            f"agpt_jax.attention.set_default_platform(...) ({err})") from err
    _check_platform(platform)
    return platform


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")


def select(impl: str, platform: str, seq_len: int) -> str:
    """Resolves an implementation name; "auto" becomes a concrete one (logged once per choice).

    "auto" picks "pallas" on CUDA GPUs; "blockwise" on XPU (no Pallas lowering for `sycl` at jax
    0.5.0, spec/jax-stack.md §2), on CPU from seq_len CPU_LONG_SEQUENCE and on TPU from
    LONG_SEQUENCE; "xla" otherwise.

    Args:
        impl: one of CHOICES.
        platform: "cpu" | "gpu" | "xpu" | "tpu".
        seq_len: query sequence length.

    Returns:
        One of IMPLEMENTATIONS.

    Raises:
        ValueError: for an unknown implementation or platform.
    """
    if impl not in CHOICES:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")
    _check_platform(platform)
    if impl != "auto":
        return impl
    if platform == "gpu":
        choice, reason = "pallas", "CUDA GPU: the Pallas flash kernel compiles with Triton"
    elif platform == "xpu":
        choice, reason = "blockwise", ("XPU: Pallas has no lowering for the sycl platform at "
                                       "jax 0.5.0; blockwise is the memory-efficient path")
    elif seq_len >= (threshold := CPU_LONG_SEQUENCE if platform == "cpu" else LONG_SEQUENCE):
        choice, reason = "blockwise", (f"seq {seq_len} >= {threshold} on {platform}: avoid "
                                       "materialising [seq, seq] scores")
    else:
        choice, reason = "xla", f"seq {seq_len} < {threshold} on {platform}: plain attention"
    key = (platform, choice, reason)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logging.info("attention impl=auto on %s -> %s (%s)", platform, choice, reason)
    return choice


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects rank-4 q, k, v [batch, seq, heads, head_dim]; got "
                         f"q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q{q.shape} and k{k.shape} must agree in batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if impl != "xla" and q.shape[1] != k.shape[1]:
        raise ValueError(f"impl={impl!r} needs equal query and key lengths (self-attention); got "
                         f"{q.shape[1]} and {k.shape[1]}: use impl='xla'")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              impl: str = "auto", platform: str | None = None) -> jax.Array:
    """Softmax attention with grouped K/V heads, scale 1/sqrt(head_dim).

    Args:
        q: [batch, seq, heads, head_dim], bf16 or fp32.
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads. Query head h
            reads kv head h // (heads // kv_heads).
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.
        impl: one of CHOICES; a static Python string.
        platform: "cpu" | "gpu" | "xpu" | "tpu"; None uses `default_platform()`. Needed only by
            "auto" and "pallas" (compiled on "gpu", interpret mode elsewhere).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype.
    """
    if impl not in CHOICES:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")
    if impl == "auto":
        impl = select(impl, platform or default_platform(), q.shape[1])
    _check_shapes(q, k, v, impl)
    if impl == "xla":
        return xla.attention(q, k, v, causal=causal)
    if impl == "blockwise":
        return blockwise.attention(q, k, v, causal=causal,
                                   platform=platform or default_platform())
    # Triton lowers only on CUDA; elsewhere the same kernels run in interpret mode (plain HLO).
    interpret = (platform or default_platform()) != "gpu"
    return pallas.attention(q, k, v, causal=causal, interpret=interpret)
