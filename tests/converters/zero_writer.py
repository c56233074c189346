"""An independent writer of Megatron-DeepSpeed ZeRO stage-1 checkpoints, from the spec alone.

It follows spec/zero-shards.md §1-§5 and §9, not converters/: it takes the Megatron-named tensors of
universal_writer's fixture (fp32 master, exp_avg, exp_avg_sq, step), gives the vocabulary
tensors their padded rows (non-zero, as training leaves them), puts the matrices (weight decay) and
then the 1-D norm weights (no weight decay) into two groups in model order (§4), flattens each
group, pads it at the end to P = ceil(N / 2D) * 2D with a sentinel value (so a reader that keeps
padding fails), and stores each rank's partition the way one of three writers does (§5's table):

    zero        DeepSpeedZeroOptimizer >= 0.16.4: fp32 stripped to real_r, group_paddings S - real_r
    zero_old    DeepSpeedZeroOptimizer < 0.16.4: fp32 = t[:S - group_paddings] (a Python slice),
                group_paddings 0 except the last rank = P - N
    bf16_opt    BF16_Optimizer: fp32 of length S, group_paddings as zero_old, no zero_stage key

Files are written by converters/pt_archive (no torch), pickling DeepSpeed's fragment_address,
LossScaler and ZeroStageEnum and Megatron's ModelType from stand-in classes under their real
module names. `write_universal_copy` adds what ds_to_universal would write next to it (§9): the
tensors cut to the original vocabulary, zero/optimizer_state.pt from rank 0, the copied mp file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import os
import shutil
import sys
import types

import ml_dtypes
import numpy as np

from converters import pt_archive

WRITERS = ("zero", "zero_old", "bf16_opt")
SENTINEL = np.float32(12345.0)  # the flat padding; never part of a parameter


# ----------------------------------------------------------------------------------------------
# Stand-ins of the DeepSpeed and Megatron classes the files pickle.


@dataclasses.dataclass
class fragment_address:  # noqa: N801 - DeepSpeed's name
    numel: int
    start: int


class LossScaler:
    def __init__(self, scale: float) -> None:
        self.cur_scale = scale
        self.dynamic = False


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2


_CLASSES = {"deepspeed.utils.tensor_fragment": fragment_address,
            "deepspeed.runtime.fp16.loss_scaler": LossScaler,
            "deepspeed.runtime.zero.config": ZeroStageEnum,
            "megatron.core.enums": ModelType}
for _module, _cls in _CLASSES.items():
    _cls.__module__ = _module


def save(obj, path: str) -> None:
    """pt_archive.save with fake deepspeed / megatron modules in sys.modules while pickling."""
    names = sorted({".".join(m.split(".")[:i + 1]) for m in _CLASSES
                    for i in range(len(m.split(".")))})
    assert not set(names) & set(sys.modules), "a real deepspeed or megatron is imported"
    fakes = {n: types.ModuleType(n) for n in names}
    for module, cls in _CLASSES.items():
        setattr(fakes[module], cls.__name__, cls)
    sys.modules.update(fakes)
    try:
        pt_archive.save(obj, path)
    finally:
        for n in names:
            del sys.modules[n]


TORCH_BF16 = pt_archive._Global("torch", "bfloat16")  # args.params_dtype, pickled by name
TORCH_FP32 = pt_archive._Global("torch", "float32")


# ----------------------------------------------------------------------------------------------
# The flat layout, by the rule of spec §5.


def partition(flat: np.ndarray, dp: int) -> tuple[list[np.ndarray], int, int]:
    """The D padded partitions of one group's flat state, and N, S."""
    n = flat.size
    align = 2 * dp
    padded = -(-n // align) * align
    size = padded // dp
    full = np.concatenate([flat, np.full(padded - n, SENTINEL, np.float32)])
    return [full[r * size:(r + 1) * size] for r in range(dp)], n, size


def group_names(megatron: dict) -> list[list[str]]:
    """Megatron's get_param_groups at TP=1: matrices (weight decay), then 1-D (none); model order."""
    return [[n for n, w in megatron.items() if w.ndim > 1],
            [n for n, w in megatron.items() if w.ndim == 1]]


def _param_groups() -> list[dict]:
    common = {"lr": 1.9e-4, "betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": False,
              "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
              "fused": None, "lr_mult": 1.0}
    return [dict(common, weight_decay=0.1, name="wd_no_scale_lr", wd_mult=1.0, params=[0]),
            dict(common, weight_decay=0.0, name="no_wd_no_scale_lr", wd_mult=0.0, params=[1])]


# ----------------------------------------------------------------------------------------------
# The checkpoint.


def padded_tensors(uw, seed: int) -> dict:
    """universal_writer's fixture tensors with V_pad vocabulary rows (random padded rows)."""
    fx = uw.fixture_tensors(seed)
    rng = np.random.default_rng(seed + 100)
    out = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "fixture": fx}
    for name, w in fx["megatron"].items():
        m, v = fx["moments"][name]
        values = {"fp32": w, "exp_avg": m, "exp_avg_sq": v}
        if w.shape[0] == uw.V and w.ndim == 2:  # word_embeddings / output_layer
            extra = rng.standard_normal((3, uw.VPAD - uw.V, w.shape[1])).astype(np.float32)
            values = {"fp32": np.concatenate([w, extra[0]]),
                      "exp_avg": np.concatenate([m, extra[1] * 1e-3]),
                      "exp_avg_sq": np.concatenate([v, (extra[2] * 1e-3) ** 2])}
        for k, x in values.items():
            out[k][name] = x
    return out


