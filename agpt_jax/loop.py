"""The CPT run: `run(cfg, rt) -> RunResult` and `dry_run(cfg, rt) -> DryRunReport`.

One run = files in (DATA_FILE_LIST, LOAD), one compiled step per iteration, checkpoints and
metrics out (agpt_jax.checkpoint documents the run directory). Where the run starts:
  1. SAVE holds a complete checkpoint: resume from the newest (params, Adam, schedule position,
     iteration, data iterator, rng), continuing exactly as an uninterrupted run would.
  2. Else LOAD is set: Megatron's `--universal-checkpoint --finetune` (spec §2.6): params and, with
     `load_optimizer_state`, Adam moments and step from LOAD; iteration, schedule and consumed
     samples start at 0. agpt-jax's first update uses the schedule's LR (Megatron's uses the
     checkpoint's saved LR, the one deliberate difference).
  3. Else random init from the seed (pretraining).
SIGTERM/SIGUSR1 finish the current iteration, save synchronously and return normally. A non-finite
loss or gradient norm skips the update (the compiled step keeps the old state); after
`max_skipped_in_a_row` in a row the run raises NonFiniteError with the last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from agpt_jax import checkpoint as ckpt_lib
from agpt_jax import init_checkpoint as ic
from agpt_jax import metrics as metrics_lib
from agpt_jax import optim
from agpt_jax import train as train_lib
from agpt_jax.config import ConfigError, RunConfig, check_model, describe, write_config_json
from agpt_jax.data import BlendConfig, build_blended_splits, make_batch_iterator, read_file_list
from agpt_jax.data.indexed import IndexedDataset
from agpt_jax.data.samples import num_epochs_for, parse_split
from agpt_jax.runtime import Runtime, make_mesh

PyTree = Any

# constant_cooldown refuses a source whose LR is below this share of the configured LR.
COOLED_DOWN_RATIO = 0.9


class NonFiniteError(RuntimeError):
    """The run stopped after too many non-finite updates in a row."""


@dataclasses.dataclass
class RunResult:
    """What a run did.

    Attributes:
        run_dir: the run directory.
        start_iteration: the iteration this invocation started after (0, or the resumed step).
        last_iteration: the last iteration completed.
        losses: iteration -> training loss, for the iterations of this invocation.
        checkpoint: the newest checkpoint directory written, or None.
        stopped_by_signal: SIGTERM/SIGUSR1 ended the run early.
        skipped_total: non-finite updates skipped.
        seconds_per_iteration: median wall time of an iteration after the first.
    """

    run_dir: str
    start_iteration: int
    last_iteration: int
    losses: dict[int, float]
    checkpoint: str | None
    stopped_by_signal: bool
    skipped_total: int
    seconds_per_iteration: float


@dataclasses.dataclass
class DryRunReport:
    """What `dry_run` found and wrote."""

    summary: str
    lr_csv: str
    lr_png: str


# ------------------------------------------------------------------------------------------------
# LR schedule files.


def lr_schedule_rows(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(iterations 1..train_iters, the LR each iteration's update uses), float64."""
    its = np.arange(1, cfg.train_iters + 1)
    # lr_at_iterations(k) is the LR after k completed iterations: the one iteration k+1 uses.
    return its, optim.lr_at_iterations(cfg.schedule, its - 1)


