"""The run's Orbax CheckpointManager: SAVE/checkpoints/<iteration>/ with five items.

    params/    PyTree: the fp32 params tree (same item as agpt_jax.init_checkpoint, so converters
               read a run's step directory like a converted checkpoint)
    adam/      PyTree: {"mu", "nu", "count"}: Adam moments and step (torch's exp_avg, exp_avg_sq,
               step)
    train/     JSON: TrainProgress (iteration, schedule count, rng, consumed samples and tokens per
               corpus, skipped updates, the last LR)
    data/      JSON: the batch iterator state (agpt_jax.data.BatchIterator.get_state)
    metadata/  JSON: agpt-jax metadata (format, model, param_groups, iteration, adam_step, the
               resolved run config), as agpt_jax.init_checkpoint.read_metadata expects

Saves are asynchronous (the device-to-host copy happens before `save` returns, the write in the
background) and atomic: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete,
so a step folder without its final name is never restored. The newest `keep` steps are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from agpt_jax import init_checkpoint as ic

PyTree = Any

ITEM_TRAIN = "train"
ITEM_DATA = "data"
ITEMS = (ic.ITEM_PARAMS, ic.ITEM_ADAM, ITEM_TRAIN, ITEM_DATA, ic.ITEM_METADATA)


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """Host-side run state saved with every checkpoint (the `train` item).

    Attributes:
        iteration: iterations completed in this run (the step number of the checkpoint).
        schedule_count: the optax count the LR schedule reads for the next update.
        rng: the run's base PRNG key data (uint32 list).
        consumed_samples: global samples consumed by this run.
        data_start_iteration: the first data batch of the run (a cooldown branch continues its
            source's stream).
        consumed_tokens_per_corpus: tokens consumed per corpus name.
        skipped_in_a_row: consecutive non-finite updates at the end.
        skipped_total: non-finite updates of the run.
        last_lr: the LR of the last update.
    """

    iteration: int
    schedule_count: int
    rng: list[int]
    consumed_samples: int
    data_start_iteration: int
    consumed_tokens_per_corpus: dict[str, int]
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    last_lr: float = 0.0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainProgress:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ic.CheckpointError(f"train item has unknown fields {unknown}; it was written by "
                                     "another agpt-jax version")
        return cls(**d)


@dataclasses.dataclass
class Restored:
    """What `RunCheckpointer.restore` returns: device arrays placed like the targets, and JSON."""

    params: PyTree
    adam: dict[str, PyTree]
    progress: TrainProgress
    data_state: dict[str, Any]
    metadata: dict[str, Any]


class RunCheckpointer:
    """The CheckpointManager of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to run_dir/checkpoints/.
        keep: newest checkpoints kept.
        async_save: write in a background thread.
    """

    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(run_dir), ic.CHECKPOINTS_SUBDIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's iteration, or None."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params: PyTree, adam: dict[str, PyTree], progress: TrainProgress,
             data_state: dict[str, Any], metadata: dict[str, Any], wait: bool = False) -> None:
        """Saves a step (every process calls this; Orbax writes each process's shards).

        Args:
            step: the iteration number (the folder name).
            params: the params tree of jax Arrays.
            adam: {"mu", "nu", "count"}.
            progress: the train item.
            data_state: the data iterator state.
            metadata: the metadata item (agpt-jax format fields included by the caller).
            wait: block until the write is complete (SIGTERM, end of run).
        """
        self._manager.save(step, args=ocp.args.Composite(**{
            ic.ITEM_PARAMS: ocp.args.PyTreeSave(params),
            ic.ITEM_ADAM: ocp.args.PyTreeSave(adam),
            ITEM_TRAIN: ocp.args.JsonSave(dataclasses.asdict(progress)),
            ITEM_DATA: ocp.args.JsonSave(data_state),
            ic.ITEM_METADATA: ocp.args.JsonSave(metadata),
        }), force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: int, params_target: PyTree, adam_target: dict[str, PyTree]) -> Restored:
        """Restores every item of `step` into the targets' shardings.

        Args:
            step: a step from `latest_step`.
            params_target, adam_target: trees of jax.ShapeDtypeStruct with `sharding=`.
        """
        args = ocp.args.Composite(**{
            ic.ITEM_PARAMS: ocp.args.PyTreeRestore(
                item=params_target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(params_target)),
            ic.ITEM_ADAM: ocp.args.PyTreeRestore(
                item=adam_target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(adam_target)),
            ITEM_TRAIN: ocp.args.JsonRestore(),
            ITEM_DATA: ocp.args.JsonRestore(),
            ic.ITEM_METADATA: ocp.args.JsonRestore(),
        })
        out = self._manager.restore(step, args=args)
        return Restored(params=out[ic.ITEM_PARAMS], adam=out[ic.ITEM_ADAM],
                        progress=TrainProgress.from_json(dict(out[ITEM_TRAIN])),
                        data_state=dict(out[ITEM_DATA]), metadata=dict(out[ic.ITEM_METADATA]))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_progress(step_dir: str) -> TrainProgress | None:
    """The train item of a run's step directory, or None for a converted checkpoint."""
    path = os.path.join(step_dir, ITEM_TRAIN, "metadata")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return TrainProgress.from_json(json.load(f))
