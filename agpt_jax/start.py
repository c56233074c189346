"""Where a run starts, and what each of its checkpoints records.

  1. SAVE holds a complete checkpoint: resume from the newest (params, Adam, schedule position,
     iteration, data iterator), continuing exactly as an uninterrupted run would.
  2. Else LOAD is set (an agpt-jax checkpoint; a universal LOAD was converted at the checkpoint
     border, converters/load.py, before the run): Megatron's `--universal-checkpoint --finetune`
     (spec §2.6): params and, with `load_optimizer_state`, Adam moments and step from LOAD;
     iteration, schedule and consumed samples start at 0. agpt-jax's first update uses the
     schedule's LR (Megatron's uses the checkpoint's saved LR, the one deliberate difference).
  3. Else random init from the seed (pretraining).
Restored arrays land in their sharded layout and are donated into the TrainState
(train.CompiledTrainer.assemble): nothing is initialised only to be overwritten.

May import: checkpoint, config, data, optim, train, runtime. Not loop, not
converters.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from agpt_jax import checkpoint
from agpt_jax import train as train_lib
from agpt_jax.config import ConfigError, RunConfig, check_model
from agpt_jax.data import read_file_list
from agpt_jax.data.indexed import IndexedDataset
from agpt_jax.runtime import Runtime

PyTree = Any

# constant_cooldown refuses a source whose LR is below this share of the configured LR.
COOLED_DOWN_RATIO = 0.9


def has_complete_step(run_dir: str) -> bool:
    """Whether run_dir/checkpoints holds a complete step (read without creating anything)."""
    directory = os.path.join(run_dir, checkpoint.CHECKPOINTS_SUBDIR)
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


def _check_source_model(cfg: RunConfig, directory: str) -> None:
    check_model(cfg, checkpoint.model_config(directory), directory)


def _source_lr(meta: dict[str, Any], progress: checkpoint.TrainProgress | None) -> float | None:
    if progress is not None:
        return progress.last_lr
    lr = meta.get("last_lr")  # a converted checkpoint: the LR its optimizer saved
    return None if lr is None else float(lr)


def _check_not_cooled_down(cfg: RunConfig, directory: str, meta: dict[str, Any],
                           progress: checkpoint.TrainProgress | None) -> None:
    if cfg.recipe != "constant_cooldown" or cfg.checkpoint.allow_cooled_down_source:
        return
    lr = _source_lr(meta, progress)
    if lr is not None and lr < COOLED_DOWN_RATIO * cfg.schedule.max_lr:
        raise ConfigError([
            f"LOAD {directory} was saved at LR {lr:.3g}, below {COOLED_DOWN_RATIO} x the constant "
            f"LR {cfg.schedule.max_lr:.3g}: it looks cooled down already, and continuing it at a "
            f"constant LR undoes the cooldown; load a checkpoint from before the cooldown, lower "
            f"config.lr, or set --config.allow_cooled_down_source=True"])


def check_source(cfg: RunConfig, rt: Runtime) -> str:
    """LOAD's checkpoint directory, after checking its model and (constant_cooldown) its LR."""
    directory = checkpoint.resolve_checkpoint_dir(cfg.checkpoint.load)
    _check_source_model(cfg, directory)
    _check_not_cooled_down(cfg, directory, checkpoint.read_metadata(directory),
                           checkpoint.read_progress(directory))
    return directory


def _adam_target(trainer: train_lib.CompiledTrainer) -> dict[str, PyTree]:
    adam = trainer.abstract_state.opt_state["adam"]
    return {"mu": adam.mu, "nu": adam.nu, "count": adam.count}


# The fields a run's checkpoint metadata sets itself (agpt_jax.checkpoint's schema). Every
# other field of the source's metadata (what a converter recorded of the checkpoint it came from)
# is carried through unread, for the converters that write the run back out.
_OWN_FIELDS = ("format", "format_version", "created_by", "source", "iteration", "adam_step",
               "has_optimizer_state", "model", "original_vocab_size", "padded_vocab_size",
               "last_lr", "run_config")