def write_lr_schedule(cfg: RunConfig, run_dir: str) -> tuple[str, str]:
    """Writes lr_schedule.csv (header `iteration,lr`) and lr_schedule.png; returns their paths."""
    its, lrs = lr_schedule_rows(cfg)
    csv_path = os.path.join(run_dir, "lr_schedule.csv")
    with open(csv_path + ".tmp", "w") as f:
        f.write("iteration,lr\n")
        for i, lr in zip(its, lrs):
            f.write(f"{int(i)},{float(lr)!r}\n")  # repr: shortest exact float text
    os.replace(csv_path + ".tmp", csv_path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    tokens = its * cfg.batch.tokens_per_iteration
    ax.plot(tokens, lrs)
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{cfg.recipe}: {cfg.schedule.style}, {cfg.train_iters} iterations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = os.path.join(run_dir, "lr_schedule.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def _prepare_run_dir(cfg: RunConfig, rt: Runtime) -> None:
    if rt.is_main_process:
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_config_json(cfg, os.path.join(cfg.run_dir, "config.json"))
        write_lr_schedule(cfg, cfg.run_dir)


# ------------------------------------------------------------------------------------------------
# Dry run.


def _data_summary(cfg: RunConfig, start_iteration: int = 0) -> list[str]:
    entries = read_file_list(cfg.data.file_list, check_files=True)
    total_w = sum(e.weight for e in entries)
    train_frac = parse_split(cfg.data.split)[0]
    samples = (start_iteration + cfg.train_iters) * cfg.batch.global_batch_size
    lines, shares = [], {}
    for e in entries:
        shares[e.corpus] = shares.get(e.corpus, 0.0) + e.weight / total_w
        tokens = IndexedDataset(e.prefix).num_tokens
        need = int(math.ceil(samples * e.weight / total_w * 1.005))
        train_tokens = max(1, int(tokens * train_frac))
        epochs = num_epochs_for(train_tokens, cfg.batch.seq_length, need)
        lines.append(f"file {e.prefix} corpus {e.corpus}: {tokens:,} tokens, {need:,} train "
                     f"samples, ~{epochs} epoch(s)")
    lines += [f"corpus {name}: share {share:.4f}" for name, share in sorted(shares.items())]
    return lines


def dry_run(cfg: RunConfig, rt: Runtime, load_description: str | None = None) -> DryRunReport:
    """Checks every input, writes config.json and the LR schedule (CSV, PNG), returns a summary.

    `load_description` is the summary's line on LOAD (converters.load.describe, which also
    knows universal checkpoints); without it LOAD must be an agpt-jax checkpoint.

    Raises:
        DataError: the DATA_FILE_LIST or a file in it is missing or malformed (names the file).
        CheckpointError: LOAD is not a checkpoint.
    """
    lines = [describe(cfg)]
    lines += _data_summary(cfg)
    if cfg.checkpoint.load:
        lines.append(f"load: {load_description or _describe_source(cfg.checkpoint.load)}")
    _prepare_run_dir(cfg, rt)
    csv_path = os.path.join(cfg.run_dir, "lr_schedule.csv")
    png_path = os.path.join(cfg.run_dir, "lr_schedule.png")
    lines.append(f"wrote {os.path.join(cfg.run_dir, 'config.json')}, {csv_path}, {png_path}")
    return DryRunReport(summary="\n".join(lines), lr_csv=csv_path, lr_png=png_path)


# ------------------------------------------------------------------------------------------------
# Sources.


def _describe_source(load: str) -> str:
    directory = ic.resolve_checkpoint_dir(load)
    ic.read_metadata(directory)
    return f"{directory}: agpt-jax checkpoint" + (
        " with Adam state" if ic.has_adam(directory) else " (params only)")


def _check_source_model(cfg: RunConfig, directory: str) -> None:
    check_model(cfg, ic.model_config(directory), directory)


def _source_lr(meta: dict[str, Any], progress: ckpt_lib.TrainProgress | None) -> float | None:
    if progress is not None:
        return progress.last_lr
    groups = meta.get("param_groups") or []
    lrs = [g.get("lr") for g in groups if isinstance(g, dict) and g.get("lr") is not None]
    return float(lrs[0]) if lrs else None


def _check_not_cooled_down(cfg: RunConfig, directory: str, meta: dict[str, Any],
                           progress: ckpt_lib.TrainProgress | None) -> None:
    if cfg.recipe != "constant_cooldown" or cfg.checkpoint.allow_cooled_down_source:
        return
    lr = _source_lr(meta, progress)
    if lr is not None and lr < COOLED_DOWN_RATIO * cfg.schedule.max_lr:
        raise ConfigError([
            f"LOAD {directory} was saved at LR {lr:.3g}, below {COOLED_DOWN_RATIO} x the constant "
            f"LR {cfg.schedule.max_lr:.3g}: it looks cooled down already, and continuing it at a "
            f"constant LR undoes the cooldown; load a checkpoint from before the cooldown, lower "
            f"config.lr, or set --config.allow_cooled_down_source=True"])


def _check_source(cfg: RunConfig, rt: Runtime) -> str:
    """LOAD's checkpoint directory, after checking its model and (constant_cooldown) its LR."""
    directory = ic.resolve_checkpoint_dir(cfg.checkpoint.load)
    _check_source_model(cfg, directory)
    _check_not_cooled_down(cfg, directory, ic.read_metadata(directory),
                           ckpt_lib.read_progress(directory))
    return directory


# ------------------------------------------------------------------------------------------------
# State.


def _adam_target(trainer: train_lib.CompiledTrainer) -> dict[str, PyTree]:
    adam = trainer.abstract_state.opt_state["adam"]
    return {"mu": adam.mu, "nu": adam.nu, "count": adam.count}


def _param_groups(cfg: RunConfig, source_groups: list[dict[str, Any]] | None,
                  lr: float) -> list[dict[str, Any]]:
    """torch/DeepSpeed param groups (Megatron's order: decayed, then not), with the last LR."""
    opt = cfg.optim
    if source_groups and len(source_groups) == 2:
        groups = [dict(g) for g in source_groups]
    else:
        groups = [{"wd_mult": 1.0, "lr_mult": 1.0, "amsgrad": False, "params": []},
                  {"wd_mult": 0.0, "lr_mult": 1.0, "amsgrad": False, "params": []}]
    for g, decayed in zip(groups, (True, False)):
        g.update({"lr": float(lr), "betas": [opt.beta1, opt.beta2], "eps": opt.eps,
                  "weight_decay": opt.weight_decay if decayed else 0.0})
    return groups


def _megatron_args(cfg: RunConfig, iteration: int) -> dict[str, Any]:
    """The Megatron-DeepSpeed args of this run (the names of megatron/arguments.py), so that
    converters.orbax_to_universal can write a checkpoint Megatron loads (spec §1.2-1.4)."""
    m, s, b = cfg.model, cfg.schedule, cfg.batch
    return {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "ffn_hidden_size": m.ffn_hidden_size, "seq_length": b.seq_length,
        "max_position_embeddings": 16 * b.seq_length,  # helpers.sh passes 16*SEQ
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "padded_vocab_size": m.padded_vocab_size,
        "tensor_model_parallel_size": m.tensor_parallel_for_padding,
        "pipeline_model_parallel_size": 1, "rope_theta": m.rope_theta,
        "layernorm_epsilon": m.norm_eps, "init_method_std": m.init_std, "swiglu": True,
        "normalization": "rmsnorm", "untie_embeddings_and_output_weights": True,
        "add_bias_linear": False, "use_rotary_position_embeddings": True,
        "bf16": m.compute_dtype == "bfloat16", "iteration": iteration,
        "train_iters": cfg.train_iters, "global_batch_size": b.global_batch_size,
        "micro_batch_size": b.micro_batch, "lr": s.max_lr, "min_lr": s.min_lr,
        "lr_decay_style": s.style, "lr_warmup_fraction": s.warmup_fraction,
        "lr_decay_iters": s.decay_iters, "seed": cfg.data.seed,
        "adam_beta1": cfg.optim.beta1, "adam_beta2": cfg.optim.beta2, "adam_eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay, "clip_grad": cfg.optim.clip_grad,
    }


def _metadata(cfg: RunConfig, source_meta: dict[str, Any], iteration: int, adam_step: int,
              lr: float) -> dict[str, Any]:
    keep = ("name_scheme", "megatron_args", "checkpoint_version", "universal_checkpoint_info",
            "zero_optimizer_state", "megatron_model_states")
    meta = {k: source_meta[k] for k in keep if k in source_meta}
    meta.update({
        "format": ic.FORMAT, "format_version": ic.FORMAT_VERSION, "created_by": "agpt_jax.loop",
        "source": cfg.checkpoint.origin or cfg.checkpoint.load or None, "iteration": iteration, "adam_step": adam_step,
        "has_optimizer_state": True, "model": dataclasses.asdict(cfg.model),
        "original_vocab_size": cfg.model.vocab_size,
        "padded_vocab_size": cfg.model.padded_vocab_size,
        "param_groups": _param_groups(cfg, source_meta.get("param_groups"), lr),
        # The source's args (a legacy run's full flag set) updated with this run's values.
        "megatron_args": {**(source_meta.get("megatron_args") or {}),
                          **_megatron_args(cfg, iteration)},
        "run_config": cfg.to_json(),
    })
    return meta


@dataclasses.dataclass
class _Start:
    state: train_lib.TrainState
    progress: ckpt_lib.TrainProgress
    data_state: dict[str, Any] | None
    source_meta: dict[str, Any]
    resumed: bool


def _initial_state(cfg: RunConfig, rt: Runtime, trainer: train_lib.CompiledTrainer,
                   ckptr: ckpt_lib.RunCheckpointer, corpora: list[str]) -> _Start:
    rng = jax.random.PRNGKey(cfg.data.seed)
    rng_list = [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()]
    # Restored arrays land in their sharded layout (the abstract targets carry the shardings)
    # and `assemble` donates them into the TrainState: nothing is initialised to be overwritten.
    newest = ckptr.restore_newest(trainer.abstract_state.params, _adam_target(trainer))
    if newest is not None:
        latest, r = newest
        logging.info("resuming from %s", ckptr.step_dir(latest))
        p = r.progress
        state = trainer.assemble(r.params, (r.adam["count"], r.adam["mu"], r.adam["nu"]),
                                 p.schedule_count, p.iteration)
        source_meta = {k: v for k, v in r.metadata.items() if k != "run_config"}
        return _Start(state, p, r.data_state, source_meta, True)
    zero_tokens = {c: 0 for c in corpora}
    if not cfg.checkpoint.load:
        logging.info("random init from seed %d", cfg.data.seed)
        progress = ckpt_lib.TrainProgress(0, 0, rng_list, 0, 0, zero_tokens)
        return _Start(trainer.init(rng), progress, None, {}, False)

    directory = _check_source(cfg, rt)
    meta = ic.read_metadata(directory)
    src_progress = ckpt_lib.read_progress(directory)
    logging.info("loading %s", directory)
    params = ic.restore_params(directory, trainer.abstract_state.params)
    adam = None  # fresh moments and step 0
    if cfg.checkpoint.load_optimizer_state:
        if ic.has_adam(directory):
            a = ic.restore_adam(directory, _adam_target(trainer))
            adam = (a["count"], a["mu"], a["nu"])
            count = a["count"]
            logging.info("loaded Adam moments and step %d (Megatron's universal load does, "
                         "spec §2.6)", int(np.asarray(count)))
        else:
            logging.warning("%s has no Adam state; starting fresh moments", directory)
    else:
        logging.info("load_optimizer_state=False: fresh Adam moments and step 0")
    start_iter = 0
    if not cfg.checkpoint.reset_iteration:
        start_iter = src_progress.iteration if src_progress else int(meta.get("iteration") or 0)
        if start_iter >= cfg.train_iters:
            raise ConfigError([f"LOAD is at iteration {start_iter} but train_iters is "
                               f"{cfg.train_iters} and reset_iteration is False; train longer"])
    data_start = 0
    if cfg.recipe == "cooldown" and src_progress is not None:
        # The branch continues its source's data stream.
        data_start = src_progress.data_start_iteration + src_progress.iteration
    state = trainer.assemble(params, adam, start_iter, start_iter)
    progress = ckpt_lib.TrainProgress(start_iter, start_iter, rng_list, 0, data_start, zero_tokens)
    return _Start(state, progress, None, meta, False)


# ------------------------------------------------------------------------------------------------
# The loop.


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop checks it between iterations."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals
                pass

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree(flag: bool, rt: Runtime) -> bool:
    """True on every process when any process has `flag` set."""
    if rt.process_count == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _global(x: jax.Array, rt: Runtime) -> np.ndarray:
    if rt.process_count == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_device(trainer: train_lib.CompiledTrainer, local: dict[str, np.ndarray]) -> dict:
    return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, local[k])
            for k in ("tokens", "labels")}


