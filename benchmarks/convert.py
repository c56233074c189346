"""Benchmark: universal -> Orbax or ZeRO -> Orbax conversion against a plain copy of the same bytes.

    python benchmarks/convert.py [--source universal|zero] [--dp 64] [--layers 26 --hidden 2048 ...]
        [--no-optimizer-state] [--workdir DIR]

Writes a synthetic checkpoint (default ~1.3B parameters, an AuroraGPT-shaped GQA Llama, with Adam
state) in a child process:
  universal  with the project's universal writer (converters.orbax_to_universal.write_universal);
  zero       a DeepSpeed ZeRO-1 save at DP = --dp (bf16 run, DeepSpeedZeroOptimizer >= 0.16.4
             files: one bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt per rank plus
             mp_rank_00_model_states.pt with bf16 module weights), pickled through the test
             suite's ZeRO writer (tests/converters/zero_writer.py, spec/zero-shards.md §1-§5) with
             values that are a hash of their flat index, so no rank needs the whole model;
then in the same run measures
  1. a plain copy of the files the converter reads,
  2. the converter (`converters.universal_to_orbax` or `converters.zero_to_orbax`) in a child
     process, timing it and reading its peak RSS,
  3. the peak RSS of a child that only imports what the converter imports,
and prints a table with the ratio of conversion time to copy time and of peak RSS to the largest
tensor (absolute, and above the imports). Each step runs in a fresh process; the page cache is not
dropped (no root), so both read what the writer left in memory as far as it fits.
"""

from __future__ import annotations

import argparse  # the Namespace of Megatron's args in the synthetic ZeRO checkpoint
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from absl import flags

from agpt_jax import cli


