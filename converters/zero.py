"""Read Megatron-DeepSpeed ZeRO stage-1 checkpoints (a `global_stepN/` tag folder) without torch.

Layout (spec/zero-shards.md §1-§3), TP = PP = 1:

    <root>/latest                                        text: "global_stepN"
    <root>/global_stepN/mp_rank_00_model_states.pt       args, iteration, module, param_shapes, ...
    <root>/global_stepN/{bf16_,}zero_pp_rank_R_mp_rank_00_optim_states.pt    one per DP rank R:
        optimizer_state_dict: base_optimizer_state (AdamW state_dict: one flat fp32 partition per
        group), single_partition_of_fp32_groups, partition_count, group_paddings,
        param_slice_mappings, [zero_stage, loss_scaler, ...]

Each param group g is one flat space: its parameters back to back in `param_shapes[g]` order
(N elements), zero-padded at the end to P = ceil(N / 2D) * 2D, cut into D partitions of S = P/D;
rank r holds real_r = clamp(N - r*S, 0, S) real elements (§5). `group_paddings` is never trusted
(the 768-rank failure of §10): real_r comes from param_shapes, and only `tensor[:real_r]` of each
rank is read.

`open_zero` checks every rank file before anything is converted (§11: names and ranks, the writer
class, partition counts, group counts, lengths, the param_slice_mappings fragments against the
param_shapes walk, steps, hyperparameters); `ZeroCheckpoint.stream` then reads the ranks in order,
memory-mapped, and yields each parameter as soon as its last fragment is in, holding only the
parameters that continue on the next rank (at most one per group). TP > 1, PP > 1, ZeRO-3 and
elastic checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

from agpt_jax.model import GPTConfig
from converters import megatron_layout
from converters import pt_archive
from converters import universal
from converters.zero_files import (LATEST, STATES, GroupLayout, RankState, ZeroCheckpointError,
                                   same_as_rank0, group_layout, is_zero_dir, load_file,
                                   rank_files, read_rank, resolve_zero_dir)

__all__ = ["LATEST", "STATES", "ZeroCheckpoint", "ZeroCheckpointError", "is_zero_dir",
           "open_zero", "read_model_states", "resolve_zero_dir"]


# ----------------------------------------------------------------------------------------------
# The checkpoint.


def _module_tensor(module: Any, name: str) -> Any:
    """The tensor of a dotted parameter name in Megatron's nested module state dict."""
    node, rest = module, name
    while isinstance(node, Mapping):
        if rest in node:
            return node[rest]
        keys = [k for k in node if isinstance(k, str) and rest.startswith(k + ".")]
        if not keys:
            return None
        key = max(keys, key=len)
        node, rest = node[key], rest[len(key) + 1:]
    return None