def write_zero_checkpoint(root: str, uw, dp: int, writer: str = "zero", dtype: str = "fp32",
                          seed: int = 0, mutate=None) -> dict:
    """Write `root/latest` and `root/global_step<ITERATION>/` as a DP=`dp` ZeRO-1 save.

    Args:
        uw: universal_writer or a `universal_writer.with_shape(...)` copy (the model shape).
        writer: one of WRITERS.
        dtype: "fp32" or "bf16" (file prefix bf16_, module weights bf16).
        mutate: optional mutate(rank, top_level_dict) called before each rank file is written.

    Returns:
        folder, tensors (padded_tensors), groups (names), sizes [(N, S)], rank0 (its dict).
    """
    assert writer in WRITERS and dtype in ("fp32", "bf16")
    tag = f"global_step{uw.ITERATION}"
    folder = os.path.join(root, tag)
    os.makedirs(folder)
    tensors = padded_tensors(uw, seed)
    master = tensors["fp32"]
    groups = group_names(master)
    parts = {k: [] for k in ("fp32", "exp_avg", "exp_avg_sq")}
    sizes = []
    for names in groups:
        for k in parts:
            p, n, s = partition(np.concatenate([tensors[k][x].ravel() for x in names]), dp)
            parts[k].append(p)
        sizes.append((n, s))
    ds_config = {"train_batch_size": 2 * dp, "train_micro_batch_size_per_gpu": 2,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
                 "bf16": {"enabled": dtype == "bf16"}}
    version = "0.16.3" if writer == "zero_old" else "0.16.9"
    prefix = "bf16_" if dtype == "bf16" else ""
    rank0 = None
    for r in range(dp):
        fp32, paddings, mappings, state = [], [], [], {}
        for g, names in enumerate(groups):
            n, s = sizes[g]
            real = min(max(n - r * s, 0), s)
            t = parts["fp32"][g][r]
            last_pad = (s * dp - n) if r == dp - 1 else 0
            if writer == "zero":
                fp32.append(t[:real].copy())
                paddings.append(s - real)
            else:
                fp32.append(t[:s - last_pad].copy() if writer == "zero_old" else t.copy())
                paddings.append(last_pad)
            mapping = collections.OrderedDict()
            offset = 0
            for name in names:
                numel = master[name].size
                lo, hi = max(offset, r * s), min(offset + numel, r * s + real)
                if hi > lo:
                    mapping[name] = fragment_address(numel=hi - lo, start=lo - r * s)
                offset += numel
            mappings.append(mapping)
            state[g] = {"step": np.array(uw.STEP, np.float32),
                        "exp_avg": parts["exp_avg"][g][r].copy(),
                        "exp_avg_sq": parts["exp_avg_sq"][g][r].copy()}
        base = {"state": state, "param_groups": _param_groups()}
        if writer == "bf16_opt":
            osd = {"clip_grad": 1.0, "base_optimizer_state": base,
                   "single_partition_of_fp32_groups": fp32, "group_paddings": paddings,
                   "partition_count": [dp, dp], "ds_version": version,
                   "param_slice_mappings": mappings}
        else:
            osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False,
                   "overflow": False, "clip_grad": 1.0, "base_optimizer_state": base,
                   "single_partition_of_fp32_groups": fp32,
                   "zero_stage": ZeroStageEnum.optimizer_states, "group_paddings": paddings,
                   "partition_count": [dp, dp], "ds_version": version,
                   "param_slice_mappings": mappings}
        top = {"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": version}
        if mutate is not None:
            mutate(r, top)
        rank0 = top if r == 0 else rank0
        save(top, os.path.join(folder, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    _write_model_states(folder, uw, master, groups, dp, dtype, ds_config, version)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(tag)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(uw.ITERATION))
    return {"folder": folder, "tensors": tensors, "groups": groups, "sizes": sizes,
            "rank0": rank0, "dp": dp}


def _write_model_states(folder, uw, master, groups, dp, dtype, ds_config, version) -> None:
    cast = (lambda w: w.astype(ml_dtypes.bfloat16)) if dtype == "bf16" else (lambda w: w.copy())
    encoder = {n[len("language_model.encoder."):]: cast(w) for n, w in master.items()
               if n.startswith("language_model.encoder.")}
    module = {"language_model": {
        "embedding": {"word_embeddings": {
            "weight": cast(master["language_model.embedding.word_embeddings.weight"])}},
        "encoder": encoder,
        "output_layer": {"weight": cast(master["language_model.output_layer.weight"])}}}
    args = argparse.Namespace(
        num_layers=uw.L, hidden_size=uw.H, num_attention_heads=uw.NQ,
        num_key_value_heads=uw.NKV, ffn_hidden_size=uw.F, seq_length=uw.SEQ,
        max_position_embeddings=uw.SEQ, rope_theta=uw.THETA, layernorm_epsilon=uw.EPS,
        make_vocab_size_divisible_by=16, padded_vocab_size=uw.VPAD,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, swiglu=True,
        normalization="rmsnorm", untie_embeddings_and_output_weights=True,
        add_bias_linear=False, model_type=ModelType.encoder_or_decoder,
        params_dtype=TORCH_BF16 if dtype == "bf16" else TORCH_FP32, bf16=dtype == "bf16",
        save="/lus/flare/projects/run/checkpoints", lr=2e-4, min_lr=2e-5, seed=1234,
        deepspeed=True, zero_stage=1, data_parallel_size=dp, init_method_std=0.02)
    states = {
        "module": module, "buffer_names": ["language_model.rotary_pos_emb.inv_freq"],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict(
            (n, pt_archive.TorchSize(master[n].shape)) for n in names) for names in groups],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
        "lr_scheduler": {"max_lr": 2e-4, "num_steps": 160, "lr_decay_style": "cosine"},
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
        "skipped_steps": 0, "global_steps": uw.ITERATION, "global_samples": 160,
        "dp_world_size": dp, "mp_world_size": 1, "ds_config": ds_config, "ds_version": version,
        "args": args, "checkpoint_version": 3.0, "iteration": uw.ITERATION, "tokens": 5120,
        "rng_state": [{"random_rng_state": (3, (1, 2, 3), None)}],
        "universal_checkpoint_info": {
            "universal_checkpoint_version": 0.2, "original_vocab_size": uw.V,
            "padded_vocab_size": uw.VPAD,
            "vocabulary_parameter_patterns": ["word_embeddings.weight", "output_layer.weight"],
            "parameter_with_2_sub_params_cat_dim_0": ["mlp.dense_h_to_4h.weight"]},
    }
    save(states, os.path.join(folder, "mp_rank_00_model_states.pt"))