def checkpoint_metadata(cfg: RunConfig, source_meta: dict[str, Any], iteration: int,
                        adam_step: int, lr: float) -> dict[str, Any]:
    """The metadata item of a run's checkpoint: the schema of agpt_jax.checkpoint."""
    meta = {k: v for k, v in source_meta.items() if k not in _OWN_FIELDS}
    meta.update({
        "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "created_by": "agpt_jax.loop",
        "source": cfg.checkpoint.origin or cfg.checkpoint.load or None,
        "iteration": iteration, "adam_step": adam_step,
        "has_optimizer_state": True, "model": dataclasses.asdict(cfg.model),
        "original_vocab_size": cfg.model.vocab_size,
        "padded_vocab_size": cfg.model.padded_vocab_size,
        "last_lr": float(lr),
        "run_config": cfg.to_json(),
    })
    return meta


@jax.jit
def _copy(x: jax.Array) -> jax.Array:
    return x.copy()  # a new buffer with x's sharding (jit keeps it), owned by XLA


def _place(rt: Runtime):
    """What the restore applies to each restored leaf so that it can be donated.

    Where the platform asks for it (Capabilities.copy_restored_before_donating: the CPU
    client), each leaf is copied into a buffer XLA owns right after it is read, and the restored
    one dropped before the next group is read: the peak stays one state plus about one leaf.
    """
    return _copy if rt.capabilities.copy_restored_before_donating else None


@dataclasses.dataclass
class Start:
    state: train_lib.TrainState
    progress: checkpoint.TrainProgress
    data_state: dict[str, Any] | None
    source_meta: dict[str, Any]
    resumed: bool


def initial_state(cfg: RunConfig, rt: Runtime, trainer: train_lib.CompiledTrainer,
                  ckptr: checkpoint.RunCheckpointer, corpora: list[str],
                  source: str | None = None) -> Start:
    # Restored arrays land in their sharded layout (the abstract targets carry the shardings)
    # and `assemble` donates them into the TrainState: nothing is initialised to be overwritten.
    newest = ckptr.restore_newest(trainer.abstract_state.params, _adam_target(trainer),
                                  _place(rt))
    if newest is not None:
        latest, r = newest
        logging.info("resuming from %s", ckptr.step_dir(latest))
        p = r.progress
        adam = (r.adam["count"], r.adam["mu"], r.adam["nu"])
        params, r.params, r.adam = r.params, None, None  # the locals hold the only references
        state = trainer.assemble(params, adam, p.schedule_count, p.iteration)
        source_meta = {k: v for k, v in r.metadata.items() if k != "run_config"}
        return Start(state, p, r.data_state, source_meta, True)
    zero_tokens = {c: 0 for c in corpora}
    if not cfg.checkpoint.load:
        logging.info("random init from seed %d", cfg.data.seed)
        progress = checkpoint.TrainProgress(0, 0, 0, 0, zero_tokens)
        return Start(trainer.init(jax.random.PRNGKey(cfg.data.seed)), progress, None, {}, False)

    directory = source or check_source(cfg, rt)
    meta = checkpoint.read_metadata(directory)
    src_progress = checkpoint.read_progress(directory)
    logging.info("loading %s", directory)
    targets = {checkpoint.ITEM_PARAMS: trainer.abstract_state.params}
    if cfg.checkpoint.load_optimizer_state:
        if checkpoint.has_adam(directory):
            targets[checkpoint.ITEM_ADAM] = _adam_target(trainer)
        else:
            logging.warning("%s has no Adam state; starting fresh moments", directory)
    else:
        logging.info("load_optimizer_state=False: fresh Adam moments and step 0")
    restored = checkpoint.restore_arrays(directory, targets, _place(rt))
    params, adam = restored.pop(checkpoint.ITEM_PARAMS), restored.pop(checkpoint.ITEM_ADAM, None)
    if adam is not None:
        logging.info("loaded Adam moments and step %d (Megatron's universal load does, "
                     "spec §2.6)", int(np.asarray(adam["count"])))
        adam = (adam["count"], adam["mu"], adam["nu"])  # else fresh moments and step 0
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
    progress = checkpoint.TrainProgress(start_iter, start_iter, 0, data_start, zero_tokens)
    return Start(state, progress, None, meta, False)