@dataclasses.dataclass
class ZeroCheckpoint(universal.SourceCheckpoint):
    """An opened, checked ZeRO checkpoint; the tensors are read by `stream`.

    Beyond `universal.SourceCheckpoint` (whose `optimizer_state` is what ds_to_universal writes
    to zero/optimizer_state.pt: rank 0's optimizer_state_dict minus the sharded keys,
    group_paddings zeroed, partition_count = D, minus param_groups): the Adam step, the writer
    class, each group's flat layout, the rank files in rank order, the module weights (for the
    §11.7 check) and rank 0's parsed file.
    """

    step: float = 0.0
    writer: str = ""
    layouts: list[GroupLayout] = dataclasses.field(default_factory=list)
    rank_paths: list[str] = dataclasses.field(default_factory=list)
    module: Any = dataclasses.field(default=None, repr=False)
    first: RankState | None = dataclasses.field(default=None, repr=False)

    def stream(self, states: Sequence[str] = STATES
               ) -> Iterator[tuple[megatron_layout.MegatronTensor, dict[str, np.ndarray]]]:
        """Every parameter once, as soon as its last fragment is read: (tensor, {state: full
        Megatron value}); vocab tensors keep all V_pad rows. Checks the values (§11.7)."""
        by_name = {t.name: t for t in self.tensors}
        cursors = [0] * len(self.layouts)
        open_: list[dict[str, np.ndarray] | None] = [None] * len(self.layouts)
        for r, path in enumerate(self.rank_paths):
            rank = read_rank(path, r, self.layouts)  # checked again: the files may have changed
            same_as_rank0(rank, self.first)
            for g, lay in enumerate(self.layouts):
                lo, hi = r * lay.size, r * lay.size + lay.real(r)
                i = cursors[g]
                while i < len(lay.names) and lay.offsets[i] < hi:
                    start, end = lay.offsets[i], lay.offsets[i] + lay.numels[i]
                    a, b = max(start, lo), min(end, hi)
                    if start >= lo and end <= hi:
                        values = {k: rank.tensors[g][k][a - lo:b - lo] for k in states}
                    else:
                        if open_[g] is None:
                            open_[g] = {k: np.empty(lay.numels[i], np.float32) for k in states}
                        for k in states:
                            open_[g][k][a - start:b - start] = rank.tensors[g][k][a - lo:b - lo]
                        if end > hi:
                            break
                        values, open_[g] = open_[g], None
                    t = by_name[lay.names[i]]
                    yield t, self._checked(t, {k: v.reshape(lay.shapes[i])
                                               for k, v in values.items()}, path)
                    i += 1
                cursors[g] = i
            # This pass is done with the rank's pages: out of RSS (writes still pending on them
            # read them back from the page cache). One rank file is one memory map, so any of
            # its arrays releases it.
            pt_archive.release_pages(next(iter(rank.tensors[0].values())))
            del rank
        left = [lay.names[c] for lay, c in zip(self.layouts, cursors) if c < len(lay.names)]
        if left:
            raise ZeroCheckpointError(f"{self.folder}: parameters {left[:3]} were not complete "
                                      "after the last rank")

    def _checked(self, t: megatron_layout.MegatronTensor, values: dict[str, np.ndarray],
                 path: str) -> dict[str, np.ndarray]:
        """§11.7: finite values, exp_avg_sq >= 0, module weight == fp32 master cast to its dtype."""
        for k, v in values.items():
            # min and max propagate NaN and show an inf, in two fast passes with no temporary.
            low, high = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ZeroCheckpointError(f"{path}: {k} of {t.name} holds non-finite values")
            if k == "exp_avg_sq" and low < 0:
                raise ZeroCheckpointError(f"{path}: exp_avg_sq of {t.name} has negative values")
        w = _module_tensor(self.module, t.name) if self.module is not None else None
        if w is not None and "fp32" in values:
            master, module = values["fp32"].reshape(-1), np.ascontiguousarray(w).reshape(-1)
            bits = np.dtype(f"u{w.dtype.itemsize}")  # compare bit patterns, a word at a time
            step = 1 << 22  # in slices: the cast and the comparison stay a few MiB
            same = master.size == module.size and all(
                np.array_equal(master[i:i + step].astype(w.dtype).view(bits),
                               module[i:i + step].view(bits))
                for i in range(0, master.size, step))
            pt_archive.release_pages(w)  # the module weights are a model's worth: out of RSS
            if not same:
                raise ZeroCheckpointError(
                    f"{path}: the fp32 master of {t.name} cast to {w.dtype} differs from its "
                    "module weight in mp_rank_00_model_states.pt; the files come from different "
                    "saves")
        return values


def _param_shapes(states: Mapping[str, Any], where: str) -> list[dict[str, tuple[int, ...]]]:
    shapes = states.get("param_shapes")
    if not isinstance(shapes, (list, tuple)) or not shapes or not all(
            isinstance(g, Mapping) for g in shapes):
        raise ZeroCheckpointError(f"{where}: field 'param_shapes' is missing or not a list of "
                                  "per-group dicts")
    for key in ("frozen_param_shapes", "shared_params"):
        if states.get(key):
            raise ZeroCheckpointError(f"{where}: {key} is not empty (frozen or tied parameters); "
                                      "agpt-jax's Llama has neither")
    return [{str(k): tuple(int(x) for x in v) for k, v in g.items()} for g in shapes]


def _check_shapes(shapes: list[dict[str, tuple[int, ...]]],
                  tensors: list[megatron_layout.MegatronTensor],
                  where: str, against: str) -> None:
    want = {t.name: t.shape for t in tensors}
    have: dict[str, tuple[int, ...]] = {}
    for g in shapes:
        for name, shape in g.items():
            if name in have:
                raise ZeroCheckpointError(f"{where}: param_shapes names {name} twice")
            have[name] = shape
    for name, shape in want.items():
        if name not in have:
            raise ZeroCheckpointError(f"{where}: param_shapes has no {name} ({against} has it)")
        if have[name] != shape:
            raise ZeroCheckpointError(f"{where}: param_shapes disagree with {against}: {name} is "
                                      f"{list(have[name])}, {against} needs {list(shape)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ZeroCheckpointError(f"{where}: param_shapes has {extra[:3]}, which {against} does "
                                  "not have (biases? tied embeddings? another layer count?)")


@dataclasses.dataclass
class ModelStates:
    """mp_rank_00_model_states.pt, parsed: the file's dict, args, param_shapes, scheme, model."""

    states: Mapping[str, Any]
    args: dict[str, Any]
    shapes: list[dict[str, tuple[int, ...]]]
    scheme: megatron_layout.NameScheme
    config: GPTConfig


