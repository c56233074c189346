"""Data pipeline benchmark: Megatron-exact index build and batch streaming vs. what a 7B run consumes.

Writes a synthetic DATA_FILE_LIST of `--docs` documents (uint16, lengths 1..`--max-doc-len`) in 10
files over 3 corpora, builds the blended train/valid/test index as Megatron does (990,10,0,
shuffle-sample-in-corpus), then streams `--batches` global batches of `--batch` x `--seq-length`.

Printed: index build time (cold and cached), batches/s and tokens/s with grain prefetch threads and
synchronously (the baseline, same run), a raw contiguous memmap read of the same token count (the
upper bound, same run), peak memory, and the ratio to the rate one Aurora node consumes tokens when
training the 7B model:

    tokens/s per node = tiles * peak_bf16_per_tile * MFU / (6 * N)
    12 tiles (6 PVC GPUs x 2), 416 TFLOP/s bf16 per tile (Max 1550: 832 per GPU), MFU 40 %,
    N = 5.93e9 parameters (AuroraGPT-7B, spec/megatron-deepspeed.md §1.5)  ->  about 56,000 tokens/s.

    python benchmarks/data_pipeline.py [--docs 1000000] [--batches 2000]
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from absl import flags

from agpt_jax import cli

FILES = [("web", 0.20), ("web", 0.15), ("web", 0.10), ("web", 0.05), ("code", 0.10), ("code", 0.08),
         ("code", 0.07), ("papers", 0.12), ("papers", 0.08), ("papers", 0.05)]
AURORA_TILES = 12
TILE_PEAK_BF16 = 416e12
MFU = 0.40
PARAMS_7B = 5.93e9


def aurora_node_tokens_per_s() -> float:
    """Tokens/s one Aurora node consumes training the 7B model at the stated MFU (6N FLOPs/token)."""
    return AURORA_TILES * TILE_PEAK_BF16 * MFU / (6 * PARAMS_7B)


def _write_files(folder: str, docs: int, max_len: int, seed: int) -> None:
    """Writes the synthetic files and list (run in a child process so its memory is not counted)."""
    from agpt_jax.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    per_file = docs // len(FILES)
    lines = []
    for i, (corpus, weight) in enumerate(FILES):
        prefix = os.path.join(folder, f"{corpus}_{i:02d}_text_document")
        lengths = rng.integers(1, max_len + 1, size=per_file)
        tokens = rng.integers(0, 32000, size=int(lengths.sum()), dtype=np.uint16)
        builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
        ends = np.cumsum(lengths)
        for s, e in zip(ends - lengths, ends):
            builder.add_document(tokens[s:e], [int(e - s)])
        builder.finalize(prefix + ".idx")
        lines.append(f"{weight} {prefix} {corpus}")
    with open(os.path.join(folder, "list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_integer("docs", 1_000_000, "synthetic documents", flag_values=fv)
    flags.DEFINE_integer("max-doc-len", 600, "tokens of the longest document", flag_values=fv)
    flags.DEFINE_integer("batches", 2000, "global batches streamed", flag_values=fv)
    flags.DEFINE_integer("batch", 8, "sequences per global batch", flag_values=fv)
    flags.DEFINE_integer("seq-length", 4096, "tokens per sequence", flag_values=fv)
    flags.DEFINE_integer("prefetch", 4, "grain prefetch threads", flag_values=fv)
    flags.DEFINE_string("folder", None, "keep the synthetic files here (default: a temp dir)",
                        flag_values=fv)
    args = cli.parse(fv, argv, __doc__)

    from agpt_jax.data import BlendConfig, build_blended_splits, make_batch_iterator, read_file_list

    folder = args.folder or tempfile.mkdtemp(prefix="agpt_data_bench_")
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=_write_files, args=(folder, args.docs, args.max_doc_len, 0))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the synthetic files failed (exit {child.exitcode})")
    t_write = time.perf_counter() - t0
    try:
        entries = read_file_list(os.path.join(folder, "list.txt"))
        cfg = BlendConfig(seq_length=args.seq_length, global_batch_size=args.batch, train_iters=args.batches,
                          eval_interval=1000, eval_iters=10, split="990,10,0", shuffle_sample_in_corpus=True,
                          cache_dir=os.path.join(folder, "index-cache"))
        rss0 = _peak_rss_gib()
        t0 = time.perf_counter()
        splits = build_blended_splits(entries, cfg)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        splits = build_blended_splits(entries, cfg)
        t_cached = time.perf_counter() - t0
        train = splits["train"]
        total_tokens = sum(f.index.tokens_per_epoch for c in train.corpus_datasets for f in c.files)

        rates = {}
        for prefetch in (args.prefetch, 0):
            it = make_batch_iterator(train, global_batch_size=args.batch, prefetch=prefetch)
            next(it)  # start-up outside the timing
            t0 = time.perf_counter()
            n = 0
            for _ in range(args.batches - 1):
                batch = next(it)
                n += batch["tokens"].size
            dt = time.perf_counter() - t0
            rates[prefetch] = ((args.batches - 1) / dt, n / dt)
        # Upper bound: the same number of tokens read contiguously from one memmap.
        raw = np.memmap(entries[0].prefix + ".bin", dtype=np.uint16, mode="r")
        rows = min(raw.size // (args.seq_length + 1), (args.batches - 1) * args.batch)
        t0 = time.perf_counter()
        acc = 0
        for r in range(rows):
            acc += int(np.asarray(raw[r * (args.seq_length + 1):(r + 1) * (args.seq_length + 1)], np.int64)[0])
        raw_rate = rows * args.seq_length / (time.perf_counter() - t0)
        peak = _peak_rss_gib()
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)

    need = aurora_node_tokens_per_s()
    print(f"synthetic list: {args.docs:,} documents, {total_tokens:,} train-split tokens, 10 files, 3 corpora "
          f"(written in {t_write:.1f} s)")
    print(f"blend: train {len(train):,} / valid {len(splits.get('valid', [])):,} / test "
          f"{len(splits.get('test', [])):,} samples of {args.seq_length}+1 tokens, shuffle-sample-in-corpus")
    print()
    print(f"{'measure':<44} {'value':>14} {'ratio':>10}")
    print(f"{'index build, cold (s)':<44} {t_build:>14.2f}")
    print(f"{'index build, cached (s)':<44} {t_cached:>14.2f} {t_build / t_cached:>9.1f}x")
    sync_bps, sync_tps = rates[0]
    for prefetch, (bps, tps) in rates.items():
        label = f"prefetch {prefetch} threads" if prefetch else "synchronous (baseline)"
        print(f"{'batches/s, ' + label:<44} {bps:>14.1f} {bps / sync_bps:>9.2f}x")
        print(f"{'tokens/s, ' + label:<44} {tps:>14,.0f} {tps / need:>9.1f}x node")
    print(f"{'tokens/s, raw contiguous memmap (bound)':<44} {raw_rate:>14,.0f} {raw_rate / need:>9.1f}x node")
    print(f"{'Aurora node, 7B, tokens/s (stated)':<44} {need:>14,.0f} {1.0:>9.1f}x node")
    print(f"{'peak RSS (GiB), before build -> end':<44} {rss0:>6.2f} -> {peak:.2f}")
    print()
    print("Aurora node: 12 tiles x 416 TFLOP/s bf16 x 40 % MFU / (6 x 5.93e9 params); one host feeds one node.")


if __name__ == "__main__":
    main()
