"""The files of a DeepSpeed ZeRO stage-1 tag folder: names, the flat layout, one rank's file.

spec/zero-shards.md §1 (file names: `mp_rank_XX_model_states.pt`, one
`{bf16_,}zero_pp_rank_R_mp_rank_XX_optim_states.pt` per DP rank R, sorted numerically), §3 (the
two writer classes, told apart by their keys), §5 (each group's flat space: N real elements,
A = 2D, P = ceil(N/A)*A, S = P/D, real_r = clamp(N - r*S, 0, S)) and the per-rank checks of §11.
converters/zero.py opens a whole checkpoint from these pieces.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from converters import pt_archive
from converters import universal

LATEST = "latest"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
MODEL_STATES_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_RE = re.compile(r"^(bf16_|fp16_|)zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
LAYER_RE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")
ZERO3_MODEL_RE = re.compile(r"^(bf16_|fp16_|)zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")

WRITER_ZERO, WRITER_BF16 = "DeepSpeedZeroOptimizer", "BF16_Optimizer"
#: The per-rank keys ds_to_universal leaves out of zero/optimizer_state.pt (spec §9.3).
SHARDED_KEYS = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
_REQUIRED = SHARDED_KEYS + ("partition_count", "group_paddings")


class ZeroCheckpointError(ValueError):
    """A ZeRO checkpoint is missing, malformed, unsupported or does not match the model."""


def load_file(path: str) -> Any:
    """A DeepSpeed / Megatron .pt file, tensors memory-mapped, foreign classes as records."""
    if not os.path.isfile(path):
        raise ZeroCheckpointError(f"{path}: missing")
    try:
        return pt_archive.load(path, foreign="record")
    except pt_archive.PtArchiveError as e:
        raise ZeroCheckpointError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Locating the tag folder and its files.


def resolve_zero_dir(path: str) -> str:
    """The `global_stepN` folder of a `--load` root (its `latest` tag) or the folder itself."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ZeroCheckpointError(f"{path}: no such directory")
    tag_file = os.path.join(path, LATEST)
    if os.path.isfile(tag_file) and not _has_optim_files(path):
        with open(tag_file) as f:
            tag = f.read().strip()
        folder = os.path.join(path, tag)
        if not tag or not os.path.isdir(folder):
            raise ZeroCheckpointError(f"{tag_file}: names {tag!r}, but {folder} does not exist; "
                                      "point --load at the global_stepN folder or fix the tag")
        path = folder
    if not _has_optim_files(path):
        raise ZeroCheckpointError(
            f"{path}: not a DeepSpeed ZeRO checkpoint: no *zero_pp_rank_*_optim_states.pt files "
            f"(and no {LATEST} tag naming a folder that has them)")
    return path


def _has_optim_files(folder: str) -> bool:
    return any(OPTIM_RE.match(n) for n in os.listdir(folder))


def is_zero_dir(path: str) -> bool:
    """Whether `path` is a ZeRO save root (`latest` naming a tag folder with rank files) or a
    tag folder itself; reads names only."""
    try:
        resolve_zero_dir(path)
    except (ZeroCheckpointError, OSError):
        return False
    return True


def rank_files(folder: str) -> list[str]:
    """The optimizer files of DP ranks 0..D-1, in rank order (checks §11.1; refuses TP/PP>1)."""
    names = sorted(os.listdir(folder))
    if any(LAYER_RE.match(n) for n in names):
        raise ZeroCheckpointError(f"{folder}: layer_*-model_*-model_states.pt files: a pipeline "
                                  "engine checkpoint (PP > 1) is not supported; convert it with "
                                  "ds_to_universal.py and load the universal checkpoint")
    if any(ZERO3_MODEL_RE.match(n) for n in names):
        raise ZeroCheckpointError(f"{folder}: zero_pp_rank_*_model_states.pt files: a ZeRO "
                                  "stage 3 checkpoint is not supported (stage 1 and 2 are)")
    models = sorted(int(m.group(1)) for n in names if (m := MODEL_STATES_RE.match(n)))
    if models != [0]:
        raise ZeroCheckpointError(
            f"{folder}: model-states files of mp ranks {models or 'none'}; only one "
            "(mp_rank_00_model_states.pt, TP = PP = 1) is supported: convert TP/PP > 1 "
            "checkpoints with ds_to_universal.py and load the universal checkpoint")
    found = [(m.group(1), int(m.group(2)), int(m.group(3)), n)
             for n in names if (m := OPTIM_RE.match(n))]
    prefixes = sorted({p for p, _, _, _ in found})
    if len(prefixes) != 1:
        raise ZeroCheckpointError(f"{folder}: optimizer files with several prefixes {prefixes}; "
                                  "one save writes one kind: remove the stray files")
    if any(mp != 0 for _, _, mp, _ in found):
        raise ZeroCheckpointError(f"{folder}: optimizer files of mp ranks > 0 (TP > 1) are not "
                                  "supported; convert with ds_to_universal.py")
    by_rank: dict[int, list[str]] = {}
    for _, dp, _, n in found:
        by_rank.setdefault(dp, []).append(n)
    dups = {r: v for r, v in by_rank.items() if len(v) > 1}
    if dups:
        raise ZeroCheckpointError(f"{folder}: DP rank(s) {sorted(dups)} have several files: "
                                  f"{sorted(dups.items())[0][1]}")
    d = max(by_rank) + 1
    missing = sorted(set(range(d)) - set(by_rank))
    if missing:
        raise ZeroCheckpointError(
            f"{folder}: DP rank file(s) {missing} missing (found {len(by_rank)} of ranks "
            f"0..{d - 1}, e.g. {prefixes[0]}zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt)"
            "; copy the whole tag folder")
    return [os.path.join(folder, by_rank[r][0]) for r in range(d)]


