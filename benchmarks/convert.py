"""Benchmark: universal -> Orbax conversion against a plain copy of the same bytes.

    python benchmarks/convert.py [--layers 26 --hidden 2048 ...] [--no-optimizer-state]
        [--workdir DIR]

Writes a synthetic universal checkpoint (default ~1.3B parameters, an AuroraGPT-shaped GQA Llama)
with the project's universal writer, then in the same run measures
  1. a plain copy of the tensor files the converter reads
     (zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt),
  2. `converters.universal_to_orbax` in a child process, timing it and reading its peak RSS,
and prints a table with the ratio of conversion time to copy time and of peak RSS to the largest
tensor. Each step runs in a fresh process; the page cache is not dropped (no root), so both read
what the writer left in memory as far as it fits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _write_synthetic(root: str, args: argparse.Namespace) -> tuple[int, int]:
    from agpt_jax.model import GPTConfig
    from converters import megatron_layout as ml
    from converters import orbax_to_universal as o2u

    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                    num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                    seq_length=2048)
    rng = np.random.default_rng(0)

    def source(t: ml.MegatronTensor, state: str) -> np.ndarray:
        return rng.random(t.shape, dtype=np.float32)

    megatron_args = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                     "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                     "ffn_hidden_size": cfg.ffn_hidden_size, "seq_length": cfg.seq_length,
                     "rope_theta": cfg.rope_theta, "layernorm_epsilon": cfg.norm_eps,
                     "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by}
    contents = o2u.UniversalContents(
        config=cfg, scheme=ml.NameScheme.MODULE, iteration=1000, step=1000.0,
        param_groups=[{"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
                      {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}],
        args=megatron_args)
    o2u.write_universal(root, contents, source, progress=False)
    largest = max(int(np.prod(t.shape)) * 4 for t in ml.megatron_tensors(cfg, contents.scheme))
    return cfg.num_params(), largest


def _tensor_files(folder: str, optimizer_state: bool) -> list[str]:
    states = ("fp32", "exp_avg", "exp_avg_sq") if optimizer_state else ("fp32",)
    zero = os.path.join(folder, "zero")
    return [os.path.join(zero, n, f"{s}.pt") for n in sorted(os.listdir(zero))
            if os.path.isdir(os.path.join(zero, n)) for s in states]


# Each child reports its own wall time (after imports) and peak RSS (ru_maxrss of itself, so the
# parent's memory inherited at fork does not count).
_COPY = """
import os, resource, shutil, sys, time
files, dst = sys.argv[1:-1], sys.argv[-1]
t0 = time.perf_counter()
for i, f in enumerate(files):
    shutil.copyfile(f, os.path.join(dst, str(i)))
print('RESULT', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_CONVERT = """
import resource, sys, time
import converters.universal_to_orbax as u
t0 = time.perf_counter()
code = u.main(sys.argv[1:])
assert code == 0, code
print('RESULT', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_IMPORTS = """
import resource
import converters.universal_to_orbax, torch, jax, tensorstore
print('RESULT', 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run_child(code: str, argv: list[str]) -> tuple[float, int]:
    """Wall time (s, excluding interpreter start-up and imports) and peak RSS (bytes)."""
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True,
                         text=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split()
    return float(line[1]), int(line[2]) * 1024


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--write-synthetic":
        dims = [int(v) for v in argv[2:8]]
        shape = argparse.Namespace(**dict(zip(("layers", "hidden", "heads", "kv_heads", "ffn",
                                               "vocab"), dims)))
        n_params, largest = _write_synthetic(argv[1], shape)
        print(n_params, largest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-optimizer-state", action="store_true")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    optimizer_state = not args.no_optimizer_state

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="agpt-convert-bench-", dir=args.workdir)
    try:
        src = os.path.join(work, "universal")
        os.makedirs(src)
        t0 = time.perf_counter()
        # In a child, so this process stays small: Linux keeps ru_maxrss across fork + exec.
        shape = [str(v) for v in (args.layers, args.hidden, args.heads, args.kv_heads, args.ffn,
                                  args.vocab)]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--write-synthetic", src,
                              *shape], check=True, capture_output=True, text=True).stdout
        n_params, largest = (int(v) for v in out.split()[-2:])
        print(f"synthetic universal checkpoint: {n_params / 1e9:.2f}B params, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        folder = os.path.join(src, os.listdir(src)[0] if os.listdir(src)[0] != "latest_universal"
                              else sorted(os.listdir(src))[0])
        files = _tensor_files(folder, optimizer_state)
        nbytes = sum(os.path.getsize(f) for f in files)

        copy_dir = os.path.join(work, "copy")
        os.makedirs(copy_dir)
        copy_s, copy_rss = _run_child(_COPY, [*files, copy_dir])
        shutil.rmtree(copy_dir)

        dst = os.path.join(work, "orbax")
        cmd = ["--load", src, "--save", dst] + ([] if optimizer_state else ["--no-optimizer-state"])
        conv_s, conv_rss = _run_child(_CONVERT, cmd)
        _, import_rss = _run_child(_IMPORTS, [])
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst)
                        for f in fs)

        gb = 1e9
        print()
        print(f"{'step':<34}{'wall s':>9}{'GB/s':>8}{'peak RSS GB':>13}")
        print(f"{'plain copy of the tensor files':<34}{copy_s:>9.1f}{nbytes / gb / copy_s:>8.2f}"
              f"{copy_rss / gb:>13.2f}")
        print(f"{'universal_to_orbax':<34}{conv_s:>9.1f}{nbytes / gb / conv_s:>8.2f}"
              f"{conv_rss / gb:>13.2f}")
        print()
        print(f"input {nbytes / gb:.2f} GB in {len(files)} files, output {out_bytes / gb:.2f} GB; "
              f"largest tensor {largest / gb:.3f} GB")
        print(f"conversion / copy time: {conv_s / copy_s:.2f}x")
        print(f"conversion peak RSS / largest tensor: {conv_rss / largest:.1f}x; above the "
              f"{import_rss / gb:.2f} GB of the imports alone: "
              f"{(conv_rss - import_rss) / largest:.1f}x (peak RSS / input bytes: "
              f"{conv_rss / nbytes:.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
