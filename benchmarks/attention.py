"""Attention benchmark: forward + backward time and memory of each implementation.

For every sequence length and implementation (xla = the plain reference and the baseline of the
ratios, blockwise, pallas), compiles value-and-grad of sum(attention(q, k, v) * dout) with respect
to q, k, v and prints:

- the median wall time of forward + backward over `--iters` runs after one warm-up;
- the attention FLOP rate, counting useful causal FLOPs for every implementation:
  forward 4 * b * h * s^2 * d / 2 (QK^T and PV, half the square under the causal mask), backward
  2.5 x forward (five matmuls, one of them the recomputed QK^T; the FlashAttention-2 convention);
- XLA's own accounting of the compiled program's temporary memory (memory_analysis().temp bytes;
  inputs and outputs excluded), and its ratio to xla's.

Defaults follow the platform's capabilities: where the Pallas kernels compile (a CUDA GPU) the
training shapes of the 7B model (seq 1024-4096, 32 / 8 heads, head_dim 128, bf16); elsewhere, where
pallas runs in interpret mode (CPU), reduced sizes (seq 512-2048, 8 / 2 heads, fp32).

    python benchmarks/attention.py [--seq 512,1024,2048] [--heads 8] [--kv-heads 2]
        [--head-dim 128] [--batch 1] [--dtype float32] [--impls xla,blockwise,pallas] [--iters 5]
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import flags

from agpt_jax import attention as attention_lib
from agpt_jax import cli, runtime


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem: q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, ...]."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    def forward_flops(self) -> float:
        """Useful causal forward FLOPs: QK^T and PV over the lower triangle."""
        return 4.0 * self.batch * self.heads * self.seq ** 2 * self.head_dim / 2

    def train_flops(self) -> float:
        """Forward + backward (backward = 2.5 x forward)."""
        return 3.5 * self.forward_flops()


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Time and memory of one implementation at one shape."""

    impl: str
    shape: Shape
    seconds: float
    temp_bytes: int
    forward_only: bool = False

    @property
    def flops_per_s(self) -> float:
        flops = self.shape.forward_flops() if self.forward_only else self.shape.train_flops()
        return flops / self.seconds


def make_inputs(shape: Shape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q, k, v, dout ~ N(0, 1) in the shape's dtype."""
    dtype = jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q_shape = (shape.batch, shape.seq, shape.heads, shape.head_dim)
    kv_shape = (shape.batch, shape.seq, shape.kv_heads, shape.head_dim)
    return (jax.random.normal(keys[0], q_shape, dtype), jax.random.normal(keys[1], kv_shape, dtype),
            jax.random.normal(keys[2], kv_shape, dtype), jax.random.normal(keys[3], q_shape, dtype))


def train_fn(impl: str, platform: str | runtime.Capabilities
             ) -> Callable[..., tuple[jax.Array, ...]]:
    """(q, k, v, dout) -> (out, dq, dk, dv): one forward and one backward pass."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(
            lambda q, k, v: attention_lib.attention(q, k, v, impl=impl, platform=platform), q, k, v)
        return (out, *vjp(dout))

    return run


def forward_fn(impl: str, platform: str | runtime.Capabilities) -> Callable[..., jax.Array]:
    """(q, k, v, dout) -> out: the forward pass alone (dout unused, same signature)."""
    return lambda q, k, v, dout: attention_lib.attention(q, k, v, impl=impl, platform=platform)


def measure(fn: Callable[..., object], impl: str, shape: Shape, iters: int,
            forward_only: bool = False) -> Measurement:
    """Compiles `fn` for the shape, runs it once to warm up, then times `iters` runs (median)."""
    args = make_inputs(shape)
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    temp = int(memory.temp_size_in_bytes) if memory is not None else -1
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Measurement(impl, shape, statistics.median(times), temp, forward_only)


def format_table(rows: Sequence[Measurement], baseline: str = "xla", tera: bool = True) -> str:
    """A markdown table with time and memory ratios against `baseline` at the same shape.

    Args:
        rows: the measurements.
        baseline: the implementation the ratios divide by.
        tera: FLOP rate in TFLOP/s (accelerators) or GFLOP/s (CPU).
    """
    base = {(m.shape, m.forward_only): m for m in rows if m.impl == baseline}
    unit, scale = ("TFLOP/s", 1e12) if tera else ("GFLOP/s", 1e9)
    lines = [f"| pass | seq | impl | time ms | {unit} | temp MiB | time / {baseline} | "
             f"temp / {baseline} |",
             "|---|---|---|---|---|---|---|---|"]
    for m in rows:
        ref = base.get((m.shape, m.forward_only))
        t_ratio = f"{m.seconds / ref.seconds:.2f}" if ref else "-"
        m_ratio = (f"{m.temp_bytes / ref.temp_bytes:.3f}" if ref and ref.temp_bytes > 0 else "-")
        lines.append(
            f"| {'fwd' if m.forward_only else 'fwd+bwd'} | {m.shape.seq} | {m.impl} | "
            f"{m.seconds * 1e3:.1f} | {m.flops_per_s / scale:.2f} | {m.temp_bytes / 2**20:.1f} | "
            f"{t_ratio} | {m_ratio} |")
    return "\n".join(lines)


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as err:
        raise SystemExit(f"--seq expects comma-separated integers, got {text!r}") from err


def main(argv: Sequence[str] | None = None) -> str:
    rt = runtime.initialize()
    caps = rt.capabilities
    on_gpu = not caps.pallas_interpret  # full 7B shapes where the Pallas kernels compile
    fv = flags.FlagValues()
    flags.DEFINE_string("seq", "1024,2048,4096" if on_gpu else "512,1024,2048",
                        "comma-separated sequence lengths", flag_values=fv)
    flags.DEFINE_integer("heads", 32 if on_gpu else 8, "query heads", flag_values=fv)
    flags.DEFINE_integer("kv-heads", 8 if on_gpu else 2, "key/value heads", flag_values=fv)
    flags.DEFINE_integer("head-dim", 128, "head dimension", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "batch size", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16" if on_gpu else "float32", ("bfloat16", "float32"),
                      "compute dtype", flag_values=fv)
    flags.DEFINE_string("impls", ",".join(attention_lib.IMPLEMENTATIONS),
                        "comma-separated implementations", flag_values=fv)
    flags.DEFINE_integer("iters", 10 if on_gpu else 3, "timed runs per measurement",
                         flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    impls = [x for x in args.impls.split(",") if x]
    for impl in impls:
        if impl not in attention_lib.IMPLEMENTATIONS:
            raise SystemExit(
                f"--impls: unknown {impl!r}; choose from {attention_lib.IMPLEMENTATIONS}")
    rows = []
    for seq in _parse_ints(args.seq):
        shape = Shape(args.batch, seq, args.heads, args.kv_heads, args.head_dim, args.dtype)
        for impl in impls:
            rows.append(measure(train_fn(impl, caps), impl, shape, args.iters))
            print(f"measured {impl} seq {seq}: {rows[-1].seconds * 1e3:.1f} ms", flush=True)
    header = (f"platform {rt.platform} ({rt.device_kind}), batch {args.batch}, heads "
              f"{args.heads}/{args.kv_heads}, head_dim {args.head_dim}, {args.dtype}, causal, "
              f"median of {args.iters}")
    table = header + "\n\n" + format_table(rows, tera=caps.accelerator)
    print(table)
    return table


if __name__ == "__main__":
    main()
