"""The run's Orbax CheckpointManager: SAVE/checkpoints/<iteration>/ with five items.

    params/    PyTree: the fp32 params tree (same item as agpt_jax.checkpoint.layout, so converters
               read a run's step directory like a converted checkpoint)
    adam/      PyTree: {"mu", "nu", "count"}: Adam moments and step (torch's exp_avg, exp_avg_sq,
               step)
    train/     JSON: TrainProgress (iteration, schedule count, consumed samples and tokens per
               corpus, skipped updates, the last LR)
    data/      JSON: the batch iterator state (agpt_jax.data.BatchIterator.get_state)
    metadata/  JSON: agpt-jax metadata (format, model, param_groups, iteration, adam_step, the
               resolved run config), as agpt_jax.checkpoint.read_metadata expects

Saves are asynchronous (the device-to-host copy happens before `save` returns, the write in the
background; on CPU, where that "copy" is a view of the device buffer which the next donated train
step overwrites, `save` first copies the arrays on device) and atomic: Orbax writes
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a step folder without its final
name is never restored. The newest `keep` steps are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from agpt_jax.checkpoint import layout

PyTree = Any

ITEM_TRAIN = "train"
ITEM_DATA = "data"
ITEMS = (layout.ITEM_PARAMS, layout.ITEM_ADAM, ITEM_TRAIN, ITEM_DATA, layout.ITEM_METADATA)


class CheckpointWriteError(layout.CheckpointError):
    """Writing a checkpoint failed (disk full, quota, I/O error); earlier steps are intact."""


def _root_os_error(err: BaseException) -> BaseException:
    """The OSError under Orbax's wrappers (background-thread errors are re-raised), else `err`."""
    seen = err
    for _ in range(10):
        if isinstance(seen, OSError):
            return seen
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return err


