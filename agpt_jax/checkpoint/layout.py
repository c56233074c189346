"""The agpt-jax checkpoint layout (what converters write and runs save) and its readers.

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

This module: the layout's constants and its readers (resolve a directory, read the metadata,
restore params and Adam). May import: compat, hostmem, model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from agpt_jax import hostmem
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
    if target is not None:
        return restore_arrays(directory, {item: target})[item]
    import orbax.checkpoint as ocp
    from etils import epath

    directory = resolve_checkpoint_dir(directory)
    item_dir = _item_dir(directory, item)
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    target = meta.tree if hasattr(meta, "tree") else meta
    restore_args = _map_tree(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    # Restore through the step's CompositeCheckpointHandler, as a CheckpointManager does.
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)}))
    return out[item]


def _item_dir(directory: str, item: str) -> str:
    item_dir = os.path.join(directory, item)
    if not os.path.isdir(item_dir):
        raise CheckpointError(f"{item_dir}: missing; the checkpoint has no {item!r} item")
    return item_dir


def _leaf_groups(leaves: list[tuple[str, LeafPath, Any]]) -> list[list[tuple[str, LeafPath, Any]]]:
    """`leaves` (item, path, ShapeDtypeStruct), largest first (equal sizes in their given order),
    cut into runs of at most the largest leaf's bytes.

    Largest first because reading a group holds about three times its bytes for a moment (the
    file's chunks, the host buffer, the restored leaf, the caller's copy) on top of every leaf
    already restored: the big leaves come while little is held, and the last groups, read when
    nearly the whole state is, hold the smallest leaves (fewer bytes where the leaves differ
    much in size: at demo scale on jax 0.11.2 the median peak_over_state of a resume went from
    1.26-1.37 to 1.14-1.25, BENCHMARKS.md)."""
    def nbytes(leaf: Any) -> int:
        return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize

    leaves = sorted(leaves, key=lambda entry: -nbytes(entry[2]))
    budget = max(nbytes(leaf) for _, _, leaf in leaves)
    groups: list[list[tuple[str, LeafPath, Any]]] = []
    size = budget + 1
    for entry in leaves:
        if size + nbytes(entry[2]) > budget:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes(entry[2])
    return groups


def _nest(entries: list[tuple[LeafPath, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in entries:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _check_leaves(directory: str, item: str, wanted: set[LeafPath]) -> None:
    """The item's stored leaves are exactly `wanted` (a partial restore would not say so)."""
    import orbax.checkpoint as ocp
    from etils import epath

    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(_item_dir(directory, item)))
    stored = {path for path, _ in _leaves_by_path(meta.tree if hasattr(meta, "tree") else meta)}
    missing, extra = sorted(wanted - stored), sorted(stored - wanted)
    if missing or extra:
        names = lambda paths: ", ".join(".".join(p) for p in paths[:4]) + (
            " ..." if len(paths) > 4 else "")
        raise CheckpointError(
            f"{os.path.join(directory, item)}: its leaves do not match this run's model "
            f"(missing: {names(missing) or 'none'}; not in the model: {names(extra) or 'none'}); "
            "load a checkpoint of the same model config")


def _leaves_by_path(tree: PyTree) -> list[tuple[LeafPath, Any]]:
    """(dict keys from the root, leaf) for every leaf of a tree of nested dicts, in jax's order."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(k.key) for k in path), leaf) for path, leaf in flat]


def restore_arrays(directory: str, targets: dict[str, PyTree],
                   place: Callable[[Any], Any] | None = None) -> dict[str, PyTree]:
    """Restores array items of one checkpoint straight into sharded jax Arrays, a few leaves at a
    time, so that the host memory a restore costs above the state is about one leaf.

    Orbax reads each leaf into a host buffer and copies it to the device; the host buffer is
    only freed once jax's deferred release runs (at a garbage collection), and one restore of a
    whole item keeps every leaf's buffer at once (1.6-1.7x the item on the CPU client). Here
    each group of leaves (at most the largest leaf's bytes) is one partial restore, followed by
    a collection that frees its host buffers; `place` then moves each restored leaf where the
    caller wants it (e.g. into buffers it may donate), the restored leaves are dropped, and
    `hostmem.release_free_heap` gives what the group freed back to the kernel before the next
    group is read (glibc would otherwise keep it resident in free chunks that the next group's
    differently sized buffers do not fit: 0.2 of the state at 125M, 0.7 at demo scale). Every
    process makes the same calls in the same order (each restore is collective).

    Args:
        directory: a checkpoint directory or run root (see `resolve_checkpoint_dir`), or a step.
        targets: item name (ITEM_PARAMS, ITEM_ADAM) -> tree of nested dicts of
            `jax.ShapeDtypeStruct` with `sharding=`.
        place: applied to each restored leaf; the restored leaf is dropped after it.

    Returns:
        item name -> the restored tree, shaped like its target.

    Raises:
        CheckpointError: an item is missing, or its leaves are not the target's.
    """
    import gc

    import jax
    import orbax.checkpoint as ocp

    directory = resolve_checkpoint_dir(directory)
    leaves = []
    for item, target in targets.items():
        by_path = _leaves_by_path(target)
        _check_leaves(directory, item, {path for path, _ in by_path})
        leaves += [(item, path, leaf) for path, leaf in by_path]
    restored: dict[tuple[str, LeafPath], Any] = {}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        for group in _leaf_groups(leaves):
            by_item: dict[str, list[tuple[LeafPath, Any]]] = {}
            for item, path, leaf in group:
                by_item.setdefault(item, []).append((path, leaf))
            args = {}
            for item, entries in by_item.items():
                sub = _nest(entries)
                args[item] = ocp.args.PyTreeRestore(
                    item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub),
                    partial_restore=True)
            out = ckptr.restore(directory, args=ocp.args.Composite(**args))
            gc.collect(0)  # frees the group's host buffers: jax releases them at any collection
            for item, path, _ in group:
                node = out[item]
                for key in path[:-1]:
                    node = node[key]
                leaf = node.pop(path[-1])
                restored[(item, path)] = leaf if place is None else place(leaf)
                del leaf
            del out, node
            # The group's host buffers and restored leaves are free now; glibc would keep them
            # resident in chunks the next group's buffers need not fit: give them back.
            hostmem.release_free_heap()
    return {item: jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(target),
                [restored.pop((i, p)) for i, p, _ in leaves if i == item])
            for item, target in targets.items()}


def restore_params(directory: str, target: PyTree | None = None) -> PyTree:
    """Restore the params tree.

    Args:
        directory: a checkpoint directory or run root (see `resolve_checkpoint_dir`).
        target: None for numpy arrays, or a tree of `jax.ShapeDtypeStruct` with `sharding=` to
            restore straight into sharded jax Arrays (`restore_arrays`).

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