# ----------------------------------------------------------------------------------------------
# The flat layout of one group (spec §5).


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """One param group's flat space: names and shapes in param_shapes order, N, D, P, S."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    n: int
    d: int

    @property
    def padded(self) -> int:  # P
        return math.ceil(self.n / (2 * self.d)) * 2 * self.d

    @property
    def size(self) -> int:  # S
        return self.padded // self.d

    def real(self, r: int) -> int:
        return min(max(self.n - r * self.size, 0), self.size)

    def fragments(self, r: int) -> list[tuple[str, int, int]]:
        """(name, start in rank r's partition, numel) of every parameter overlapping it."""
        lo = r * self.size
        hi = lo + self.real(r)
        out = []
        for name, off, numel in zip(self.names, self.offsets, self.numels):
            a, b = max(off, lo), min(off + numel, hi)
            if a < b:
                out.append((name, a - lo, b - a))
        return out


def group_layout(shapes: Mapping[str, Sequence[int]], d: int) -> GroupLayout:
    names = tuple(shapes)
    dims = tuple(tuple(int(x) for x in shapes[k]) for k in names)
    numels = tuple(math.prod(s) for s in dims)
    offsets = tuple(int(x) for x in np.cumsum((0,) + numels[:-1]))
    return GroupLayout(names, dims, offsets, numels, sum(numels), d)


# ----------------------------------------------------------------------------------------------
# One rank's optimizer file.


@dataclasses.dataclass
class RankState:
    """What one rank file holds, checked against the layouts (§11.2-11.6)."""

    path: str
    writer: str
    zero_stage: int | None
    steps: list[float]
    tensors: list[dict[str, np.ndarray]]  # per group: state -> the rank's first real_r elements
    param_groups: list[dict[str, Any]]
    optimizer_state: dict[str, Any]  # optimizer_state_dict minus SHARDED_KEYS
    top: dict[str, Any]  # ds_config, ds_version
    paddings: list[tuple[int, int, int]]  # (group, group_paddings, S - real_r) where they differ


def _fragment(obj: Any, where: str) -> tuple[int, int]:
    state = obj.state if isinstance(obj, pt_archive.PickledObject) else obj
    if isinstance(state, Mapping) and "start" in state and "numel" in state:
        return int(state["start"]), int(state["numel"])
    if hasattr(obj, "start") and hasattr(obj, "numel"):
        return int(obj.start), int(obj.numel)
    raise ZeroCheckpointError(f"{where}: expected a fragment_address(start, numel), found {obj!r}")


def _enum_value(value: Any) -> Any:
    if isinstance(value, pt_archive.PickledObject) and len(value.args) == 1:
        return value.args[0]
    return value


def read_rank(path: str, r: int, layouts: list[GroupLayout]) -> RankState:
    """Load and check rank r's file against the group layouts; tensors stay memory-mapped."""
    top = load_file(path)
    osd = top.get("optimizer_state_dict") if isinstance(top, Mapping) else None
    if not isinstance(osd, Mapping):
        raise ZeroCheckpointError(f"{path}: no 'optimizer_state_dict'; not a DeepSpeed ZeRO "
                                  "optimizer file")
    for key in _REQUIRED:
        if key not in osd:
            raise ZeroCheckpointError(f"{path}: optimizer_state_dict has no {key!r}")
    writer = WRITER_ZERO if ("zero_stage" in osd or "loss_scaler" in osd) else WRITER_BF16
    stage = _enum_value(osd.get("zero_stage"))
    if stage is not None and stage not in (1, 2):
        raise ZeroCheckpointError(f"{path}: zero_stage {stage}: only ZeRO stages 1 and 2 are "
                                  "supported")
    base = osd["base_optimizer_state"]
    if not isinstance(base, Mapping) or "state" not in base or "param_groups" not in base:
        raise ZeroCheckpointError(
            f"{path}: base_optimizer_state is {type(base).__name__}, not the dict of a torch "
            "optimizer: an elastic checkpoint (zero_optimization.elastic_checkpoint), which is "
            "not supported; save without elastic_checkpoint")
    groups = list(base["param_groups"])
    g_count = len(layouts)
    counts = {"param_shapes": g_count, "base_optimizer_state.state": len(base["state"]),
              "param_groups": len(groups), **{k: len(osd[k]) for k in (
                  "single_partition_of_fp32_groups", "param_slice_mappings", "group_paddings")}}
    pc = osd["partition_count"]
    pcs = list(pc) if isinstance(pc, (list, tuple)) else [pc] * g_count
    counts["partition_count"] = len(pcs)
    if len(set(counts.values())) != 1:
        raise ZeroCheckpointError(f"{path}: the group counts disagree: {counts}")
    d = layouts[0].d
    if any(int(p) != d for p in pcs):
        raise ZeroCheckpointError(
            f"{path}: partition_count {pcs}, but the folder has {d} DP rank files (0..{d - 1}); "
            "rank files are missing or come from another save")
    steps, tensors, paddings = [], [], []
    for g, lay in enumerate(layouts):
        where = f"{path}: group {g}"
        pid = groups[g].get("params", [g])[0] if isinstance(groups[g], Mapping) else g
        st = base["state"].get(pid)
        if not isinstance(st, Mapping) or "step" not in st:
            raise ZeroCheckpointError(f"{where}: no Adam step (the optimizer never stepped?)")
        steps.append(float(np.asarray(st["step"]).reshape(())))
        arrays = {"fp32": osd["single_partition_of_fp32_groups"][g],
                  "exp_avg": st.get("exp_avg"), "exp_avg_sq": st.get("exp_avg_sq")}
        real, size = lay.real(r), lay.size
        for k, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.float32:
                raise ZeroCheckpointError(f"{where}: {k} is not a 1-D float32 tensor")
            if k != "fp32" and a.size != size:
                raise ZeroCheckpointError(
                    f"{where}: {k} has {a.size} elements, the partition size S={size} follows "
                    f"from param_shapes (N={lay.n}, D={d}); the file is from another model or "
                    "DP size")
        if arrays["fp32"].size < real:
            raise ZeroCheckpointError(
                f"{where}: the fp32 partition has {arrays['fp32'].size} elements, fewer than "
                f"the {real} real elements rank {r} owns (N={lay.n}, D={d}, S={size})")
        if int(osd["group_paddings"][g]) != size - real:
            paddings.append((g, int(osd["group_paddings"][g]), size - real))
        mapping = [(str(name), *_fragment(f, f"{where}: {name}"))
                   for name, f in osd["param_slice_mappings"][g].items()]
        want = lay.fragments(r)
        if mapping != want:
            bad = next((i for i, (a, b) in enumerate(zip(mapping, want)) if a != b),
                       min(len(mapping), len(want)))
            got_s = mapping[bad] if bad < len(mapping) else "nothing"
            want_s = want[bad] if bad < len(want) else "nothing"
            raise ZeroCheckpointError(
                f"{where}: param_slice_mappings disagree with the param_shapes walk at fragment "
                f"{bad}: (name, start, numel) {got_s} in the file, {want_s} expected")
        tensors.append({k: a[:real] for k, a in arrays.items()})
    return RankState(
        path=path, writer=writer, zero_stage=stage, steps=steps, tensors=tensors,
        param_groups=[dict(g) for g in groups],
        optimizer_state={k: v for k, v in osd.items() if k not in SHARDED_KEYS},
        top={k: v for k, v in top.items() if k != "optimizer_state_dict"}, paddings=paddings)


def same_as_rank0(rank: RankState, first: RankState) -> None:
    """§11.2 and §11.6: every rank agrees with rank 0 on what is not sharded."""
    checks = [("the optimizer class", rank.writer, first.writer),
              ("zero_stage", rank.zero_stage, first.zero_stage),
              ("ds_version", rank.top.get("ds_version"), first.top.get("ds_version")),
              ("ds_config", universal.to_jsonable(rank.top.get("ds_config")),
               universal.to_jsonable(first.top.get("ds_config"))),
              ("param_groups", universal.to_jsonable(rank.param_groups),
               universal.to_jsonable(first.param_groups))]
    for what, a, b in checks:
        if a != b:
            raise ZeroCheckpointError(f"{rank.path}: {what} differs from rank 0's ({a!r} vs "
                                      f"{b!r} in {first.path}); the rank files come from "
                                      "different saves")
    if set(rank.steps) != {first.steps[0]}:
        raise ZeroCheckpointError(
            f"{rank.path}: Adam step {sorted(set(rank.steps))}, but rank 0 has "
            f"{first.steps[0]} ({first.path}); the rank files come from different saves")
