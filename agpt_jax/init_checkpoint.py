"""The on-disk checkpoint layout agpt-jax starts from and saves: a streaming writer and readers.

A checkpoint directory is one Orbax `CheckpointManager` step with these items:

    DIR/_CHECKPOINT_METADATA   Orbax step metadata (item name -> handler), written last
    DIR/params/                Orbax PyTree item (OCDBT + zarr): the plain params tree, fp32,
                               leaves keyed by dotted path ("layers.attn.q")
    DIR/adam/                  Orbax PyTree item: {"mu": params-like, "nu": params-like,
                               "count": int32 scalar}; absent when converted without optimizer state
    DIR/metadata/metadata      JSON (Orbax's JsonCheckpointHandler layout): {"format": "agpt-jax",
                               "format_version": 1, "created_by", "source", "iteration",
                               "adam_step", "has_optimizer_state", "model"
                               (dataclasses.asdict(GPTConfig)), "original_vocab_size",
                               "padded_vocab_size", "last_lr"; a training run's step adds
                               "run_config" (RunConfig.to_json)}, plus what a converter
                               recorded of a foreign source (param_groups, megatron_args, ...),
                               which agpt_jax carries through unread

A training run writes the same items (plus `train` and `data`) under `SAVE/checkpoints/<step>/`
through its CheckpointManager; `resolve_checkpoint_dir` accepts either.

`PyTreeItemWriter` writes a PyTree item in exactly the format Orbax's (0.11.23 and 0.12.8)
PyTreeCheckpointHandler writes with OCDBT (a per-process OCDBT database `ocdbt.process_0/` merged into the item's root
database, zarr v2 arrays with zstd, `_METADATA` with the tree structure), but one slice at a time:
stacked [L, ...] params are chunked one layer per chunk, so each layer slice is a whole chunk and
peak memory stays a small multiple of one Megatron tensor rather than of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Iterable, Sequence

import numpy as np

from agpt_jax import compat
from agpt_jax.model import GPTConfig

PyTree = Any
LeafPath = tuple[str, ...]

ITEM_PARAMS = "params"
ITEM_ADAM = "adam"
ITEM_METADATA = "metadata"
FORMAT = "agpt-jax"
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"

# Written by Orbax 0.11.23; matched so Orbax's own restore reads what we write.
_PROCESS_SUBDIR = "ocdbt.process_0"
_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
_JSON_HANDLER = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"
_OCDBT_WRITE_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100000000,
    "manifest_kind": "single",
}
_KEY_TYPE_DICT = 2  # orbax tree_metadata KeyType.DICT


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or not in the agpt-jax layout."""


# ----------------------------------------------------------------------------------------------
# Locating and reading.


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ITEM_PARAMS)) and os.path.isfile(
        os.path.join(path, "_CHECKPOINT_METADATA"))


def _finalized_steps(root: str) -> list[int]:
    """Numbered step folders under root that Orbax has finalized.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and renames it to `<step>` when the
    save commits (on a POSIX file system), so a purely numeric name is a finalized step.
    """
    steps = []
    for name in os.listdir(root):
        if re.fullmatch(r"\d+", name) and _is_step_dir(os.path.join(root, name)):
            steps.append(int(name))
    return sorted(steps)


