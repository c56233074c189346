"""Streaming write and read of one Orbax PyTree item with tensorstore, for the converters.

`PyTreeItemWriter` writes a PyTree item in exactly the format Orbax's (0.11.23 and 0.12.8)
PyTreeCheckpointHandler writes with OCDBT (a per-process OCDBT database `ocdbt.process_0/` merged into the item's root
database, zarr v2 arrays with zstd, `_METADATA` with the tree structure), but one slice at a time:
stacked [L, ...] params are chunked one layer per chunk, and any chunk over CHUNK_BYTES is cut along
its first free axis, so each write is a few whole chunks and peak memory stays about one Megatron
tensor (the one being laid out) rather than a multiple of it or of the model.

May import: checkpoint.layout.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from agpt_jax import compat
from agpt_jax.checkpoint.layout import (_JSON_HANDLER, _KEY_TYPE_DICT, _OCDBT_WRITE_CONFIG,
                                        _PROCESS_SUBDIR, _PYTREE_HANDLER, FORMAT, FORMAT_VERSION,
                                        ITEM_METADATA, CheckpointError, LeafPath)

#: Largest zarr chunk the writer makes. A leaf whose (per-layer) slice is bigger is cut along its
#: first free axis, and each chunk is a write of its own, so tensorstore encodes and stores a few
#: MiB at a time instead of holding a whole-tensor chunk and its compressed copy (a 7B embedding is
#: 0.5 GB). Any chunking reads back the same array.
CHUNK_BYTES = 32 << 20


def _ts_context():
    import tensorstore as ts

    return ts.Context({
        "file_io_concurrency": {"limit": 128},
        "cache_pool#ocdbt": {"total_bytes_limit": 100000000},
    })


def _kvstore_spec(path: str, write: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": path},
        "cache_pool": "cache_pool#ocdbt",
    }
    if write:
        spec["config"] = dict(_OCDBT_WRITE_CONFIG)
        spec["assume_config"] = True
    return spec


def leaf_key(path: LeafPath) -> str:
    """Orbax's key of a leaf in the OCDBT store: the dotted tree path."""
    return ".".join(path)


