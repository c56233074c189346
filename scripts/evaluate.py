"""Evaluate a checkpoint: loss and perplexity per corpus, or the logits of given token rows.

    python scripts/evaluate.py --checkpoint RUN_OR_CKPT --data-file-list mix.txt [--split valid]
    python scripts/evaluate.py --checkpoint RUN_OR_CKPT --tokens rows.npy --save-logits logits.npy

`--checkpoint` is a converted checkpoint (converters.universal_to_orbax) or a cpt.py --save folder
(its newest step). The loss is the compiled eval step of training (`agpt_jax.train.eval_step`,
built for the params alone by agpt_jax/evaluate.py, which this script is the command line of):
mean token cross-entropy over the padded vocabulary in fp32, per sequence; a corpus's loss is the
mean over its sequences (every sequence has seq_length tokens, so this is also the token mean)
and its perplexity is exp(loss).

What is evaluated (`--split`):
  valid / test  the first `--eval-iters` x `--global-batch-size` samples of that split of the
                Megatron blend of the DATA_FILE_LIST (the samples a run's first evaluation reads
                when --data-split, --seed, --train-iters, --eval-interval and the batch size
                match the run's);
  train         the same, from the train split;
  all           one epoch of every listed file, whole (Megatron's sample index over all documents,
                `--max-samples` per file at most); list weights are ignored.

`--tokens X.npy` (int [rows, length]) writes the logits (fp32 [rows, length, padded_vocab]) of those
rows to `--save-logits`, for parity checks against another implementation, and reports the
next-token loss within the rows. `--dtype` sets the compute dtype (default: the checkpoint's).
Runs in one process over every local device (`--mesh`, default fsdp over all).

Exit codes: 0 evaluated; 2 bad input (a flag, --mesh, --platform, a missing or malformed
checkpoint, data list, .bin/.idx or --tokens file, an output path that cannot be a file; one line
naming it); 1 a failure while running (jax cannot start the platform, writing --save-logits or
--json failed; an unexpected error shows its traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from agpt_jax import cli, hostmem
from agpt_jax.evaluate import (
    DTYPES,
    SPLITS,
    CorpusResult,
    DataOptions,
    EvaluateError,
    LoadedModel,
    next_token_losses,
    perplexity,
    read_samples,
    summarize,
)
from agpt_jax.paths import output_file_problem


def format_table(results: Sequence[CorpusResult]) -> str:
    """A fixed-width table: corpus, samples, tokens, loss, perplexity."""
    width = max(8, max(len(r.name) for r in results))
    lines = [f"{'corpus':<{width}}  {'samples':>8}  {'tokens':>10}  {'loss':>8}  {'ppl':>10}"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.samples:>8d}  {r.tokens:>10d}  {r.loss:>8.4f}  "
                     f"{r.perplexity:>10.2f}")
    return "\n".join(lines)


def read_token_rows(path: str, vocab: int) -> np.ndarray:
    """Token rows from a .npy file: int [rows, length], every id in [0, vocab)."""
    if not os.path.isfile(path):
        raise EvaluateError(f"--tokens {path}: no such file")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EvaluateError(f"--tokens {path}: not a .npy array ({e})") from None
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise EvaluateError(f"--tokens {path}: shape {tokens.shape}, expected [rows, length] "
                            "with at least one row and one column")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise EvaluateError(f"--tokens {path}: dtype {tokens.dtype}, expected integer token ids")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise EvaluateError(f"--tokens {path}: ids span [{lo}, {hi}], outside the model's padded "
                            f"vocabulary [0, {vocab})")
    return tokens.astype(np.int32)


# agpt_jax.runtime.PLATFORMS, spelled out: importing agpt_jax.runtime imports jax, which --help,
# the flag checks and agpt_jax.hostmem's re-exec must not (tests/test_evaluate.py compares them).
PLATFORMS = ("auto", "xpu", "cpu")


# agpt_jax.runtime.PLATFORMS, spelled out: agpt_jax.runtime imports jax, which this script imports
# only to evaluate, not for --help or its flag checks (tests/test_evaluate.py compares the two).
PLATFORMS = ("auto", "xpu", "cpu")


def parse_args(argv: Sequence[str] | None) -> types.SimpleNamespace:
    """The flags of `argv` (sys.argv[1:] when None); a bad flag exits 2 (agpt_jax/cli.py)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "checkpoint dir or cpt.py --save folder",
                        required=True, flag_values=fv)
    flags.DEFINE_string("data-file-list", None, "DATA_FILE_LIST to evaluate on", flag_values=fv)
    flags.DEFINE_enum("split", "valid", SPLITS, "samples to evaluate", flag_values=fv)
    flags.DEFINE_string("tokens", None, ".npy int [rows, length] to compute logits of",
                        flag_values=fv)
    flags.DEFINE_string("save-logits", None, ".npy to write the logits to (--tokens)",
                        flag_values=fv)
    flags.DEFINE_enum("dtype", None, DTYPES, "compute dtype (default: the checkpoint's)",
                      flag_values=fv)
    flags.DEFINE_integer("seq-length", None, "tokens per sample (default: the checkpoint's "
                         "seq_length)", flag_values=fv)
    flags.DEFINE_integer("global-batch-size", 8, "Megatron --global-batch-size", flag_values=fv)
    flags.DEFINE_integer("eval-iters", 10, "batches evaluated (not for all)", flag_values=fv)
    flags.DEFINE_integer("batch-size", None, "rows per compiled call (default: "
                         "--global-batch-size)", flag_values=fv)
    flags.DEFINE_integer("seed", 1234, "Megatron --seed of the blend", flag_values=fv)
    flags.DEFINE_string("data-split", "990,10,0", "Megatron --split ratios (the run configs')",
                        flag_values=fv)
    flags.DEFINE_integer("train-iters", 1, "the run's --train-iters (blend)", flag_values=fv)
    flags.DEFINE_integer("eval-interval", 100, "the run's --eval-interval (the recipes')",
                         flag_values=fv)
    flags.DEFINE_bool("shuffle-sample-in-corpus", True, "Megatron's in-corpus shuffle, as the run "
                      "used it (on, as the recipes and AuroraGPT's launcher)", flag_values=fv)
    flags.DEFINE_bool("blend-sample-in-corpus", False, "Megatron's in-corpus blend, as the run "
                      "used it", flag_values=fv)
    flags.DEFINE_integer("max-samples", None, "--split all: samples per file", flag_values=fv)
    flags.DEFINE_string("data-cache-path", None, "sample index cache folder", flag_values=fv)
    flags.DEFINE_string("mesh", "", "mesh axes, e.g. 'data=1,fsdp=-1,tensor=1'", flag_values=fv)
    flags.DEFINE_enum("platform", "auto", PLATFORMS, "platform to start", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the results to this JSON file", flag_values=fv)
    return cli.parse(fv, argv, __doc__)


class RunFailedError(RuntimeError):
    """A failure while evaluating (not the input's fault): the platform, a failed write."""


def _check_args(args: types.SimpleNamespace) -> None:
    if args.data_file_list is None and args.tokens is None:
        raise EvaluateError("pass --data-file-list (loss per corpus) or --tokens (logits)")
    if (args.tokens is None) != (args.save_logits is None):
        raise EvaluateError("--tokens and --save-logits go together: the logits of --tokens are "
                            "written to --save-logits")
    if args.save_logits is not None and not args.save_logits.endswith(".npy"):
        raise EvaluateError(f"--save-logits {args.save_logits!r} must end with .npy")
    for name in ("global_batch_size", "eval_iters", "train_iters", "eval_interval"):
        if getattr(args, name) < 1:
            raise EvaluateError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("seq_length", "batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvaluateError(f"--{name.replace('_', '-')} {value} must be >= 1")
    for flag, path in (("--save-logits", args.save_logits), ("--json", args.json)):
        problem = path and output_file_problem(path)
        if problem:
            raise EvaluateError(f"{flag} {path}: {problem}")


def run(args: types.SimpleNamespace) -> dict[str, Any]:
    """Evaluate as the flags say; print the results; return them as a JSON-ready dict."""
    from agpt_jax import runtime

    _check_args(args)
    try:
        runtime.initialize(args.platform)
    except ValueError as e:
        raise EvaluateError(f"--platform {args.platform}: {e}".replace("\n", " ")) from None
    except RuntimeError as e:
        raise RunFailedError(str(e).replace("\n", " ")) from None
    start = time.perf_counter()
    loaded = LoadedModel(args.checkpoint, args.dtype, args.mesh)
    cfg = loaded.config
    report: dict[str, Any] = {"checkpoint": loaded.checkpoint, "dtype": cfg.compute_dtype}
    print(f"checkpoint {loaded.checkpoint}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.padded_vocab_size}, compute {cfg.compute_dtype}, "
          f"{time.perf_counter() - start:.1f} s to load")
    batch = args.batch_size or args.global_batch_size
    if args.tokens is not None:
        tokens = read_token_rows(args.tokens, cfg.padded_vocab_size)
        logits = loaded.logits(tokens, batch)
        out = os.path.abspath(args.save_logits)
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            np.save(out, logits)
        except OSError as e:
            raise RunFailedError(f"writing --save-logits {out} failed ({e})") from None
        report["logits"] = {"tokens": os.path.abspath(args.tokens), "file": out,
                            "shape": list(logits.shape)}
        print(f"logits {tuple(logits.shape)} float32 of {args.tokens} -> {out}")
        if tokens.shape[1] > 1:
            loss = float(np.mean(next_token_losses(logits, tokens)))
            report["logits"]["next_token_loss"] = loss
            print(f"next-token loss within the rows {loss:.4f} (ppl {perplexity(loss):.2f})")
    if args.data_file_list is not None:
        opts = DataOptions(
            file_list=args.data_file_list, split=args.split,
            seq_length=args.seq_length or cfg.seq_length,
            global_batch_size=args.global_batch_size, eval_iters=args.eval_iters,
            seed=args.seed, data_split=args.data_split, train_iters=args.train_iters,
            eval_interval=args.eval_interval, max_samples=args.max_samples,
            cache_dir=args.data_cache_path,
            shuffle_sample_in_corpus=args.shuffle_sample_in_corpus,
            blend_sample_in_corpus=args.blend_sample_in_corpus)
        t0 = time.perf_counter()
        samples = read_samples(opts)
        losses = loaded.sequence_losses(samples.rows, batch)
        results = summarize(losses, samples, opts.seq_length)
        print(f"{args.split} split of {args.data_file_list}: {samples.rows.shape[0]} samples of "
              f"{opts.seq_length} tokens, {time.perf_counter() - t0:.1f} s")
        print(format_table(results))
        report["split"] = args.split
        report["data_file_list"] = os.path.abspath(args.data_file_list)
        report["results"] = {r.name: dataclasses.asdict(r) for r in results}
    if args.json:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as e:
            raise RunFailedError(f"writing --json {args.json} failed ({e})") from None
        print(f"wrote {os.path.abspath(args.json)}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # First: glibc reads its tunables only at start-up (agpt_jax/hostmem.py); this may re-execute.
    hostmem.reexec_with_huge_pages()
    sys.exit(main())
