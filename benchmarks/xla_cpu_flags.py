"""Which XLA CPU flags speed up bf16 and fp32 matmuls on the installed jax: one process per flag set.

On jax 0.5.0 agpt-jax sets `--xla_cpu_use_thunk_runtime=false` (bf16 matmuls on oneDNN, 3x
faster on the reference machine). jax 0.11's XLA has only the thunk runtime and ignores that
flag; this measures what its other CPU flags do, against its defaults measured in the same run.

    python benchmarks/xla_cpu_flags.py                       # the flag sets below, 2048^3 and 4096^3
    python benchmarks/xla_cpu_flags.py --flags '--xla_cpu_use_onednn=true'   # one more set

Each flag set runs in a fresh process (XLA reads XLA_FLAGS once); a row is the median GFLOP/s of
`--reps` jitted square matmuls after one compile-and-warm-up call, and the ratio against the
defaults row of the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from agpt_jax import cli

SIZES = (2048, 4096)
DTYPES = ("bfloat16", "float32")

# Flags jax 0.11's jaxlib knows (read from its binaries); jax 0.5.0 rows use its one known win.
FLAG_SETS = {
    "0.11": ["", "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
             "--xla_cpu_use_xnnpack=false", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_enable_fast_math=true"],
    "0.5": ["", "--xla_cpu_use_thunk_runtime=false"],
}


def child(reps: int) -> None:
    """Measures every size and dtype under the XLA_FLAGS of this process; prints one JSON line."""
    import jax
    import jax.numpy as jnp

    out = {}
    for dtype in DTYPES:
        for n in SIZES:
            a = jnp.ones((n, n), dtype) * 0.5
            f = jax.jit(lambda x, y: x @ y)
            f(a, a).block_until_ready()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                f(a, a).block_until_ready()
                times.append(time.perf_counter() - t)
            out[f"{dtype} {n}"] = 2 * n**3 / statistics.median(times) / 1e9
    print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("flags", [], "an extra XLA_FLAGS set to time (repeatable)",
                              flag_values=fv)
    flags.DEFINE_integer("reps", 5, "timed matmuls per size and dtype", flag_values=fv)
    flags.DEFINE_bool("child", False, "internal: measure in this process", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    if args.child:
        child(args.reps)
        return
    import jax

    key = "0.5" if jax.__version__.startswith("0.5") else "0.11"
    sets = FLAG_SETS[key] + args.flags
    rows = {}
    for xla_flags in sets:
        env = dict(os.environ, XLA_FLAGS=xla_flags, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--reps",
                               str(args.reps)], env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{xla_flags or '(defaults)'}: failed\n{proc.stderr[-2000:]}")
            continue
        rows[xla_flags] = json.loads(line[-1][len("RESULT "):])
    cols = [f"{d} {n}" for d in DTYPES for n in SIZES]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU threads; median GFLOP/s of {args.reps} "
          "jitted square matmuls (x the defaults row of this run)")
    print()
    print("| XLA_FLAGS | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    base = rows.get("")
    for xla_flags, r in rows.items():
        cells = [f"{r[c]:.0f}" + (f" ({r[c] / base[c]:.2f}x)" if base else "") for c in cols]
        print(f"| {xla_flags or '(defaults)'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