def write_universal_copy(root: str, uw, written: dict, tensors_from: str | None = None) -> str:
    """What ds_to_universal (upstream, strip_tensor_paddings on) writes next to the ZeRO save:
    `root/global_stepN_universal/` and `root/latest_universal` (spec §9).

    Args:
        written: write_zero_checkpoint's result.
        tensors_from: a universal folder whose zero/<name>/ tensor files to copy instead of
            writing them (the committed fixture, written by universal_writer with torch).
    """
    tag = f"global_step{uw.ITERATION}_universal"
    folder = os.path.join(root, tag)
    zero = os.path.join(folder, "zero")
    os.makedirs(zero)
    fx = written["tensors"]["fixture"]
    for name, w in fx["megatron"].items():
        pdir = os.path.join(zero, name)
        if tensors_from is not None:
            shutil.copytree(os.path.join(tensors_from, "zero", name), pdir)
            continue
        os.makedirs(pdir)
        m, v = fx["moments"][name]
        for state, value in (("fp32", w), ("exp_avg", m), ("exp_avg_sq", v)):
            d = {"param": value, "cat_dim": 0}
            if "dense_h_to_4h" in name:
                d["param_n_sub_params"] = 2
            if value.shape[0] == uw.V and value.ndim == 2:
                d["vocab_tensor"] = True
            save(d, os.path.join(pdir, f"{state}.pt"))
        save(np.array(uw.STEP, np.float32), os.path.join(pdir, "step.pt"))
    osd = written["rank0"]["optimizer_state_dict"]
    out = {k: v for k, v in osd.items() if k not in (
        "base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")}
    groups = len(osd["group_paddings"])
    out["group_paddings"] = [0] * groups
    out["partition_count"] = [written["dp"]] * groups
    out["param_groups"] = osd["base_optimizer_state"]["param_groups"]
    save(out, os.path.join(zero, "optimizer_state.pt"))
    shutil.copyfile(os.path.join(written["folder"], "mp_rank_00_model_states.pt"),
                    os.path.join(folder, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest_universal"), "w") as f:
        f.write(tag)
    return folder
