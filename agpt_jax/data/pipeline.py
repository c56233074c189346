"""grain pipeline over a blended split: global batch t is blended samples [t*GBS, (t+1)*GBS).

Megatron's `MegatronPretrainingSampler` walks the blended indices in order, so iteration t reads
samples [t*GBS, (t+1)*GBS) (spec/megatron-deepspeed.md §5.6). Every batch is a pure function of t,
so the iterator state is just the next iteration: it is the same on every process and restores under
any process count that divides the (unchanged) global batch.

Each process reads only its contiguous rows [p*B_local, (p+1)*B_local) of the global batch, the
layout `jax.make_array_from_process_local_data` expects for a batch sharded over processes in order.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import grain
import numpy as np

from agpt_jax.data.blend import BlendedDataset
from agpt_jax.data.indexed import DataError

__all__ = ["BatchIterator", "make_batch_iterator", "read_global_batch", "read_iterator_state"]

_STATE_VERSION = 1


def read_global_batch_rows(ds: BlendedDataset, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Blended samples [start, start+count) as (int64[count, S+1] tokens, int32[count] corpus ids)."""
    text = np.empty((count, ds.seq_length + 1), dtype=np.int64)
    corpus = np.empty(count, dtype=np.int32)
    for r in range(count):
        text[r], corpus[r] = ds[start + r]
    return text, corpus


def read_global_batch(ds: BlendedDataset, iteration: int, global_batch_size: int) -> dict[str, np.ndarray]:
    """The whole global batch of one iteration: `text` int64[GBS, S+1] and `corpus` int32[GBS]."""
    text, corpus = read_global_batch_rows(ds, iteration * global_batch_size, global_batch_size)
    return {"text": text, "corpus": corpus}


class BatchIterator(grain.DatasetIterator):
    """Checkpointable iterator of this process's rows of consecutive global batches.

    Items: {"tokens": int32[B_local, S], "labels": int32[B_local, S], "corpus": int32[B_local]},
    tokens = text[:, :-1] and labels = text[:, 1:] as Megatron's `get_batch`. Batches are read by
    a grain `MapDataset` over iteration numbers with `prefetch` batches computed ahead in
    background threads.

    The state (`get_state`) is a JSON dict {"next_iteration", "global_batch_size", "num_samples",
    "split", "version"}; it saves with `grain.checkpoint.CheckpointSave(iterator)` inside the
    Orbax step, or as a plain JSON item.
    """

    def __init__(self, ds: BlendedDataset, *, global_batch_size: int, start_iteration: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2):
        super().__init__()
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise DataError(
                f"global_batch_size {global_batch_size} must be positive and divisible by the "
                f"process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} outside [0, {process_count})")
        self._ds = ds
        self._gbs = int(global_batch_size)
        self._local = self._gbs // process_count
        self._row0 = process_index * self._local
        self._prefetch = int(prefetch)
        self.num_iterations = len(ds) // self._gbs
        self._next = 0
        self._inner = None
        self._seek(int(start_iteration))

    def _read(self, iteration: int) -> dict[str, np.ndarray]:
        text, corpus = read_global_batch_rows(self._ds, iteration * self._gbs + self._row0, self._local)
        return {"tokens": text[:, :-1].astype(np.int32), "labels": text[:, 1:].astype(np.int32),
                "corpus": corpus}

    def _seek(self, iteration: int) -> None:
        if not 0 <= iteration <= self.num_iterations:
            raise DataError(
                f"iteration {iteration} is outside the {self._ds.split_name} blend, which holds "
                f"{self.num_iterations} global batches of {self._gbs}"
            )
        self._next = iteration
        source = grain.MapDataset.range(iteration, self.num_iterations).map(self._read)
        options = grain.ReadOptions(num_threads=max(1, self._prefetch), prefetch_buffer_size=self._prefetch)
        self._inner = iter(source.to_iter_dataset(options))

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._inner)  # StopIteration after the last full global batch
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "next_iteration": self._next, "global_batch_size": self._gbs,
                "num_samples": len(self._ds), "split": self._ds.split_name}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores to the exact next batch; the process count may differ from the saving run's."""
        for field in ("next_iteration", "global_batch_size", "num_samples"):
            if field not in state:
                raise DataError(f"data iterator state lacks {field!r}: {state}; it was not saved by agpt-jax")
        if state["global_batch_size"] != self._gbs:
            raise DataError(
                f"data iterator state has global_batch_size {state['global_batch_size']} but this run uses "
                f"{self._gbs}; resuming needs the same global batch (change it in the config)"
            )
        if state["num_samples"] != len(self._ds):
            raise DataError(
                f"data iterator state was saved for a {state.get('split')} blend of {state['num_samples']} "
                f"samples, this one has {len(self._ds)}; the DATA_FILE_LIST or data flags changed"
            )
        self._seek(int(state["next_iteration"]))

    def close(self) -> None:
        self._inner = None
        super().close()


def make_batch_iterator(ds: BlendedDataset, *, global_batch_size: int, start_iteration: int = 0,
                        process_index: int = 0, process_count: int = 1, prefetch: int = 2) -> BatchIterator:
    """Iterator over this process's rows of global batches `start_iteration, start_iteration+1, ...`.

    Args:
        ds: a blended split (`build_blended_splits`).
        global_batch_size: GBS; must divide by `process_count`.
        start_iteration: first iteration to read (resume = start at the step).
        process_index, process_count: this process and how many read the batch.
        prefetch: batches prepared ahead in background threads (0: synchronous).
    """
    return BatchIterator(ds, global_batch_size=global_batch_size, start_iteration=start_iteration,
                         process_index=process_index, process_count=process_count, prefetch=prefetch)


def read_iterator_state(directory: str) -> dict[str, Any]:
    """Reads the state grain's `CheckpointSave` wrote in `directory`, whatever process count wrote it.

    grain's own restore only opens `process_{i}-of-{n}.json` for the current n; the state of this
    iterator is the same on every process, so any of the files serves a run with another count.

    Raises:
        DataError: no state file, or files that disagree.
    """
    files = sorted(glob.glob(os.path.join(directory, "process_*-of-*.json")))
    if not files:
        raise DataError(f"{directory}: no process_*-of-*.json data iterator state; was the step saved with it?")
    states = [json.loads(open(f).read()) for f in files]
    if any(s != states[0] for s in states[1:]):
        raise DataError(f"{directory}: the per-process data iterator states disagree: {states}")
    return states[0]