def read_model_states(folder: str, expected: GPTConfig | None = None) -> ModelStates:
    """mp_rank_00_model_states.pt and the model its args describe (checked against `expected`
    and against its param_shapes)."""
    path = os.path.join(folder, universal.MODEL_STATES)
    states = load_file(path)
    if not isinstance(states, Mapping):
        raise ZeroCheckpointError(f"{path}: expected a dict, found {type(states).__name__}")
    try:
        args = universal.model_states_args(states, path)
        info = states.get("universal_checkpoint_info")
        if not isinstance(info, Mapping):
            raise ZeroCheckpointError(f"{path}: field 'universal_checkpoint_info' is missing "
                                      "(written by Megatron-DeepSpeed's save_checkpoint)")
        config = universal.config_from_args(args, info, path)
    except universal.UniversalCheckpointError as e:
        raise ZeroCheckpointError(str(e)) from None
    shapes = _param_shapes(states, path)
    try:
        scheme = megatron_layout.detect_scheme([n for g in shapes for n in g], path)
    except ValueError as e:
        raise ZeroCheckpointError(str(e)) from None
    if expected is not None:
        _check_shapes(shapes, megatron_layout.megatron_tensors(expected, scheme), path,
                      "--model-config")
        diffs = universal.config_mismatches(expected, config)
        if diffs:
            raise ZeroCheckpointError(f"{path}: the given model config does not match the "
                                      "checkpoint's args: " + "; ".join(diffs))
    _check_shapes(shapes, megatron_layout.megatron_tensors(config, scheme), path,
                  "the model of its args")
    if not isinstance(states.get("iteration"), int):
        raise ZeroCheckpointError(f"{path}: field 'iteration' is missing")
    return ModelStates(states, args, shapes, scheme, config)


def open_zero(path: str, expected: GPTConfig | None = None) -> ZeroCheckpoint:
    """Open a ZeRO checkpoint and check every rank file (§11) without reading tensor data.

    Args:
        path: a `--load` root (its `latest` tag is followed) or a global_stepN folder.
        expected: a user-given model to check param_shapes and args against.

    Raises:
        ZeroCheckpointError: with the file and what is wrong.
    """
    folder = resolve_zero_dir(path)
    paths = rank_files(folder)
    ms = read_model_states(folder, expected)
    layouts = [group_layout(g, len(paths)) for g in ms.shapes]
    first = read_rank(paths[0], 0, layouts)
    paddings = [(0,) + x for x in first.paddings]  # (rank, group, group_paddings, S - real_r)
    for r, p in enumerate(paths[1:], 1):
        rank = read_rank(p, r, layouts)
        same_as_rank0(rank, first)
        paddings += [(r,) + x for x in rank.paddings]
        del rank
    for g in sorted({x[1] for x in paddings}):
        bad = [x for x in paddings if x[1] == g]
        logging.warning("%s: group %d: group_paddings disagree with S - real_r on %d rank(s), "
                        "e.g. rank %d: %d vs %d (DeepSpeed < 0.16.4 or BF16_Optimizer, spec "
                        "§10); ignored: real_r comes from param_shapes", folder, g, len(bad),
                        bad[-1][0], bad[-1][2], bad[-1][3])
    step = first.steps[0]
    global_steps = ms.states.get("global_steps")
    if isinstance(global_steps, int) and step != global_steps - (ms.states.get("skipped_steps")
                                                                  or 0):
        logging.warning("%s: Adam step %s, but global_steps - skipped_steps = %s", folder, step,
                        global_steps - (ms.states.get("skipped_steps") or 0))
    # What ds_to_universal writes to zero/optimizer_state.pt (spec §9.3), minus param_groups.
    opt = dict(first.optimizer_state, group_paddings=[0] * len(layouts),
               partition_count=[len(paths)] * len(layouts))
    logging.info("%s: %d DP ranks, %s, groups (N, S) %s", folder, len(paths), first.writer,
                 [(lay.n, lay.size) for lay in layouts])
    return ZeroCheckpoint(
        folder=folder, scheme=ms.scheme, config=ms.config, args=ms.args,
        iteration=ms.states["iteration"], checkpoint_version=ms.states.get("checkpoint_version"),
        universal_info=dict(ms.states["universal_checkpoint_info"]), optimizer_state=opt,
        param_groups=first.param_groups,
        tensors=megatron_layout.megatron_tensors(ms.config, ms.scheme),
        model_states_extra=universal.model_states_extra(ms.states), step=step, writer=first.writer,
        layouts=layouts, rank_paths=paths, module=ms.states.get("module"), first=first)
