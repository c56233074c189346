"""Logical axis names, their mapping to the mesh axes, and shardings derived from one set of rules.

The model names the axes of every param and activation with the constants below; `rules(...)` maps
them to the mesh axes ``data``, ``fsdp`` and ``tensor``. Shardings for params, optimizer state and
batches all come from those rules through `param_shardings`, `state_shardings` and
`batch_sharding`; no PartitionSpec is written per tensor.

Strategies:
  * ``fsdp`` (ZeRO-3 like): params and optimizer state sharded over ``fsdp`` on their ``embed`` axis,
    all-gathered per layer inside the step.
  * ``zero1``: params replicated over ``fsdp``, optimizer state (and the fp32 update) sharded.
  * Tensor parallelism over ``tensor`` shards heads, kv heads, the MLP width and the vocabulary.
  * Batches are sharded over ``data`` and ``fsdp`` together.

A dimension that the assigned mesh axes do not divide evenly stays replicated over them (jit needs
even shards); `param_shardings` logs every such fallback so a plan shows where memory goes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

MESH_AXES = ("data", "fsdp", "tensor")

# Param axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"
LAYERS = "layers"
# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_HEAD_DIM = "activation_head_dim"

ACT_EMBED_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
ACT_HEADS_AXES = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_HEAD_DIM)
ACT_KV_HEADS_AXES = (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, ACT_HEAD_DIM)
ACT_MLP_AXES = (ACT_BATCH, ACT_LENGTH, ACT_MLP)
ACT_VOCAB_AXES = (ACT_BATCH, ACT_LENGTH, ACT_VOCAB)

PARAM_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, NORM, LAYERS)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB,
                   ACT_HEAD_DIM)
STRATEGIES = ("fsdp", "zero1")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def rules(strategy: str = "fsdp", *, for_optimizer_state: bool = False) -> Rules:
    """Logical-axis rules for a strategy.

    Args:
        strategy: "fsdp" (params and optimizer state sharded over fsdp) or "zero1" (params replicated
            over fsdp, optimizer state sharded).
        for_optimizer_state: the rules for Adam moments (always sharded over fsdp).

    Returns:
        (logical name, mesh axes) pairs for flax's logical partitioning, one per logical name.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    shard_embed = strategy == "fsdp" or for_optimizer_state
    return (
        (ACT_BATCH, ("data", "fsdp")),
        (ACT_LENGTH, None),
        (ACT_EMBED, None),
        (ACT_HEADS, "tensor"),
        (ACT_KV_HEADS, "tensor"),
        (ACT_HEAD_DIM, None),
        (ACT_MLP, "tensor"),
        (ACT_VOCAB, "tensor"),
        (VOCAB, "tensor"),
        (EMBED, "fsdp" if shard_embed else None),
        (HEADS, "tensor"),
        (KV_HEADS, "tensor"),
        (HEAD_DIM, None),
        (MLP, "tensor"),
        (NORM, None),
        (LAYERS, None),
    )


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def _even_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str,
               fallbacks: list[str]) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide evenly (recorded in fallbacks)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and dim % _axis_size(mesh, axes):
            fallbacks.append(f"{name}: dim {dim} not divisible by {axes}={_axis_size(mesh, axes)}")
            axes = None
        out.append(axes)
    return PartitionSpec(*out)


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def logical_specs(boxed_params: PyTree) -> PyTree:
    """The PartitionSpec of logical names of every leaf of a boxed (nn.Partitioned) tree."""
    return nn.get_partition_spec(boxed_params)


def param_shardings(abstract_params: PyTree, specs: PyTree, mesh: Mesh,
                    rule_set: Rules) -> PyTree:
    """NamedShardings for a plain params tree from its logical specs.

    Args:
        abstract_params: plain tree of arrays or ShapeDtypeStructs.
        specs: same structure, PartitionSpecs of logical names (from `logical_specs`).
        mesh: the device mesh.
        rule_set: from `rules`.
    """
    mesh_specs = nn.logical_to_mesh(specs, rule_set)
    fallbacks: list[str] = []

    def one(path, leaf, spec):
        return NamedSharding(mesh, _even_spec(spec, leaf.shape, mesh, _path_name(path), fallbacks))

    out = jax.tree_util.tree_map_with_path(one, abstract_params, mesh_specs)
    for line in fallbacks:
        logging.warning("replicated instead of sharded: %s", line)
    return out


def state_shardings(abstract_state: PyTree, abstract_params: PyTree, param_sharding: PyTree,
                    mesh: Mesh) -> PyTree:
    """Shardings for any tree whose leaves mirror params (optimizer state, train state).

    A leaf whose key path ends with a param's key path and has that param's shape gets the param's
    sharding (e.g. Adam's mu/nu); every other leaf (counts, scalars) is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        key = tuple(_path_name((k,)) for k in path)
        by_path[key] = (tuple(leaf.shape), None)
    flat_shardings = jax.tree_util.tree_flatten_with_path(param_sharding)[0]
    for path, shard in flat_shardings:
        key = tuple(_path_name((k,)) for k in path)
        by_path[key] = (by_path[key][0], shard)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        names = tuple(_path_name((k,)) for k in path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding from its logical axis names, on every platform.

    The rules in context (`nn.logical_axis_rules`) map the names to mesh axes of the mesh in
    context (`with mesh:`); without rules (one device) this is the identity. flax's
    `nn.with_logical_constraint` is not used because it does nothing when the devices are CPUs:
    on CPU (the tests and `agpt_jax.plan`) XLA was then left to shard activations as it liked
    and chose, for every projection of the 1B plan on data=2,fsdp=4, to gather the activations of
    all 8 devices and all-reduce fp32 [16384, ffn] partial products instead of gathering the
    weights. With the constraints the CPU plan compiles the program an accelerator runs.

    Args:
        x: an activation.
        logical_axes: one logical name (or None) per dim of x.
    """
    rule_set = nn.get_logical_axis_rules()
    if not rule_set:
        return x
    return jax.lax.with_sharding_constraint(x, nn.logical_to_mesh_axes(logical_axes, rule_set))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches [global_batch, ...] are split over data x fsdp on their first axis."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Everything a train step needs to place params, optimizer state and batches on a mesh."""

    mesh: Mesh
    strategy: str
    param_rules: Rules
    optimizer_rules: Rules

    @classmethod
    def build(cls, mesh: Mesh, strategy: str = "fsdp") -> ShardingPlan:
        return cls(mesh, strategy, rules(strategy), rules(strategy, for_optimizer_state=True))