class PyTreeItemWriter:
    """Write one Orbax PyTree item (nested dicts of arrays) slice by slice.

    Usage: `create(path, shape)` every leaf, `write(path, value, index)` the data (a stacked leaf
    one leading-axis slice at a time, the others whole), then `finalize()`. Writes are asynchronous,
    one per chunk (at most CHUNK_BYTES); at most `max_inflight_bytes` of source data is held by
    pending writes.
    """

    def __init__(self, item_dir: str, max_inflight_bytes: int = 1 << 30) -> None:
        import tensorstore as ts

        self._ts = ts
        self.item_dir = os.path.abspath(item_dir)
        os.makedirs(self.item_dir, exist_ok=True)
        self._context = _ts_context()
        self._kv = _kvstore_spec(os.path.join(self.item_dir, _PROCESS_SUBDIR), write=True)
        self._arrays: dict[LeafPath, Any] = {}
        self._kinds: dict[LeafPath, str] = {}
        self._rows: dict[LeafPath, int] = {}  # chunk length along the first axis a write has
        self._pending: list[tuple[Any, int]] = []
        self._pending_bytes = 0
        self._max_inflight = max_inflight_bytes

    def create(self, path: LeafPath, shape: Sequence[int], dtype: Any = np.float32,
               stacked: bool = False) -> None:
        """Declare a leaf.

        Args:
            path: tree path of the leaf, e.g. ("layers", "attn", "q").
            shape: full shape.
            dtype: numpy dtype.
            stacked: chunk one leading-axis slice per chunk (for [L, ...] params written layer by
                layer); otherwise one chunk for the whole array, as Orbax does.
        """
        shape = tuple(int(s) for s in shape)
        chunks = list((1,) + shape[1:] if stacked and shape else shape)
        lead = 1 if stacked and shape else 0  # the first axis a write cuts into chunks
        if len(shape) > lead:
            row = int(np.prod(shape[lead + 1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            chunks[lead] = max(1, min(shape[lead], CHUNK_BYTES // max(row, 1)))
            self._rows[path] = chunks[lead]
        spec = {
            "driver": "zarr",
            "kvstore": dict(self._kv, path=leaf_key(path)),
            "metadata": {
                "shape": list(shape), "chunks": list(chunks),
                "compressor": {"id": "zstd", "level": 1},
                "dtype": np.dtype(dtype).str, "fill_value": None, "order": "C",
                "dimension_separator": ".", "filters": None,
            },
            "create": True,
            "delete_existing": False,
            "store_data_equal_to_fill_value": True,
        }
        self._arrays[path] = self._ts.open(spec, context=self._context).result()
        self._kinds[path] = "scalar" if not shape else "np.ndarray"

    def chunk_rows(self, path: LeafPath) -> int:
        """The chunk length along the first axis a write of `path` has (see CHUNK_BYTES)."""
        return self._rows[path]

    def write(self, path: LeafPath, value: np.ndarray, index: int | None = None,
              start: int | None = None) -> None:
        """Write a whole leaf (index None) or its slice at `index` of the leading axis; with
        `start`, only rows [start, start + len(value)) of it (best at multiples of chunk_rows)."""
        arr = self._arrays[path]
        target = arr if index is None else arr[index]
        value = np.asarray(value)
        offset = start or 0  # tensorstore keeps absolute indices: slices below add it
        shape = tuple(target.shape)
        if start is not None and value.ndim and 0 <= start <= shape[0] - value.shape[0]:
            shape = (value.shape[0],) + shape[1:]
        if tuple(value.shape) != shape:
            raise ValueError(f"{leaf_key(path)}: writing shape {value.shape} into "
                             f"{tuple(target.shape)}" + (f" at row {start}" if start else ""))
        n = value.shape[0] if value.ndim else 1
        step = self._rows.get(path, n) or 1
        for begin in range(0, max(n, 1), step):
            stop = min(begin + step, n)
            block = value[begin:stop] if value.ndim else value
            dest = target[offset + begin:offset + stop] if value.ndim else target
            future = dest.write(block)
            self._pending.append((future, block.nbytes))
            self._pending_bytes += block.nbytes
            while self._pending and self._pending_bytes > self._max_inflight:
                self._wait_oldest()

    def drain(self) -> None:
        """Wait for every pending write (the data they held is released)."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.pop(0)
        future.result()
        self._pending_bytes -= nbytes

    def abort(self) -> None:
        """Wait for pending writes and drop them, so the caller can delete the item folder."""
        for future, _ in self._pending:
            try:
                future.result()
            except Exception:  # the item is being discarded; its write errors do not matter
                pass
        self._pending.clear()
        self._pending_bytes = 0
        self._arrays.clear()

    def finalize(self) -> None:
        """Wait for all writes, merge the per-process database and write `_METADATA`."""
        self.drain()
        self._arrays.clear()
        ts = self._ts
        # Same merge as Orbax's `merge_ocdbt_per_process_files`: copy the process database's key
        # range into the item's root database in one transaction.
        child = ts.KvStore.open(self._kv, context=self._context).result()
        parent = ts.KvStore.open(_kvstore_spec(self.item_dir, write=True),
                                 context=self._context).result()
        txn = ts.Transaction(atomic=True)
        child.experimental_copy_range_to(parent.with_transaction(txn)).result()
        txn.commit_async().result()
        tree_metadata = {}
        for path in sorted(self._kinds):
            tree_metadata[str(path)] = {
                "key_metadata": [{"key": k, "key_type": _KEY_TYPE_DICT} for k in path],
                "value_metadata": {"value_type": self._kinds[path], "skip_deserialize": False},
            }
        _write_json(os.path.join(self.item_dir, "_METADATA"), {
            "tree_metadata": tree_metadata, **compat.ORBAX_ITEM_METADATA_EXTRA, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None})


class PyTreeItemReader:
    """Read leaves of an Orbax PyTree item (OCDBT) one leading-axis slice at a time."""

    def __init__(self, item_dir: str) -> None:
        import tensorstore as ts

        self._ts = ts
        self.item_dir = os.path.abspath(item_dir)
        meta_path = os.path.join(self.item_dir, "_METADATA")
        if not os.path.isfile(meta_path):
            raise CheckpointError(
                f"{meta_path}: missing; {self.item_dir} is not an Orbax PyTree item")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("use_zarr3"):
            raise CheckpointError(f"{meta_path}: zarr3 items are not supported; save with zarr v2")
        self.paths: list[LeafPath] = [
            tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()]
        self._context = _ts_context()
        self._kv = _kvstore_spec(self.item_dir, write=False)
        self._arrays: dict[LeafPath, Any] = {}

    def _open(self, path: LeafPath):
        if path not in self._arrays:
            if path not in self.paths:
                raise CheckpointError(f"{self.item_dir}: no leaf {leaf_key(path)!r}")
            spec = {"driver": "zarr", "kvstore": dict(self._kv, path=leaf_key(path)), "open": True}
            self._arrays[path] = self._ts.open(spec, context=self._context,
                                               read=True).result()
        return self._arrays[path]

    def shape(self, path: LeafPath) -> tuple[int, ...]:
        return tuple(self._open(path).shape)

    def read(self, path: LeafPath, index: int | None = None) -> np.ndarray:
        """The whole leaf, or its slice at `index` of the leading axis, as numpy."""
        arr = self._open(path)
        return np.asarray((arr if index is None else arr[index]).read().result())


# ----------------------------------------------------------------------------------------------
# Step-level files.


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=None if path.endswith("_METADATA") else 1)


def write_metadata_item(directory: str, metadata: dict[str, Any]) -> None:
    """Write `DIR/metadata/metadata` as Orbax's JsonCheckpointHandler does."""
    meta = dict(metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    os.makedirs(os.path.join(directory, ITEM_METADATA), exist_ok=True)
    _write_json(os.path.join(directory, ITEM_METADATA, ITEM_METADATA), meta)


def write_step_metadata(directory: str, items: Iterable[str], init_ns: int) -> None:
    """Write `DIR/_CHECKPOINT_METADATA` as a CheckpointManager step does; call it last."""
    handlers = {name: (_JSON_HANDLER if name == ITEM_METADATA else _PYTREE_HANDLER)
                for name in sorted(items)}
    _write_json(os.path.join(directory, "_CHECKPOINT_METADATA"), {
        "item_handlers": handlers, "metrics": {}, "performance_metrics": {},
        "init_timestamp_nsecs": init_ns, "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": {}})