def _evaluate(cfg: RunConfig, rt: Runtime, trainer, params, valid, index: int,
              corpora: list[str]) -> dict[str, float]:
    """Megatron's evaluation: EVAL_ITERS consecutive validation batches, the valid iterator
    continuing from one evaluation to the next (training.py:evaluate); per-corpus means."""
    gbs = cfg.batch.global_batch_size
    n_batches = len(valid) // gbs
    start = (index * cfg.eval_iters) % max(1, n_batches - cfg.eval_iters + 1)
    it = make_batch_iterator(valid, global_batch_size=gbs, start_iteration=start,
                             process_index=rt.process_index, process_count=rt.process_count,
                             prefetch=0)
    losses, ids = [], []
    for b in range(cfg.eval_iters):
        out = trainer.evaluate(params, _to_device(trainer, next(it)))
        losses.append(_global(out["sequence_loss"], rt))
        ids.append(valid.corpus_ids((start + b) * gbs, (start + b + 1) * gbs))
    it.close()
    seq, cid = np.concatenate(losses), np.concatenate(ids)
    out = {"eval/loss": float(np.mean(seq))}
    out.update({f"eval/loss/{k}": v for k, v in metrics_lib.per_corpus_mean(seq, cid,
                                                                            corpora).items()})
    return out


