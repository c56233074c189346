"""The CPT run: `run(cfg, rt) -> RunResult`.

One run = files in (DATA_FILE_LIST, LOAD), one compiled step per iteration, checkpoints and
metrics out. Where it starts (resume, LOAD, random init) is agpt_jax.start's; what it writes
before the first step, agpt_jax.run_files'. LOAD is an agpt-jax checkpoint here: a universal
LOAD is converted at the checkpoint border (converters/load.py) before `run`.
SIGTERM/SIGUSR1 finish the current iteration, save synchronously and return normally. A non-finite
loss or gradient norm skips the update (the compiled step keeps the old state); after
`max_skipped_in_a_row` in a row the run raises NonFiniteError with the last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from agpt_jax import checkpoint
from agpt_jax import metrics as metrics_lib
from agpt_jax import optim, schedules
from agpt_jax import start as start_lib
from agpt_jax import train as train_lib
from agpt_jax.config import RunConfig
from agpt_jax.data import BlendConfig, build_blended_splits, make_batch_iterator
from agpt_jax.run_files import prepare_run_dir
from agpt_jax.runtime import Runtime, make_mesh

PyTree = Any


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
            cfg.model, cfg.optim, schedules.make_schedule(cfg.schedule),
            train_lib.StepConfig(cfg.batch.global_batch_size, cfg.batch.grad_acc_steps),
            make_mesh(cfg.mesh), cfg.strategy, donate=rt.supports_donation)
    return _TRAINERS[key]


def run(cfg: RunConfig, rt: Runtime) -> RunResult:
    """Trains per `cfg` (see the module docstring for where it starts and how it stops).

    Raises:
        ConfigError, DataError, CheckpointError: bad input (one clear message).
        NonFiniteError: `max_skipped_in_a_row` non-finite updates in a row.
    """
    # Every input is checked before the run directory is touched: bad input changes no file.
    entries = start_lib.check_inputs(cfg)
    source = None  # LOAD's directory, checked once (model, LR) before anything is compiled
    if cfg.checkpoint.load and not start_lib.has_complete_step(cfg.run_dir):
        source = start_lib.check_source(cfg, rt)
    prepare_run_dir(cfg, rt)
    corpora = sorted({e.corpus for e in entries})
    # On CPU Orbax's device-to-host "copy" is a view of the donated state (agpt_jax.checkpoint).
    ckptr = checkpoint.RunCheckpointer(cfg.run_dir, cfg.checkpoint.keep,
                                     copy_before_async_save=rt.capabilities.copy_before_async_save)
    try:
        trainer = _trainer(cfg, rt)
        return _train(cfg, rt, trainer, ckptr, entries, corpora, source)
    finally:
        ckptr.close()


def _train(cfg: RunConfig, rt: Runtime, trainer: train_lib.CompiledTrainer,
           ckptr: checkpoint.RunCheckpointer, entries, corpora: list[str],
           source: str | None) -> RunResult:
    start = start_lib.initial_state(cfg, rt, trainer, ckptr, corpora, source)
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
    peak = metrics_lib.peak_tflops(rt.capabilities, cfg.peak_tflops_per_device)
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
        progress = checkpoint.TrainProgress(
            iteration=it, schedule_count=sched, consumed_samples=consumed,
            data_start_iteration=p.data_start_iteration,
            consumed_tokens_per_corpus=dict(tokens_per_corpus), skipped_in_a_row=in_a_row,
            skipped_total=skipped_total, last_lr=last_lr)
        meta = start_lib.checkpoint_metadata(cfg, start.source_meta, it,
                                             int(np.asarray(adam_count)), last_lr)
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