_RETIRED_FIELDS = ("rng",)


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """Host-side run state saved with every checkpoint (the `train` item).

    Attributes:
        iteration: iterations completed in this run (the step number of the checkpoint).
        schedule_count: the optax count the LR schedule reads for the next update.
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
    consumed_samples: int
    data_start_iteration: int
    consumed_tokens_per_corpus: dict[str, int]
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    last_lr: float = 0.0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainProgress:
        fields = {f.name for f in dataclasses.fields(cls)}
        # Earlier versions also stored the base PRNG key, which nothing read: the params are
        # in the checkpoint and the data order is the data state's.
        d = {k: v for k, v in d.items() if k not in _RETIRED_FIELDS}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise layout.CheckpointError(f"train item has unknown fields {unknown}; it was written by "
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
        copy_before_async_save: copy the arrays on device before an asynchronous save. Needed
            where Orbax's host copy aliases device memory (CPU): the train step donates the
            state's buffers, so without a copy the step being written is overwritten in place
            by later iterations (found by the kill -9 fault test: a resumed run diverged).
    """

    def __init__(self, run_dir: str, keep: int, async_save: bool = True,
                 copy_before_async_save: bool = False):
        self._async = async_save
        self._pending: int | None = None
        self._failed: CheckpointWriteError | None = None
        self._copy = copy_before_async_save
        self.directory = os.path.join(os.path.abspath(run_dir), layout.CHECKPOINTS_SUBDIR)
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
        if self._async and self._copy and not wait:
            # Fresh device buffers that no later (donating) step can overwrite; Orbax holds them
            # until the background write ends.
            params, adam = jax.tree.map(lambda x: x.copy(), (params, adam))
        self._pending = step
        with self._reporting_write_errors():
            self._manager.save(step, args=ocp.args.Composite(**{
                layout.ITEM_PARAMS: ocp.args.PyTreeSave(params),
                layout.ITEM_ADAM: ocp.args.PyTreeSave(adam),
                ITEM_TRAIN: ocp.args.JsonSave(dataclasses.asdict(progress)),
                ITEM_DATA: ocp.args.JsonSave(data_state),
                layout.ITEM_METADATA: ocp.args.JsonSave(metadata),
            }), force=True)
            if wait:
                self._manager.wait_until_finished()

    def complete_steps(self) -> list[int]:
        """The steps on disk with their final name and Orbax's completion file, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit() and os.path.isfile(
            os.path.join(self.directory, n, "_CHECKPOINT_METADATA")))

    @contextlib.contextmanager
    def _reporting_write_errors(self):
        """Turns a failed (possibly earlier, asynchronous) write into one CheckpointWriteError
        that names the step, the cause and the checkpoint a restart resumes from."""
        if self._failed is not None:
            raise self._failed
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax re-raises background errors as they came
            cause = _root_os_error(e)
            good = self.complete_steps()
            resume = (f"the newest complete checkpoint is {self.step_dir(good[-1])}, which a "
                      "restart resumes from" if good else "no complete checkpoint was written")
            self._failed = CheckpointWriteError(
                f"writing a checkpoint under {self.directory} failed (step {self._pending} or the "
                f"asynchronous one before it): {type(cause).__name__}: {cause}; {resume}. Free "
                "disk space (or point SAVE at a filesystem with room) and run the same command "
                "again")
            raise self._failed from e

    def restore(self, step: int, params_target: PyTree, adam_target: dict[str, PyTree],
                place: Callable[[jax.Array], jax.Array] | None = None) -> Restored:
        """Restores every item of `step` into the targets' shardings.

        The JSON items come back in one composite restore, the arrays through
        `layout.restore_arrays` (a few leaves at a time, each passed through `place`).

        Args:
            step: a step from `latest_step`.
            params_target, adam_target: trees of jax.ShapeDtypeStruct with `sharding=`.
            place: applied to every restored array (see `layout.restore_arrays`).
        """
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            ITEM_TRAIN: ocp.args.JsonRestore(),
            ITEM_DATA: ocp.args.JsonRestore(),
            layout.ITEM_METADATA: ocp.args.JsonRestore(),
        }))
        progress = TrainProgress.from_json(dict(out[ITEM_TRAIN]))
        arrays = layout.restore_arrays(
            self.step_dir(step), {layout.ITEM_PARAMS: params_target, layout.ITEM_ADAM: adam_target},
            place)
        return Restored(params=arrays[layout.ITEM_PARAMS], adam=arrays[layout.ITEM_ADAM],
                        progress=progress, data_state=dict(out[ITEM_DATA]),
                        metadata=dict(out[layout.ITEM_METADATA]))

    def restore_newest(self, params_target: PyTree, adam_target: dict[str, PyTree],
                       place: Callable[[jax.Array], jax.Array] | None = None
                       ) -> tuple[int, Restored] | None:
        """Restores the newest step that reads back completely, skipping damaged ones.

        A step directory damaged after it was written (a file truncated or removed, a disk
        error) fails to restore; it is logged as a warning naming it, moved aside to
        `<step>.damaged` (so that this run can write that step again, and nothing is deleted),
        and the previous step is tried.

        Args:
            params_target, adam_target, place: as for `restore`.

        Returns:
            (step, restored), or None when the run directory has no checkpoint.

        Raises:
            CheckpointError: checkpoints exist but none of them restores.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                return step, self.restore(step, params_target, adam_target, place)
            except Exception as e:  # noqa: BLE001 - Orbax, tensorstore and JSON errors alike
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning("checkpoint %s is damaged and is skipped (%s); moved to %s.damaged"
                                "; trying the previous step", self.step_dir(step), reason[:300],
                                self.step_dir(step))
                damaged.append(f"{self.step_dir(step)} ({reason[:200]})")
                self._move_aside(step)
        if damaged:
            raise layout.CheckpointError(
                f"every checkpoint of {self.directory} is damaged: {'; '.join(damaged)}; restore "
                "one from a backup or start a new SAVE")
        return None

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.step_dir(step)
            dst = f"{src}.damaged"
            suffix = 1
            while os.path.exists(dst):
                suffix += 1
                dst = f"{src}.damaged{suffix}"
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"agpt_jax damaged step {step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete.

        Raises:
            CheckpointWriteError: a save failed.
        """
        with self._reporting_write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes the manager.

        Raises:
            CheckpointWriteError: a pending save failed (not raised again if already reported).
        """
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the failed save was reported already
                if self._failed is None:
                    raise


def read_progress(step_dir: str) -> TrainProgress | None:
    """The train item of a run's step directory, or None for a converted checkpoint."""
    path = os.path.join(step_dir, ITEM_TRAIN, "metadata")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return TrainProgress.from_json(json.load(f))
