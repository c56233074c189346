"""Evaluate a checkpoint: loss and perplexity per corpus, or the logits of given token rows.

    python scripts/evaluate.py --checkpoint RUN_OR_CKPT --data-file-list mix.txt [--split valid]
    python scripts/evaluate.py --checkpoint RUN_OR_CKPT --tokens rows.npy --save-logits logits.npy

`--checkpoint` is a converted checkpoint (converters.universal_to_orbax) or a cpt.py --save folder
(its newest step). The loss is the compiled eval step of training
(`agpt_jax.train.build_trainer(...).evaluate`): mean token cross-entropy over the padded
vocabulary in fp32, per sequence; a corpus's loss is the mean over its sequences (every sequence
has seq_length tokens, so this is also the token mean) and its perplexity is exp(loss).

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

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from agpt_jax import hostmem
from agpt_jax.paths import output_file_problem

SPLITS = ("valid", "test", "train", "all")
DTYPES = ("float32", "bfloat16")


class EvaluateError(ValueError):
    """A user error: bad flags, a bad checkpoint, data or token file."""


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Which samples to evaluate.

    Attributes:
        file_list: the DATA_FILE_LIST.
        split: valid | test | train | all (see the module docstring).
        seq_length: tokens per sample (each sample reads seq_length + 1 tokens).
        global_batch_size: Megatron's --global-batch-size (shapes the blend and the sample count).
        eval_iters: batches evaluated in the valid/test/train splits.
        seed: --seed of the blend.
        data_split: Megatron's --split ratios (the run configs use "990,10,0").
        train_iters: --train-iters of the run whose blend to reproduce.
        eval_interval: --eval-interval of that run.
        max_samples: split "all": at most this many samples per file (None: all).
        cache_dir: where sample indices are cached (None: not cached).
        shuffle_sample_in_corpus, blend_sample_in_corpus: Megatron's in-corpus flags, as the run
            used them (the recipes: shuffle on, blend off, as AuroraGPT's launcher passes them).
    """

    file_list: str
    split: str = "valid"
    seq_length: int = 0
    global_batch_size: int = 8
    eval_iters: int = 10
    seed: int = 1234
    data_split: str = "990,10,0"
    train_iters: int = 1
    eval_interval: int = 100
    max_samples: int | None = None
    cache_dir: str | None = None
    shuffle_sample_in_corpus: bool = True
    blend_sample_in_corpus: bool = False


@dataclasses.dataclass(frozen=True)
class EvalSamples:
    """Samples with their corpus.

    Attributes:
        rows: int64 [n, seq_length + 1] token rows (inputs are rows[:, :-1], labels rows[:, 1:]).
        corpus_ids: int32 [n] index into `corpora`.
        corpora: corpus names.
    """

    rows: np.ndarray
    corpus_ids: np.ndarray
    corpora: list[str]


@dataclasses.dataclass(frozen=True)
class CorpusResult:
    """Loss of one corpus (or "total"): mean token cross-entropy in nats, exp of it, counts."""

    name: str
    samples: int
    tokens: int
    loss: float
    perplexity: float