def resolve_checkpoint_dir(path: str) -> str:
    """Find the checkpoint directory to read.

    Args:
        path: a checkpoint directory (holding `params/`), a training run's save root (whose
            CheckpointManager writes `SAVE/checkpoints/<step>/`), or that `checkpoints/` folder.

    Returns:
        The absolute path of the checkpoint directory; for a run, its newest finalized step.

    Raises:
        CheckpointError: nothing usable at `path`.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if os.path.isdir(os.path.join(path, ITEM_PARAMS)):
        if not os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
            raise CheckpointError(
                f"{path}: has params/ but no _CHECKPOINT_METADATA, so the save never finished; "
                "convert or save it again")
        return path
    for root in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
        if os.path.isdir(root):
            steps = _finalized_steps(root)
            if steps:
                return os.path.join(root, str(steps[-1]))
    pending = []
    sub = os.path.join(path, CHECKPOINTS_SUBDIR)
    if os.path.isdir(sub):
        pending = [n for n in os.listdir(sub) if "tmp" in n]
    hint = f" (only unfinished saves: {sorted(pending)[:3]})" if pending else ""
    raise CheckpointError(
        f"{path}: not an agpt-jax checkpoint: expected params/ (a converted or saved checkpoint) "
        f"or numbered step folders under {CHECKPOINTS_SUBDIR}/ (a training run){hint}; pass the "
        "directory written by converters.universal_to_orbax or a run's --save folder")


def read_metadata(directory: str) -> dict[str, Any]:
    """The JSON metadata of a checkpoint directory (see the module docstring for the keys)."""
    directory = resolve_checkpoint_dir(directory)
    path = os.path.join(directory, ITEM_METADATA, ITEM_METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint has no agpt-jax metadata item")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}, expected "
                              f"{FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' is {meta.get('format_version')!r}; "
                              f"this agpt-jax reads version {FORMAT_VERSION}")
    return meta


def model_config(directory: str) -> GPTConfig:
    """The GPTConfig recorded in a checkpoint's metadata."""
    meta = read_metadata(directory)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{directory}: metadata field 'model' is missing")
    unknown = sorted(set(model) - fields)
    if unknown:
        raise CheckpointError(f"{directory}: metadata field 'model' has unknown keys {unknown}")
    return GPTConfig(**model)


def _map_tree(fn, tree):
    if isinstance(tree, dict):
        return {k: _map_tree(fn, v) for k, v in tree.items()}
    return fn(tree)


def _restore_item(directory: str, item: str, target: PyTree | None) -> PyTree:
    import orbax.checkpoint as ocp
    from etils import epath

    directory = resolve_checkpoint_dir(directory)
    item_dir = os.path.join(directory, item)
    if not os.path.isdir(item_dir):
        raise CheckpointError(f"{item_dir}: missing; the checkpoint has no {item!r} item")
    if target is None:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
        target = meta.tree if hasattr(meta, "tree") else meta
        restore_args = _map_tree(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    # Restore through the step's CompositeCheckpointHandler, as a CheckpointManager does.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)}))
    return out[item]


def restore_params(directory: str, target: PyTree | None = None) -> PyTree:
    """Restore the params tree.

    Args:
        directory: a checkpoint directory or run root (see `resolve_checkpoint_dir`).
        target: None for numpy arrays, or a tree of `jax.ShapeDtypeStruct` with `sharding=` to
            restore straight into sharded jax Arrays.

    Returns:
        The plain params tree (fp32).
    """
    return _restore_item(directory, ITEM_PARAMS, target)


def restore_adam(directory: str, target: PyTree | None = None) -> PyTree:
    """Restore {"mu", "nu", "count"} (Adam moments, raw torch exp_avg / exp_avg_sq, and step)."""
    return _restore_item(directory, ITEM_ADAM, target)


def has_adam(directory: str) -> bool:
    """Whether the checkpoint holds optimizer state."""
    return os.path.isdir(os.path.join(resolve_checkpoint_dir(directory), ITEM_ADAM))


# ----------------------------------------------------------------------------------------------
# Streaming write and read of one PyTree item with tensorstore.


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
    one leading-axis slice at a time, the others whole), then `finalize()`. Writes are asynchronous;
    at most `max_inflight_bytes` of source data is held by pending writes.
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
        chunks = (1,) + shape[1:] if stacked and shape else shape
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

    def write(self, path: LeafPath, value: np.ndarray, index: int | None = None) -> None:
        """Write a whole leaf (index None) or its slice at `index` of the leading axis."""
        arr = self._arrays[path]
        target = arr if index is None else arr[index]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{leaf_key(path)}: writing shape {value.shape} into "
                             f"{tuple(target.shape)}")
        future = target.write(value)
        self._pending.append((future, value.nbytes))
        self._pending_bytes += value.nbytes
        while self._pending and self._pending_bytes > self._max_inflight:
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
        while self._pending:
            self._wait_oldest()
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