# Compiled trainers of this process, by everything that shapes the compiled step: a process that
# runs several times with the same model, schedule and batch (a resume, a sweep, the tests)
# compiles once.
_TRAINERS: dict[tuple, train_lib.CompiledTrainer] = {}
_MAX_TRAINERS = 4


def _trainer(cfg: RunConfig, rt: Runtime) -> train_lib.CompiledTrainer:
    key = (cfg.model, cfg.optim, cfg.schedule, cfg.batch, cfg.mesh, cfg.strategy,
           rt.supports_donation, tuple(d.id for d in jax.devices()))
    if key not in _TRAINERS:
        while len(_TRAINERS) >= _MAX_TRAINERS:
            _TRAINERS.pop(next(iter(_TRAINERS)))
        _TRAINERS[key] = train_lib.build_trainer(
            cfg.model, cfg.optim, optim.make_schedule(cfg.schedule),
            train_lib.StepConfig(cfg.batch.global_batch_size, cfg.batch.grad_acc_steps),
            make_mesh(cfg.mesh), cfg.strategy, donate=rt.supports_donation)
    return _TRAINERS[key]


def has_complete_step(run_dir: str) -> bool:
    """Whether run_dir/checkpoints holds a complete step (read without creating anything)."""
    directory = os.path.join(run_dir, ic.CHECKPOINTS_SUBDIR)
    return os.path.isdir(directory) and any(
        n.isdigit() and os.path.isfile(os.path.join(directory, n, "_CHECKPOINT_METADATA"))
        for n in os.listdir(directory))