class LoadedModel:
    """A checkpoint's params placed on a mesh with the compiled eval step of training.

    Attributes:
        config: the GPTConfig evaluated (compute dtype as requested).
        checkpoint: the resolved checkpoint directory.
        params: params tree of sharded jax Arrays (fp32).
        trainer: `agpt_jax.train.CompiledTrainer`; only `evaluate` and the shardings are used.
        data_parallel: devices a batch is split over (batches are padded to a multiple).
    """

    def __init__(self, checkpoint: str, dtype: str | None = None, mesh_spec: str = "") -> None:
        import jax
        import optax

        from agpt_jax import init_checkpoint as ic
        from agpt_jax import optim, runtime
        from agpt_jax import train as train_lib

        try:
            self.checkpoint = ic.resolve_checkpoint_dir(checkpoint)
            config = ic.model_config(self.checkpoint)
        except ic.CheckpointError as e:
            raise EvaluateError(f"--checkpoint: {e}") from None
        if dtype is not None:
            if dtype not in DTYPES:
                raise EvaluateError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            config = config.replace(compute_dtype=dtype)
        self.config = config
        try:
            mesh = runtime.make_mesh(runtime.parse_mesh(mesh_spec))
        except ValueError as e:
            raise EvaluateError(f"--mesh: {e}") from None
        self.data_parallel = int(mesh.shape["data"] * mesh.shape["fsdp"])
        # Only the eval function is used: jit compiles lazily, so the train step never compiles.
        self.trainer = train_lib.build_trainer(
            config, optim.OptimConfig(), optax.constant_schedule(0.0),
            train_lib.StepConfig(global_batch_size=self.data_parallel), mesh)
        try:
            self.params = ic.restore_params(self.checkpoint, self.trainer.abstract_state.params)
        except (ValueError, KeyError) as e:
            raise EvaluateError(f"--checkpoint {self.checkpoint}: its params do not match the "
                                f"model in its metadata ({e})") from None
        self._logits_fn = None
        self._jax = jax

    def _padded(self, rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
        """Rows padded with copies of row 0 to a multiple of `batch_size`; returns (rows, n)."""
        n = rows.shape[0]
        total = -(-n // batch_size) * batch_size
        if total == n:
            return rows, n
        pad = np.repeat(rows[:1], total - n, axis=0)
        return np.concatenate([rows, pad]), n

    def batch_rows(self, requested: int) -> int:
        """`requested` rounded up to a multiple of the data-parallel devices."""
        dp = self.data_parallel
        return max(dp, -(-requested // dp) * dp)

    def sequence_losses(self, rows: np.ndarray, batch_size: int) -> np.ndarray:
        """Mean token cross-entropy of every row.

        Args:
            rows: int [n, S + 1] tokens; inputs rows[:, :-1], labels rows[:, 1:].
            batch_size: rows per compiled call (rounded up to the data-parallel size).

        Returns:
            float32 [n].
        """
        jax = self._jax
        b = self.batch_rows(batch_size)
        padded, n = self._padded(np.asarray(rows), b)
        out = []
        for start in range(0, padded.shape[0], b):
            chunk = padded[start:start + b]
            batch = {
                "tokens": jax.device_put(chunk[:, :-1].astype(np.int32),
                                         self.trainer.batch_sharding),
                "labels": jax.device_put(chunk[:, 1:].astype(np.int32),
                                         self.trainer.batch_sharding),
            }
            metrics = self.trainer.evaluate(self.params, batch)
            out.append(np.asarray(jax.device_get(metrics["sequence_loss"]), np.float32))
        return np.concatenate(out)[:n]

    def logits(self, tokens: np.ndarray, batch_size: int) -> np.ndarray:
        """Logits of token rows, through the same model and mesh rules as the eval step.

        Args:
            tokens: int [n, L] with 1 <= L; ids must be < padded_vocab_size.
            batch_size: rows per compiled call (rounded up to the data-parallel size).

        Returns:
            float32 [n, L, padded_vocab_size] (computed in the compute dtype, then widened).
        """
        jax = self._jax
        if self._logits_fn is None:
            self._logits_fn = self._build_logits_fn()
        b = self.batch_rows(batch_size)
        padded, n = self._padded(np.asarray(tokens, np.int32), b)
        out = []
        for start in range(0, padded.shape[0], b):
            chunk = jax.device_put(padded[start:start + b], self.trainer.batch_sharding)
            out.append(np.asarray(jax.device_get(self._logits_fn(self.params, chunk)),
                                  np.float32))
        return np.concatenate(out)[:n]

    def _build_logits_fn(self):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from agpt_jax import model as model_lib
        from agpt_jax import sharding as sh

        mesh = self.trainer.mesh
        rules = sh.ShardingPlan.build(mesh).param_rules
        model = model_lib.GPT(self.config)

        def fn(params, tokens):
            with mesh, nn.logical_axis_rules(rules):
                return model.apply({"params": params}, tokens).astype(jnp.float32)

        return jax.jit(fn)


def read_samples(opts: DataOptions) -> EvalSamples:
    """The samples of `opts.split` (see the module docstring).

    Raises:
        EvaluateError: a bad list, split or sizes (the message names the flag to change).
    """
    from agpt_jax.data import BlendConfig, DataError, build_blended_splits, read_file_list

    try:
        entries = read_file_list(opts.file_list)
        if opts.split == "all":
            return _read_all(entries, opts)
        cfg = BlendConfig(seq_length=opts.seq_length, global_batch_size=opts.global_batch_size,
                          train_iters=opts.train_iters, eval_interval=opts.eval_interval,
                          eval_iters=max(opts.eval_iters, 1), seed=opts.seed,
                          split=opts.data_split, cache_dir=opts.cache_dir,
                          shuffle_sample_in_corpus=opts.shuffle_sample_in_corpus,
                          blend_sample_in_corpus=opts.blend_sample_in_corpus)
        splits = build_blended_splits(entries, cfg)
    except DataError as e:
        raise EvaluateError(f"--data-file-list {opts.file_list}: {e}") from None
    if opts.split not in splits:
        raise EvaluateError(
            f"--data-split {opts.data_split!r} gives the {opts.split} split no documents; pass "
            f"--split all to evaluate every document, or a --data-split with a {opts.split} share")
    ds = splits[opts.split]
    n = min(opts.eval_iters * opts.global_batch_size, len(ds))
    rows = np.empty((n, opts.seq_length + 1), np.int64)
    ids = np.empty(n, np.int32)
    for i in range(n):
        rows[i], ids[i] = ds[i]
    return EvalSamples(rows, ids, list(ds.corpora))


def _read_all(entries, opts: DataOptions) -> EvalSamples:
    """One epoch of every file over all its documents, in Megatron's sample order."""
    from agpt_jax.data import GPTDataset, IndexedDataset

    corpora = sorted({e.corpus for e in entries})
    rows, ids = [], []
    seen: set[str] = set()
    for e in entries:
        if e.prefix in seen:  # a file listed twice is still one file's samples
            continue
        seen.add(e.prefix)
        ds = IndexedDataset(e.prefix)
        documents = np.arange(len(ds), dtype=np.int32)
        tokens = ds.num_tokens
        n = (tokens - 1) // opts.seq_length
        if n < 1:
            raise EvaluateError(f"--data-file-list {opts.file_list} line {e.line}: {e.prefix} has "
                                f"{tokens} tokens, fewer than one sample of --seq-length "
                                f"{opts.seq_length} + 1")
        gpt = GPTDataset(ds, "all", documents, n, opts.seq_length, opts.seed, opts.cache_dir)
        take = n if opts.max_samples is None else min(n, opts.max_samples)
        rows.append(np.stack([gpt[i] for i in range(take)]))
        ids.append(np.full(take, corpora.index(e.corpus), np.int32))
    return EvalSamples(np.concatenate(rows), np.concatenate(ids), corpora)


def summarize(losses: np.ndarray, samples: EvalSamples, seq_length: int) -> list[CorpusResult]:
    """Per-corpus and total loss and perplexity.

    Args:
        losses: float32 [n] mean token loss of every sample.
        samples: the samples (for corpus ids and names).
        seq_length: tokens scored per sample.

    Returns:
        One CorpusResult per corpus with samples (in name order), then "total".
    """
    out = []
    for c, name in enumerate(samples.corpora):
        sel = samples.corpus_ids == c
        if not np.any(sel):
            continue
        loss = float(np.mean(losses[sel], dtype=np.float64))
        out.append(CorpusResult(name, int(sel.sum()), int(sel.sum()) * seq_length, loss,
                                _perplexity(loss)))
    loss = float(np.mean(losses, dtype=np.float64))
    out.append(CorpusResult("total", int(losses.size), int(losses.size) * seq_length, loss,
                            _perplexity(loss)))
    return out


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


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


def next_token_losses(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], float64 [rows]."""
    x = logits[:, :-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(x - m).sum(-1)))
    target = np.take_along_axis(x, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return (lse - target).mean(axis=-1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or cpt.py --save folder")
    p.add_argument("--data-file-list", default=None, help="DATA_FILE_LIST to evaluate on")
    p.add_argument("--split", default="valid", choices=SPLITS, help="samples to evaluate")
    p.add_argument("--tokens", default=None, help=".npy int [rows, length] to compute logits of")
    p.add_argument("--save-logits", default=None, help=".npy to write the logits to (--tokens)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default: the checkpoint's seq_length)")
    p.add_argument("--global-batch-size", type=int, default=8, help="Megatron --global-batch-size")
    p.add_argument("--eval-iters", type=int, default=10, help="batches evaluated (not for all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per compiled call (default: --global-batch-size)")
    p.add_argument("--seed", type=int, default=1234, help="Megatron --seed of the blend")
    p.add_argument("--data-split", default="990,10,0",
                   help="Megatron --split ratios (default: the run configs' 990,10,0)")
    p.add_argument("--train-iters", type=int, default=1, help="the run's --train-iters (blend)")
    p.add_argument("--eval-interval", type=int, default=100,
                   help="the run's --eval-interval (default: the recipes' 100)")
    p.add_argument("--shuffle-sample-in-corpus", action=argparse.BooleanOptionalAction,
                   default=True, help="Megatron's in-corpus shuffle, as the run used it (default: "
                   "on, as the recipes and AuroraGPT's launcher)")
    p.add_argument("--blend-sample-in-corpus", action=argparse.BooleanOptionalAction,
                   default=False, help="Megatron's in-corpus blend, as the run used it")
    p.add_argument("--max-samples", type=int, default=None, help="--split all: samples per file")
    p.add_argument("--data-cache-path", default=None, help="sample index cache folder")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. 'data=1,fsdp=-1,tensor=1'")
    p.add_argument("--platform", default="auto", choices=("auto", "xpu", "cpu"))
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


class RunFailedError(RuntimeError):
    """A failure while evaluating (not the input's fault): the platform, a failed write."""


def _check_args(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> dict[str, Any]:
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
            print(f"next-token loss within the rows {loss:.4f} (ppl {_perplexity(loss):.2f})")
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