def _write_synthetic(root: str, args: types.SimpleNamespace) -> tuple[int, int]:
    from agpt_jax.model import GPTConfig
    from converters import megatron_layout
    from converters import orbax_to_universal as o2u

    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                    num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                    seq_length=2048)
    rng = np.random.default_rng(0)

    def source(t: megatron_layout.MegatronTensor, state: str) -> np.ndarray:
        return rng.random(t.shape, dtype=np.float32)

    megatron_args = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                     "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                     "ffn_hidden_size": cfg.ffn_hidden_size, "seq_length": cfg.seq_length,
                     "rope_theta": cfg.rope_theta, "layernorm_epsilon": cfg.norm_eps,
                     "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by}
    contents = o2u.UniversalContents(
        config=cfg, scheme=megatron_layout.NameScheme.MODULE, iteration=1000, step=1000.0,
        param_groups=[{"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
                      {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}],
        args=megatron_args)
    o2u.write_universal(root, contents, source, progress=False)
    largest = max(int(np.prod(t.shape)) * 4
                  for t in megatron_layout.megatron_tensors(cfg, contents.scheme))
    return cfg.num_params(), largest


def _hashed(state: str, group: int, lo: int, hi: int) -> np.ndarray:
    """Flat elements [lo, hi) of one group's state: a hash of the index, in a plausible range
    (exp_avg_sq >= 0), so any slice is made without the rest and zstd finds little to squeeze."""
    i = np.arange(lo, hi, dtype=np.uint64)
    salt = {"fp32": 1, "exp_avg": 2, "exp_avg_sq": 3}[state] * 1000003 + group * 7919
    x = (((i * np.uint64(2654435761)) + np.uint64(salt)) % np.uint64(1 << 32)).astype(np.float32)
    x /= np.float32(1 << 32)
    scale = {"fp32": 0.04, "exp_avg": 1e-3, "exp_avg_sq": 1e-6}[state]
    return (x if state == "exp_avg_sq" else x - np.float32(0.5)) * np.float32(scale)


def _write_synthetic_zero(root: str, args: types.SimpleNamespace, dp: int) -> tuple[int, int]:
    """A DeepSpeed ZeRO-1 save root of the model at DP = dp (see the module docstring)."""
    import collections
    import importlib.util

    import ml_dtypes

    from agpt_jax.model import GPTConfig
    from converters import megatron_layout
    from converters import pt_archive

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "converters", "zero_writer.py")
    spec = importlib.util.spec_from_file_location("zero_writer", path)
    zw = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = zw  # its dataclasses look their module up while being made
    spec.loader.exec_module(zw)

    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                    num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                    seq_length=2048)
    tensors = megatron_layout.megatron_tensors(cfg, megatron_layout.NameScheme.MODULE)
    groups = [[t for t in tensors if len(t.shape) > 1], [t for t in tensors if len(t.shape) == 1]]
    layout = []  # per group: (N, S, [(tensor, offset)])
    for ts in groups:
        offsets = np.cumsum([0] + [int(np.prod(t.shape)) for t in ts])
        n = int(offsets[-1])
        size = -(-n // (2 * dp)) * 2 * dp // dp
        layout.append((n, size, list(zip(ts, offsets[:-1].tolist()))))
    iteration = 1000
    folder = os.path.join(root, f"global_step{iteration}")
    os.makedirs(folder)
    ds_config = {"train_batch_size": 8 * dp, "train_micro_batch_size_per_gpu": 1,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
                 "bf16": {"enabled": True}}
    for r in range(dp):
        fp32, paddings, mappings, state = [], [], [], {}
        for g, (n, size, members) in enumerate(layout):
            lo, real = r * size, min(max(n - r * size, 0), size)
            fp32.append(_hashed("fp32", g, lo, lo + real))
            paddings.append(size - real)
            moments = {}
            for k in ("exp_avg", "exp_avg_sq"):
                moments[k] = np.zeros(size, np.float32)
                moments[k][:real] = _hashed(k, g, lo, lo + real)
            mapping = collections.OrderedDict()
            for t, off in members:
                a, b = max(off, lo), min(off + int(np.prod(t.shape)), lo + real)
                if b > a:
                    mapping[t.name] = zw.fragment_address(numel=b - a, start=a - lo)
            mappings.append(mapping)
            state[g] = {"step": np.array(float(iteration), np.float32), **moments}
        osd = {"loss_scaler": zw.LossScaler(1.0), "dynamic_loss_scale": False,
               "overflow": False, "clip_grad": 1.0,
               "base_optimizer_state": {"state": state, "param_groups": zw._param_groups()},
               "single_partition_of_fp32_groups": fp32,
               "zero_stage": zw.ZeroStageEnum.optimizer_states, "group_paddings": paddings,
               "partition_count": [dp, dp], "ds_version": "0.16.9",
               "param_slice_mappings": mappings}
        zw.save({"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": "0.16.9"},
                os.path.join(folder, f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        del fp32, state, osd
    module = {"language_model": {"embedding": {"word_embeddings": {}}, "encoder": {},
                                 "output_layer": {}}}
    for g, (_, _, members) in enumerate(layout):
        for t, off in members:
            w = _hashed("fp32", g, off, off + int(np.prod(t.shape))).reshape(t.shape)
            w = w.astype(ml_dtypes.bfloat16)
            lm = module["language_model"]
            if t.name.startswith("language_model.encoder."):
                lm["encoder"][t.name[len("language_model.encoder."):]] = w
            elif "word_embeddings" in t.name:
                lm["embedding"]["word_embeddings"]["weight"] = w
            else:
                lm["output_layer"]["weight"] = w
    megatron_args = argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, seq_length=cfg.seq_length,
        max_position_embeddings=cfg.seq_length, rope_theta=cfg.rope_theta,
        layernorm_epsilon=cfg.norm_eps, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        padded_vocab_size=cfg.padded_vocab_size, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, swiglu=True, normalization="rmsnorm",
        untie_embeddings_and_output_weights=True, add_bias_linear=False,
        params_dtype=zw.TORCH_BF16, bf16=True, lr=2e-4, min_lr=2e-5, seed=1234,
        deepspeed=True, zero_stage=1, data_parallel_size=dp, init_method_std=0.02)
    states = {
        "module": module, "optimizer": None,
        "param_shapes": [collections.OrderedDict((t.name, pt_archive.TorchSize(t.shape))
                                                 for t, _ in members) for _, _, members in layout],
        "frozen_param_shapes": None, "shared_params": {}, "sparse_tensor_module_names": set(),
        "skipped_steps": 0, "global_steps": iteration, "dp_world_size": dp, "mp_world_size": 1,
        "ds_config": ds_config, "ds_version": "0.16.9", "args": megatron_args,
        "checkpoint_version": 3.0, "iteration": iteration,
        "universal_checkpoint_info": {
            "universal_checkpoint_version": 0.2, "original_vocab_size": cfg.vocab_size,
            "padded_vocab_size": cfg.padded_vocab_size,
            "vocabulary_parameter_patterns": ["word_embeddings.weight", "output_layer.weight"],
            "parameter_with_2_sub_params_cat_dim_0": ["mlp.dense_h_to_4h.weight"]},
    }
    zw.save(states, os.path.join(folder, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"global_step{iteration}")
    largest = max(int(np.prod(t.shape)) * 4 for t in tensors)
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
import importlib, resource, sys, time
u = importlib.import_module('converters.' + sys.argv[1])
t0 = time.perf_counter()
code = u.main(sys.argv[2:])
assert code == 0, code
print('RESULT', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_IMPORTS = """
import importlib, resource, sys
importlib.import_module('converters.' + sys.argv[1])
import jax, tensorstore
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
        shape = types.SimpleNamespace(**dict(zip(("layers", "hidden", "heads", "kv_heads", "ffn",
                                               "vocab"), dims)))
        dp = int(argv[8])
        n_params, largest = (_write_synthetic_zero(argv[1], shape, dp) if dp else
                             _write_synthetic(argv[1], shape))
        print(n_params, largest)
        return 0
    fv = flags.FlagValues()
    flags.DEFINE_integer("layers", 26, "transformer layers", flag_values=fv)
    flags.DEFINE_integer("hidden", 2048, "hidden size", flag_values=fv)
    flags.DEFINE_integer("heads", 16, "query heads", flag_values=fv)
    flags.DEFINE_integer("kv-heads", 4, "key/value heads", flag_values=fv)
    flags.DEFINE_integer("ffn", 5632, "SwiGLU hidden size", flag_values=fv)
    flags.DEFINE_integer("vocab", 32000, "vocabulary size", flag_values=fv)
    flags.DEFINE_integer("dp", 64, "data-parallel ranks (--source zero)", flag_values=fv)
    flags.DEFINE_enum("source", "universal", ("universal", "zero"), "the checkpoint converted",
                      flag_values=fv)
    flags.DEFINE_bool("no-optimizer-state", False, "convert params only", flag_values=fv)
    flags.DEFINE_string("workdir", None, "scratch folder (default: a temp dir)", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    optimizer_state = not args.no_optimizer_state

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="agpt-convert-bench-", dir=args.workdir)
    try:
        zero = args.source == "zero"
        src = os.path.join(work, args.source)
        os.makedirs(src)
        t0 = time.perf_counter()
        # In a child, so this process stays small: Linux keeps ru_maxrss across fork + exec.
        shape = [str(v) for v in (args.layers, args.hidden, args.heads, args.kv_heads, args.ffn,
                                  args.vocab)]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--write-synthetic", src,
                              *shape, str(args.dp if zero else 0)], check=True,
                             capture_output=True, text=True).stdout
        n_params, largest = (int(v) for v in out.split()[-2:])
        kind = f"ZeRO-1 (DP = {args.dp})" if zero else "universal"
        print(f"synthetic {kind} checkpoint: {n_params / 1e9:.2f}B params, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        folder = os.path.join(src, sorted(n for n in os.listdir(src)
                                          if n.startswith("global_step"))[0])
        if zero:  # every rank file is read whole (fp32 slices and both moments) + model states
            files = sorted(os.path.join(folder, n) for n in os.listdir(folder))
        else:
            files = _tensor_files(folder, optimizer_state)
        nbytes = sum(os.path.getsize(f) for f in files)

        copy_dir = os.path.join(work, "copy")
        os.makedirs(copy_dir)
        copy_s, copy_rss = _run_child(_COPY, [*files, copy_dir])
        shutil.rmtree(copy_dir)

        dst = os.path.join(work, "orbax")
        converter = "zero_to_orbax" if zero else "universal_to_orbax"
        cmd = ["--load", src, "--save", dst] + ([] if optimizer_state else ["--no-optimizer-state"])
        conv_s, conv_rss = _run_child(_CONVERT, [converter, *cmd])
        _, import_rss = _run_child(_IMPORTS, [converter])
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst)
                        for f in fs)

        gb = 1e9
        print()
        print(f"{'step':<34}{'wall s':>9}{'GB/s':>8}{'peak RSS GB':>13}")
        print(f"{'plain copy of the files read':<34}{copy_s:>9.1f}{nbytes / gb / copy_s:>8.2f}"
              f"{copy_rss / gb:>13.2f}")
        print(f"{converter:<34}{conv_s:>9.1f}{nbytes / gb / conv_s:>8.2f}"
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