def check_inputs(cfg: RunConfig) -> list:
    """The DATA_FILE_LIST's entries, after opening and validating every .idx/.bin pair in it.

    Raises:
        DataError: a list or a file in it is missing or malformed (names the file).
    """
    entries = read_file_list(cfg.data.file_list, check_files=True)
    for e in entries:
        IndexedDataset(e.prefix)
    return entries


def run(cfg: RunConfig, rt: Runtime) -> RunResult:
    """Trains per `cfg` (see the module docstring for where it starts and how it stops).

    Raises:
        ConfigError, DataError, CheckpointError: bad input (one clear message).
        NonFiniteError: `max_skipped_in_a_row` non-finite updates in a row.
    """
    # Every input is checked before the run directory is touched: bad input changes no file.
    entries = check_inputs(cfg)
    if cfg.checkpoint.load and not has_complete_step(cfg.run_dir):
        _check_source(cfg, rt)
    _prepare_run_dir(cfg, rt)
    corpora = sorted({e.corpus for e in entries})
    # On CPU Orbax's device-to-host "copy" is a view of the donated state (agpt_jax.checkpoint).
    ckptr = ckpt_lib.RunCheckpointer(cfg.run_dir, cfg.checkpoint.keep,
                                     copy_before_async_save=rt.platform == "cpu")
    try:
        if ckptr.latest_step() is None and cfg.checkpoint.load:
            _check_source(cfg, rt)  # fail on a wrong source before compiling anything
        trainer = _trainer(cfg, rt)
        return _train(cfg, rt, trainer, ckptr, entries, corpora)
    finally:
        ckptr.close()


