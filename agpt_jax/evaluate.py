"""Evaluate a checkpoint's params on a blended split: loss and perplexity per corpus.

The loss is training's eval step (`agpt_jax.train.eval_step`: mean token cross-entropy over the
padded vocabulary in fp32, per sequence), jit-compiled by `build_eval_step` for the params alone,
with the shardings `agpt_jax.train.build_trainer` gives them: no optimizer and no optimizer state
is built. A corpus's loss is the mean over its sequences (every sequence has seq_length tokens, so
this is also the token mean) and its perplexity is exp(loss).

The samples (`read_samples`, `DataOptions.split`):
  valid / test  the first `eval_iters` x `global_batch_size` samples of that split of the Megatron
                blend of the DATA_FILE_LIST (the samples a run's first evaluation reads when the
                data split, seed, train iterations, eval interval and batch size match the run's);
  train         the same, from the train split;
  all           one epoch of every listed file, whole (Megatron's sample index over all documents,
                `max_samples` per file at most); list weights are ignored.

`LoadedModel.logits` gives the logits of token rows through the same model and mesh rules, for
parity checks against another implementation.

scripts/evaluate.py is the command line over this module. User errors raise `EvaluateError`,
worded with that script's flags (the fields of `DataOptions` and the arguments of `LoadedModel`
are those flags). jax, the model and the data stack are imported where they are first used, so
importing this module (the script's `--help`, its flag checks, agpt_jax.hostmem's re-exec) starts
none of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh, NamedSharding

    from agpt_jax.model import GPTConfig

__all__ = ["DTYPES", "SPLITS", "CorpusResult", "DataOptions", "EvalSamples", "EvalStep",
           "EvaluateError", "LoadedModel", "build_eval_step", "next_token_losses", "perplexity",
           "read_samples", "summarize"]

PyTree = Any

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


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """Training's eval step compiled for params on a mesh, and the shardings it was compiled for.

    Attributes:
        evaluate: (params, {"tokens", "labels"} int32 [rows, seq]) -> {"loss": scalar,
            "sequence_loss": [rows]} fp32, as `CompiledTrainer.evaluate`.
        abstract_params: params tree of ShapeDtypeStructs carrying the params' shardings (the
            target to restore a checkpoint's params into).
        batch_sharding: NamedSharding of [rows, seq] arrays (rows split over data x fsdp).
        rules: the logical-axis rules of the params (for other functions of the same params).
        mesh: the mesh.
    """

    evaluate: Callable[[PyTree, dict[str, Any]], dict[str, Any]]
    abstract_params: PyTree
    batch_sharding: NamedSharding
    rules: Any
    mesh: Mesh


def build_eval_step(config: GPTConfig, mesh: Mesh, strategy: str = "fsdp") -> EvalStep:
    """Jit-compiles `agpt_jax.train.eval_step` for the params of `config` alone.

    The shardings are those `agpt_jax.train.build_trainer` derives for the params, the batch and
    the eval metrics (the same sharding rules, the same function), so the losses are those of the
    trainer's `evaluate`; no optimizer is made and no optimizer state is shaped or allocated.

    Args:
        config: the model.
        mesh: a (data, fsdp, tensor) mesh.
        strategy: "fsdp" or "zero1" (see agpt_jax.sharding): how the params are laid out.
    """
    import functools

    import flax.linen as nn
    import jax

    from agpt_jax import model as model_lib
    from agpt_jax import sharding as sh
    from agpt_jax import train as train_lib

    plan = sh.ShardingPlan.build(mesh, strategy)
    model = model_lib.GPT(config)
    boxed = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.PRNGKey(0)))
    abstract = nn.unbox(boxed)
    param_sharding = sh.param_shardings(abstract, sh.logical_specs(boxed), mesh, plan.param_rules)
    batch_sharding = sh.batch_sharding(mesh)
    evaluate = jax.jit(
        functools.partial(train_lib.eval_step, model=model, mesh=mesh, rules=plan.param_rules),
        in_shardings=(param_sharding, {"tokens": batch_sharding, "labels": batch_sharding}),
        out_shardings={"loss": sh.replicated(mesh), "sequence_loss": sh.batch_sharding(mesh, 1)})
    abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, param_sharding)
    return EvalStep(evaluate=evaluate, abstract_params=abstract_params,
                    batch_sharding=batch_sharding, rules=plan.param_rules, mesh=mesh)


class LoadedModel:
    """A checkpoint's params placed on a mesh with the compiled eval step of training.

    Attributes:
        config: the GPTConfig evaluated (compute dtype as requested).
        checkpoint: the resolved checkpoint directory.
        params: params tree of sharded jax Arrays (fp32).
        step: the `EvalStep` the params were placed for.
        data_parallel: devices a batch is split over (batches are padded to a multiple).
    """

    def __init__(self, path: str, dtype: str | None = None, mesh_spec: str = "") -> None:
        """Reads the checkpoint's model and params onto a mesh.

        Args:
            path: a converted checkpoint or a cpt.py --save folder (its newest step).
            dtype: compute dtype, one of DTYPES (None: the checkpoint's).
            mesh_spec: mesh axes, e.g. "data=1,fsdp=-1,tensor=1" ("": fsdp over all devices).

        Raises:
            EvaluateError: a missing or malformed checkpoint, a bad dtype or mesh.
        """
        from agpt_jax import checkpoint
        from agpt_jax import runtime

        try:
            self.checkpoint = checkpoint.resolve_checkpoint_dir(path)
            config = checkpoint.model_config(self.checkpoint)
        except checkpoint.CheckpointError as e:
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
        self.step = build_eval_step(config, mesh)
        try:
            self.params = checkpoint.restore_params(self.checkpoint, self.step.abstract_params)
        except (ValueError, KeyError) as e:
            raise EvaluateError(f"--checkpoint {self.checkpoint}: its params do not match the "
                                f"model in its metadata ({e})") from None
        self._logits_fn = None

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
        import jax

        b = self.batch_rows(batch_size)
        padded, n = self._padded(np.asarray(rows), b)
        sharding = self.step.batch_sharding
        out = []
        for start in range(0, padded.shape[0], b):
            chunk = padded[start:start + b]
            batch = {
                "tokens": jax.device_put(chunk[:, :-1].astype(np.int32), sharding),
                "labels": jax.device_put(chunk[:, 1:].astype(np.int32), sharding),
            }
            metrics = self.step.evaluate(self.params, batch)
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
        import jax

        if self._logits_fn is None:
            self._logits_fn = self._build_logits_fn()
        b = self.batch_rows(batch_size)
        padded, n = self._padded(np.asarray(tokens, np.int32), b)
        out = []
        for start in range(0, padded.shape[0], b):
            chunk = jax.device_put(padded[start:start + b], self.step.batch_sharding)
            out.append(np.asarray(jax.device_get(self._logits_fn(self.params, chunk)),
                                  np.float32))
        return np.concatenate(out)[:n]

    def _build_logits_fn(self):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from agpt_jax import model as model_lib

        mesh, rules = self.step.mesh, self.step.rules
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
                                perplexity(loss)))
    loss = float(np.mean(losses, dtype=np.float64))
    out.append(CorpusResult("total", int(losses.size), int(losses.size) * seq_length, loss,
                            perplexity(loss)))
    return out


def perplexity(loss: float) -> float:
    """exp(loss), inf where exp overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def next_token_losses(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], float64 [rows]."""
    x = logits[:, :-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(x - m).sum(-1)))
    target = np.take_along_axis(x, tokens[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return (lse - target).mean(axis=-1)
