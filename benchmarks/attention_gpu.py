"""The prepared GPU run of the attention kernels: correctness on the GPU, then timings at seq 4096.

One short run (well under 5 minutes on one CUDA GPU) that

1. checks each implementation (pallas compiled with Triton, blockwise, xla) against an fp32
   reference written here (K/V repeated per query head, HIGHEST precision), forward and
   dq / dk / dv, on GQA 32/8 at a length that is not a multiple of any tile, GQA 8/2 head_dim 64
   in fp32, and MHA non-causal; errors relative to the largest reference value, tolerance
   3e-2 in bf16 and 1e-4 in fp32 (fp32 cases run under default_matmul_precision("highest"), so
   XLA's dots do not use TF32);
2. times forward and forward + backward of each implementation at the 7B training shape
   (batch 1, seq 4096, 32 query / 8 kv heads, head_dim 128, bf16, causal) and prints the
   markdown table of benchmarks/attention.py (TFLOP/s, XLA temp memory, ratios to xla).

Exit status 0 when every correctness check passes, 1 otherwise, 2 when no CUDA GPU is present.
`--cpu-smoke` runs the same steps at tiny sizes on CPU (pallas in interpret mode), which is how
the test suite keeps this script working without a GPU.

    python benchmarks/attention_gpu.py [--json results.json]
    python benchmarks/attention_gpu.py --cpu-smoke
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from agpt_jax import attention as attention_lib
from agpt_jax import cli, runtime


def _load_benchmark_module():
    """benchmarks/attention.py, loaded by path (benchmarks/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parent / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark_module()

TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}
TIME_BUDGET_S = 240.0  # stop timing (and say so) past this, to stay inside a 5-minute slot


@dataclasses.dataclass(frozen=True)
class CheckCase:
    """A correctness case."""

    shape: bench.Shape
    causal: bool = True

    def __str__(self) -> str:
        s = self.shape
        return (f"b{s.batch} s{s.seq} h{s.heads}/{s.kv_heads} d{s.head_dim} {s.dtype}"
                f"{'' if self.causal else ' non-causal'}")


GPU_CASES = [
    CheckCase(bench.Shape(1, 1000, 32, 8, 128, "bfloat16")),
    CheckCase(bench.Shape(2, 512, 8, 2, 64, "float32")),
    CheckCase(bench.Shape(1, 384, 4, 4, 128, "bfloat16"), causal=False),
]
SMOKE_CASES = [
    CheckCase(bench.Shape(1, 100, 4, 2, 64, "bfloat16")),
    CheckCase(bench.Shape(2, 48, 4, 1, 64, "float32")),
    CheckCase(bench.Shape(1, 40, 2, 2, 128, "float32"), causal=False),
]
GPU_TIMING = bench.Shape(1, 4096, 32, 8, 128, "bfloat16")
SMOKE_TIMING = bench.Shape(1, 128, 4, 2, 64, "float32")


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """fp32 softmax attention with K/V repeated per query head (head h reads kv head h // g)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision=hi)


def _value_and_grads(fn, args: Sequence[jax.Array]) -> list[np.ndarray]:
    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))

    return [np.asarray(x, np.float32) for x in run(*args)]


def check(case: CheckCase, impls: Sequence[str], platform: str | runtime.Capabilities
          ) -> list[dict[str, object]]:
    """Relative errors of out, dq, dk, dv of each implementation against the reference."""
    args = bench.make_inputs(case.shape, seed=1)
    precision = "highest" if case.shape.dtype == "float32" else "default"
    with jax.default_matmul_precision(precision):
        expected = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, case.causal),
                                    [x.astype(jnp.float32) for x in args])
        rows = []
        for impl in impls:
            actual = _value_and_grads(
                lambda q, k, v, impl=impl: attention_lib.attention(
                    q, k, v, causal=case.causal, impl=impl, platform=platform), args)
            errors = {}
            for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
                errors[name] = (float(np.max(np.abs(a - e)) / np.max(np.abs(e)))
                                if np.all(np.isfinite(a)) else float("inf"))
            tol = TOLERANCE[case.shape.dtype]
            rows.append({"case": str(case), "impl": impl, "errors": errors, "tolerance": tol,
                         "ok": all(err <= tol for err in errors.values())})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_bool("cpu-smoke", False, "tiny sizes on CPU, pallas in interpret mode",
                      flag_values=fv)
    flags.DEFINE_integer("iters", None, "timed runs per measurement", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the results to this file", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    start = time.perf_counter()
    rt = runtime.initialize()
    if not args.cpu_smoke and rt.capabilities.pallas_interpret:  # no Triton: not a CUDA GPU
        print(f"no CUDA GPU here (platform {rt.platform}); run with --cpu-smoke for the CPU check")
        return 2
    platform = rt.capabilities
    impls = attention_lib.IMPLEMENTATIONS
    cases = SMOKE_CASES if args.cpu_smoke else GPU_CASES
    timing_shape = SMOKE_TIMING if args.cpu_smoke else GPU_TIMING
    iters = args.iters or (2 if args.cpu_smoke else 10)
    print(f"{rt.describe()}\njax {jax.__version__}", flush=True)

    checks = []
    for case in cases:
        for row in check(case, impls, platform):
            checks.append(row)
            errors = " ".join(f"{k}={v:.1e}" for k, v in row["errors"].items())
            print(f"{'PASS' if row['ok'] else 'FAIL'} {row['case']:<32} {row['impl']:<9} {errors} "
                  f"(tol {row['tolerance']:.0e})", flush=True)

    measurements = []
    skipped = []
    for forward_only in (True, False):
        for impl in impls:
            if time.perf_counter() - start > TIME_BUDGET_S:
                skipped.append(f"{impl} {'fwd' if forward_only else 'fwd+bwd'}")
                continue
            make = bench.forward_fn if forward_only else bench.train_fn
            m = bench.measure(make(impl, platform), impl, timing_shape, iters, forward_only)
            measurements.append(m)
            print(f"timed {impl} {'fwd' if forward_only else 'fwd+bwd'}: "
                  f"{m.seconds * 1e3:.2f} ms", flush=True)
    s = timing_shape
    table = bench.format_table(measurements, tera=not args.cpu_smoke)
    print(f"\n{rt.device_kind}: batch {s.batch}, seq {s.seq}, heads {s.heads}/{s.kv_heads}, "
          f"head_dim {s.head_dim}, {s.dtype}, causal, median of {iters}\n\n{table}")
    if skipped:
        print(f"skipped past the {TIME_BUDGET_S:.0f} s budget: {', '.join(skipped)}")
    ok = all(row["ok"] for row in checks)
    print(f"\ncorrectness: {'all passed' if ok else 'FAILURES'}; "
          f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "device": rt.device_kind, "jax": jax.__version__, "checks": checks,
            "timings": [{"impl": m.impl, "forward_only": m.forward_only, "seconds": m.seconds,
                         "flops_per_s": m.flops_per_s, "temp_bytes": m.temp_bytes,
                         "shape": dataclasses.asdict(m.shape)} for m in measurements],
            "skipped": skipped}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