def _train(cfg: RunConfig, rt: Runtime, trainer: train_lib.CompiledTrainer,
           ckptr: ckpt_lib.RunCheckpointer, entries, corpora: list[str]) -> RunResult:
    start = _initial_state(cfg, rt, trainer, ckptr, corpora)
    state, p = start.state, start.progress
    gbs, seq = cfg.batch.global_batch_size, cfg.batch.seq_length
    splits = build_blended_splits(entries, BlendConfig(
        seq_length=seq, global_batch_size=gbs, train_iters=p.data_start_iteration + cfg.train_iters,
        eval_interval=cfg.eval_interval, eval_iters=cfg.eval_iters, seed=cfg.data.seed,
        split=cfg.data.split, cache_dir=cfg.data.cache_dir,
        shuffle_sample_in_corpus=cfg.data.shuffle_sample_in_corpus,
        blend_sample_in_corpus=cfg.data.blend_sample_in_corpus))
    train_ds, valid = splits["train"], splits.get("valid")
    if splits["train"].corpora != corpora:
        raise AssertionError("blend corpora differ from the list's")
    train_iter = make_batch_iterator(train_ds, global_batch_size=gbs,
                                     start_iteration=p.data_start_iteration + p.iteration,
                                     process_index=rt.process_index,
                                     process_count=rt.process_count)
    if start.data_state is not None:
        train_iter.set_state(start.data_state)
    if valid is None and cfg.eval_iters:
        logging.warning("split %s has no validation part; no evaluation", cfg.data.split)

    writer = metrics_lib.MetricsWriter(cfg.run_dir, rt.is_main_process)
    peak = metrics_lib.peak_tflops(rt.platform, cfg.peak_tflops_per_device)
    flops_per_token = cfg.model.flops_per_token(seq)
    bar = metrics_lib.Progress(p.iteration, cfg.last_iteration,
                               rt.is_main_process and cfg.progress_bar)
    stop = _StopFlag()
    stop.install()
    it, sched, consumed = p.iteration, p.schedule_count, p.consumed_samples
    tokens_per_corpus = dict(p.consumed_tokens_per_corpus)
    in_a_row, skipped_total, last_lr = p.skipped_in_a_row, p.skipped_total, p.last_lr
    losses: dict[int, float] = {}
    times: list[float] = []
    last_ckpt, signalled = None, False
    if it >= cfg.last_iteration:
        logging.warning("%s already holds iteration %d of %d: nothing to train", cfg.run_dir, it,
                        cfg.train_iters)
    else:
        logging.info("training iterations %d..%d of %d", it + 1, cfg.last_iteration,
                     cfg.train_iters)

    def save(wait: bool) -> str:
        adam_count, mu, nu = optim.adam_state(state.opt_state)
        progress = ckpt_lib.TrainProgress(
            iteration=it, schedule_count=sched, rng=p.rng, consumed_samples=consumed,
            data_start_iteration=p.data_start_iteration,
            consumed_tokens_per_corpus=dict(tokens_per_corpus), skipped_in_a_row=in_a_row,
            skipped_total=skipped_total, last_lr=last_lr)
        meta = _metadata(cfg, start.source_meta, it, int(np.asarray(adam_count)), last_lr)
        ckptr.save(it, state.params, {"mu": mu, "nu": nu, "count": adam_count}, progress,
                   train_iter.get_state(), meta, wait=wait)
        logging.info("saved checkpoint %s%s", ckptr.step_dir(it), "" if wait else " (async)")
        return ckptr.step_dir(it)

    try:
        t0 = time.perf_counter()
        while it < cfg.last_iteration:
            data_it = p.data_start_iteration + it
            local = next(train_iter)
            batch = _to_device(trainer, local)
            # The step's inputs are all on device already; a host array here would be a bug
            # (an implicit transfer every iteration), so the guard turns it into an error.
            with jax.transfer_guard_host_to_device("disallow"):
                state, m = trainer.step(state, batch)
            host = jax.device_get({k: m[k] for k in ("loss", "grad_norm", "lr", "update_norm",
                                                     "param_norm", "skipped")})
            scalars = {k: float(v) for k, v in host.items() if k != "skipped"}
            skipped = int(host["skipped"])
            seq_loss = _global(m["sequence_loss"], rt)
            now = time.perf_counter()
            dt, t0 = now - t0, now
            it += 1
            times.append(dt)
            ids = train_ds.corpus_ids(data_it * gbs, (data_it + 1) * gbs)
            consumed += gbs
            for i, name in enumerate(corpora):
                tokens_per_corpus[name] += int(np.sum(ids == i)) * seq
            if skipped:
                in_a_row += 1
                skipped_total += 1
                logging.warning("iteration %d: non-finite loss %s or grad norm %s; update "
                                "skipped (%d in a row, limit %d)", it, scalars["loss"],
                                scalars["grad_norm"], in_a_row, cfg.max_skipped_in_a_row)
            else:
                in_a_row = 0
                sched += 1
                last_lr = scalars["lr"]
            record = {"iteration": it, "tokens": consumed * seq, "loss": scalars["loss"]}
            record.update({f"loss/{k}": v for k, v in
                           metrics_lib.per_corpus_mean(seq_loss, ids, corpora).items()})
            record.update({f"tokens/{k}": v for k, v in tokens_per_corpus.items()})
            record.update({k: scalars[k] for k in ("lr", "grad_norm", "update_norm")})
            record.update(metrics_lib.throughput(gbs * seq, dt, flops_per_token,
                                                 rt.device_count, peak))
            record["skipped"] = skipped
            losses[it] = scalars["loss"]
            writer.write(record)
            bar.update({"loss": scalars["loss"], "lr": scalars["lr"]})
            if it % cfg.log_interval == 0 and not cfg.progress_bar:
                metrics_lib.log_line(record)
            if in_a_row >= cfg.max_skipped_in_a_row:
                raise NonFiniteError(
                    f"{in_a_row} non-finite updates in a row (iterations {it - in_a_row + 1}.."
                    f"{it}); stopping. The last good checkpoint is "
                    f"{ckptr.step_dir(ckptr.latest_step()) if ckptr.latest_step() else 'none'}; "
                    "lower config.lr or check the data, then start again")
            if valid is not None and cfg.eval_iters and (
                    it % cfg.eval_interval == 0 or it == cfg.train_iters):
                ev = _evaluate(cfg, rt, trainer, state.params, valid,
                               max(0, it // cfg.eval_interval - 1), corpora)
                writer.write({"iteration": it, "tokens": consumed * seq, **ev})
                logging.info("iteration %d eval loss %.4f %s", it, ev["eval/loss"],
                             {k: round(v, 4) for k, v in ev.items() if k != "eval/loss"})
                t0 = time.perf_counter()
            signalled = _agree(stop.signum is not None, rt)
            end = it == cfg.last_iteration
            if (signalled or end or it % cfg.checkpoint.save_interval == 0) and not skipped:
                if not math.isfinite(scalars["param_norm"]):
                    raise NonFiniteError(f"iteration {it}: params are not finite; not saving")
                last_ckpt = save(wait=signalled or end)
                t0 = time.perf_counter()
            if signalled:
                logging.warning("signal %s: saved %s and stopping after iteration %d",
                                stop.signum, last_ckpt, it)
                break
    finally:
        stop.restore()
        bar.close()
        writer.close()
        train_iter.close()
    later = sorted(times[1:]) or times
    return RunResult(run_dir=cfg.run_dir, start_iteration=p.iteration, last_iteration=it,
                     losses=losses, checkpoint=last_ckpt, stopped_by_signal=signalled,
                     skipped_total=skipped_total,
                     seconds_per_iteration=float(later[len(later) // 2]) if later else 0.0)
