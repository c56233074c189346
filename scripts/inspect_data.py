"""Print how a DATA_FILE_LIST blends, and optionally dump or decode the first training batches.

    python scripts/inspect_data.py --data-file-list mix.txt --seq-length 4096 --global-batch-size 6144 \\
        --train-iters 874 --dump 2 --out batches.npz

The defaults are those of the training recipes (agpt_jax/recipes.py `base_config`, which follows
AuroraGPT's launcher, at the 7B scale), not Megatron's arguments.py defaults (split "969, 30, 1",
eval interval 1000, eval iters 100, no in-corpus shuffle): split 990,10,0, eval interval 100, eval
iters 20, seed 1234, --shuffle-sample-in-corpus on (AuroraGPT's launcher always passes it) and
--blend-sample-in-corpus off, the config keys agpt_jax/loop.py builds the training blend from.
So the data list, sequence length, global batch size and train iterations alone show the blend a
recipe trains on; a run with SPLIT, EVAL_INTERVAL, EVAL_ITERS or SEED set, another scale, or its
in-corpus config keys overridden needs the same values as flags. The blend is built as training builds it; training
caches its index arrays in <run_dir>/data_cache (pass that as --data-cache-path to reuse them; the
arrays are the same without a cache). The cooldown recipe continues its source's data stream: its
blend is built for the source's iterations plus its own, so pass their sum as --train-iters.

`--dump K --out F` writes `tokens` int64[K*B, S+1] (row r of iteration t at t*B+r) and `corpus`
int64[K*B] (index into the corpora in sorted-name order, also saved as `corpora`).

Exit codes: 0 done; 2 bad input (a missing or malformed list, .bin/.idx, tokenizer or flag; the
message names the file); 1 writing --out failed.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
from absl import flags

from agpt_jax import cli
from agpt_jax.data.blend import BlendConfig, build_blended_splits, split_num_samples
from agpt_jax.data.file_list import read_file_list
from agpt_jax.data.indexed import DataError
from agpt_jax import recipes
from agpt_jax.data.pipeline import read_global_batch


# The blend settings of the training recipes (agpt_jax/recipes.py base_config at the 7B scale, the
# keys agpt_jax/loop.py builds the blend from); tests/data/test_scripts.py checks them against both.
RECIPE_DEFAULTS = {
    **{k: recipes.FIELDS[k].default for k in ("split", "seed", "shuffle_sample_in_corpus",
                                              "blend_sample_in_corpus")},
    **{k: recipes.SIZES["agpt_7b"][k] for k in ("eval_interval", "eval_iters")}}


def parse_args(argv: list[str] | None) -> types.SimpleNamespace:
    """The flags of `argv` (sys.argv[1:] when None); a bad flag exits 2 (agpt_jax/cli.py)."""
    fv = flags.FlagValues()
    d = RECIPE_DEFAULTS
    flags.DEFINE_string("data-file-list", None, "the DATA_FILE_LIST", required=True,
                        flag_values=fv)
    for name in ("seq-length", "global-batch-size", "train-iters"):
        flags.DEFINE_integer(name, None, f"Megatron --{name}", required=True, flag_values=fv)
    flags.DEFINE_integer("eval-interval", d["eval_interval"], "the 7B recipe's EVAL_INTERVAL",
                         flag_values=fv)
    flags.DEFINE_integer("eval-iters", d["eval_iters"], "the 7B recipe's EVAL_ITERS",
                         flag_values=fv)
    flags.DEFINE_integer("seed", d["seed"], "the recipes' SEED", flag_values=fv)
    flags.DEFINE_string("split", d["split"], "the recipes' SPLIT", flag_values=fv)
    flags.DEFINE_bool("shuffle-sample-in-corpus", d["shuffle_sample_in_corpus"],
                      "as the recipes train", flag_values=fv)
    flags.DEFINE_bool("blend-sample-in-corpus", d["blend_sample_in_corpus"],
                      "as the recipes train", flag_values=fv)
    flags.DEFINE_string("data-cache-path", None, "index cache folder (default: no cache)",
                        flag_values=fv)
    flags.DEFINE_integer("dump", 0, "K: the first K global training batches", flag_values=fv)
    flags.DEFINE_string("out", None, "npz file for --dump", flag_values=fv)
    flags.DEFINE_string("decode", None, "TOKENIZER: print dumped rows as text", flag_values=fv)
    flags.DEFINE_string("tokenizer-type", None, "for --decode; default: by file name",
                        flag_values=fv)
    return cli.parse(fv, argv, __doc__)


def describe(splits: dict, entries, cfg: BlendConfig) -> str:
    """The blend as text: per-file documents/tokens/epochs/samples, per-corpus samples and share."""
    lines = []
    targets = dict(zip(("train", "valid", "test"), split_num_samples(cfg)))
    lines.append(f"{len(entries)} files, corpora: {', '.join(sorted({e.corpus for e in entries}))}")
    for name, ds in splits.items():
        lines.append(f"\n[{name}] {len(ds)} samples (target {targets[name]}), "
                     f"{len(ds) // cfg.global_batch_size} global batches of {cfg.global_batch_size}")
        lines.append(f"  {'file':<48} {'corpus':<14} {'docs':>9} {'tokens':>13} {'epochs':>6} {'samples':>10}")
        for c in ds.corpus_datasets:
            for f, n in zip(c.files, c.file_num_samples):
                prefix = f.dataset.prefix if len(f.dataset.prefix) <= 48 else "..." + f.dataset.prefix[-45:]
                lines.append(f"  {prefix:<48} {c.name:<14} {len(f.documents):>9} "
                             f"{f.index.tokens_per_epoch:>13} {f.index.num_epochs:>6} {int(n):>10}")
        used = np.bincount(ds.dataset_index, minlength=len(ds.corpora))
        lines.append(f"  {'corpus':<14} {'samples':>10} {'share':>8} {'weight':>8}")
        for cid, c in enumerate(ds.corpus_datasets):
            lines.append(f"  {c.name:<14} {int(used[cid]):>10} {used[cid] / len(ds):>8.4f} {ds.weights[cid]:>8.4f}")
    return "\n".join(lines)


def run(args: types.SimpleNamespace) -> None:
    """Print the blend; dump and decode the first batches as the flags say.

    Raises:
        DataError: bad input (the message names the file or flag).
        OSError: writing --out failed.
    """
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise DataError(f"--out {args.out}: the folder {folder} does not exist; create it or "
                            "choose another --out")
        if not args.dump:
            raise DataError(f"--out {args.out} needs --dump K (the batches to write)")
    tok = None
    if args.decode:
        from agpt_jax.data.tokenizer import load_tokenizer

        kind = args.tokenizer_type or ("HFTokenizer" if args.decode.endswith(".json") else "Llama2Tokenizer")
        tok = load_tokenizer(kind, args.decode)
    entries = read_file_list(args.data_file_list)
    cfg = BlendConfig(seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                      train_iters=args.train_iters, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                      seed=args.seed, split=args.split, shuffle_sample_in_corpus=args.shuffle_sample_in_corpus,
                      blend_sample_in_corpus=args.blend_sample_in_corpus, cache_dir=args.data_cache_path)
    splits = build_blended_splits(entries, cfg)
    print(describe(splits, entries, cfg))
    if not args.dump:
        return
    if "train" not in splits:
        raise DataError("--dump needs a train split (its --split part is 0)")
    train = splits["train"]
    k = args.dump
    if k * cfg.global_batch_size > len(train):
        raise DataError(f"--dump {k}: the train blend holds only {len(train) // cfg.global_batch_size} batches")
    batches = [read_global_batch(train, t, cfg.global_batch_size) for t in range(k)]
    tokens = np.concatenate([b["text"] for b in batches]).astype(np.int64)
    corpus = np.concatenate([b["corpus"] for b in batches]).astype(np.int64)
    if args.out:
        np.savez(args.out, tokens=tokens, corpus=corpus, corpora=np.array(train.corpora))
        print(f"\nwrote {args.out}: tokens {tokens.shape} int64, corpus {corpus.shape}")
    if tok is not None:
        for row in range(tokens.shape[0]):
            t, r = divmod(row, cfg.global_batch_size)
            print(f"\n--- iteration {t} row {r} [{train.corpora[corpus[row]]}] ---")
            print(tok.detokenize(tokens[row]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing --out {args.out} failed ({e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
