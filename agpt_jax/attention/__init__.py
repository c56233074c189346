"""One attention entry point with several implementations, chosen per platform.

The model calls only `attention`. Implementations (one module each, same core signature
`attention(q, k, v, *, causal=True)`):

- "xla": plain jnp reference; materialises the [seq, seq] scores.
- "blockwise": online softmax over key blocks in plain JAX with a recomputing custom_vjp;
  O(seq x block) memory on every backend, the fast path on Intel XPU (spec/jax-stack.md §2).
- "pallas": a Pallas flash-attention kernel (forward and backward) with GQA inside the kernel;
  compiled with Triton on CUDA GPUs, run in Pallas interpret mode everywhere else.
- "auto": resolved by `select` from the platform's capabilities and the sequence length.

What the platform can do is an `agpt_jax.runtime.Capabilities` (its "auto" choice, the blockwise
tiles, whether Pallas compiles); this module compares no platform names. It is an argument
(`platform`: a Capabilities, e.g. `Runtime.capabilities`, or the name of a target, "cpu" | "gpu" |
"xpu" | "tpu", read with `agpt_jax.runtime.capabilities_for`) because only the runtime reads jax's
backend. When it is not passed, the module default applies: the one set with
`set_default_platform`, else the capabilities of `agpt_jax.runtime.initialize()` (idempotent, so
it returns the already initialised runtime).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from absl import logging
import jax

from agpt_jax.attention import blockwise
from agpt_jax.attention import pallas
from agpt_jax.attention import xla
from agpt_jax import runtime
from agpt_jax.runtime import Capabilities, capabilities_for

IMPLEMENTATIONS = ("xla", "blockwise", "pallas")
CHOICES = IMPLEMENTATIONS + ("auto",)

_default_capabilities: Capabilities | None = None
_logged_choices: set[tuple[str, str, str]] = set()


def set_default_platform(platform: str | Capabilities | None) -> None:
    """Sets the platform used when `attention` is called without one (None clears it).

    Args:
        platform: a Capabilities (Runtime.capabilities), a target's name ("cpu" | "gpu" | "xpu" |
            "tpu"), or None.

    Raises:
        ValueError: for an unknown name.
    """
    global _default_capabilities
    _default_capabilities = None if platform is None else capabilities_for(platform)


@contextlib.contextmanager
def platform_default(platform: str | Capabilities | None) -> Iterator[None]:
    """Within the block, calls without a platform use this one; the previous default comes back.

    For tracing code whose attention calls pass no platform (the model) for another target than
    the running one, e.g. planning an XPU job on a CPU machine (agpt_jax/plan.py). None keeps
    the current default.
    """
    global _default_capabilities
    previous = _default_capabilities
    if platform is not None:
        set_default_platform(platform)
    try:
        yield
    finally:
        _default_capabilities = previous


def default_capabilities() -> Capabilities:
    """The capabilities for calls that pass no platform: the ones set, else the runtime's.

    Raises:
        ValueError: when none was set and agpt_jax.runtime cannot provide them.
    """
    if _default_capabilities is not None:
        return _default_capabilities
    try:
        return runtime.initialize().capabilities
    except RuntimeError as err:
        raise ValueError(
            "attention: the platform is unknown; pass platform=Runtime.capabilities or call "
            f"agpt_jax.attention.set_default_platform(...) ({err})") from err


def default_platform() -> str:
    """The name of `default_capabilities()`' platform: "cpu" | "gpu" | "xpu" | "tpu"."""
    return default_capabilities().platform


def _capabilities(platform: str | Capabilities | None) -> Capabilities:
    return default_capabilities() if platform is None else capabilities_for(platform)


def select(impl: str, platform: str | Capabilities, seq_len: int) -> str:
    """Resolves an implementation name; "auto" becomes a concrete one (logged once per choice).

    "auto" picks the platform's `auto_attention` below its `long_sequence` and its
    `auto_attention_long` from there on: "pallas" on CUDA GPUs; "blockwise" on XPU (no Pallas
    lowering for `sycl` at jax 0.5.0, spec/jax-stack.md §2), on CPU from seq_len 256 and on TPU
    from 1024; "xla" otherwise (agpt_jax/runtime/capabilities.py has the table).

    Args:
        impl: one of CHOICES.
        platform: a Capabilities, or a target's name ("cpu" | "gpu" | "xpu" | "tpu").
        seq_len: query sequence length.

    Returns:
        One of IMPLEMENTATIONS.

    Raises:
        ValueError: for an unknown implementation or platform.
    """
    if impl not in CHOICES:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")
    caps = capabilities_for(platform)
    if impl != "auto":
        return impl
    threshold = caps.long_sequence
    if seq_len >= threshold:
        choice = caps.auto_attention_long
        reason = caps.auto_attention_reason or (
            f"seq {seq_len} >= {threshold} on {caps.platform}: avoid materialising [seq, seq] "
            "scores")
    else:
        choice = caps.auto_attention
        reason = caps.auto_attention_reason or (
            f"seq {seq_len} < {threshold} on {caps.platform}: plain attention")
    key = (caps.platform, choice, reason)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logging.info("attention impl=auto on %s -> %s (%s)", caps.platform, choice, reason)
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
              impl: str = "auto", platform: str | Capabilities | None = None) -> jax.Array:
    """Softmax attention with grouped K/V heads, scale 1/sqrt(head_dim).

    Args:
        q: [batch, seq, heads, head_dim], bf16 or fp32.
        k: [batch, seq, kv_heads, head_dim]; heads must be a multiple of kv_heads. Query head h
            reads kv head h // (heads // kv_heads).
        v: [batch, seq, kv_heads, head_dim].
        causal: mask keys after the query position.
        impl: one of CHOICES; a static Python string.
        platform: a Capabilities (Runtime.capabilities) or a target's name ("cpu" | "gpu" | "xpu"
            | "tpu"); None uses `default_capabilities()`. Needed only by "auto", "blockwise" (its
            tiles) and "pallas" (compiled where Triton lowers it, interpret mode elsewhere).

    Returns:
        [batch, seq, heads, head_dim] in q's dtype.
    """
    if impl not in CHOICES:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {CHOICES}")
    if impl == "auto":
        impl = select(impl, _capabilities(platform), q.shape[1])
    _check_shapes(q, k, v, impl)
    if impl == "xla":  # needs no platform: the runtime is not asked
        return xla.attention(q, k, v, causal=causal)
    caps = _capabilities(platform)
    if impl == "blockwise":
        return blockwise.attention(q, k, v, causal=causal, platform=caps)
    # Triton lowers only on CUDA; elsewhere the same kernels run in interpret mode (plain HLO).
    return pallas.attention(q, k, v, causal=causal, interpret=caps.pallas_interpret)
