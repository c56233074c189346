"""Read DeepSpeed universal checkpoints (ds_to_universal.py output) without megatron or deepspeed.

Layout (spec §3.5):

    <root>/latest_universal                         text: "global_stepN_universal"
    <root>/global_stepN_universal/mp_rank_00_model_states.pt   args, iteration, checkpoint_version,
                                                    universal_checkpoint_info, module, ...
    <root>/global_stepN_universal/zero/optimizer_state.pt      param_groups, loss scaler, ...
    <root>/global_stepN_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt
        {'param': fp32 tensor, 'cat_dim': 0|1, ['param_n_sub_params': 2], ['vocab_tensor': True]}
    <root>/global_stepN_universal/zero/<param>/step.pt         a bare (0-d float32) tensor

Every file is read without torch by `converters.pt_archive`: tensors become memory-mapped numpy
arrays. Tensor files may hold only tensors and containers. The two files that pickle Megatron and
DeepSpeed objects (an argparse Namespace holding Megatron enums, DeepSpeed loss scalers) keep
those objects as inert `PickledObject` records; any other global is refused, so no pickled code
ever runs.

Over 400 lines on purpose: one format, DeepSpeed's universal checkpoint, read and checked field
by field with the file, the field and the fix in every error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from absl import logging

from agpt_jax.model import GPTConfig, vocab_size_with_padding
from converters import megatron_layout
from converters import pt_archive
from converters.pt_archive import PickledObject, TorchDtype

LATEST_UNIVERSAL = "latest_universal"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO = "zero"
OPTIMIZER_STATE = "optimizer_state.pt"
STATE_FILES = ("fp32", "exp_avg", "exp_avg_sq")


class UniversalCheckpointError(ValueError):
    """A universal checkpoint is missing, malformed or does not match the expected model."""


# ----------------------------------------------------------------------------------------------
# Reading .pt files (without torch: converters/pt_archive.py).


def load_restricted(path: str) -> Any:
    """Loads a file that pickles Megatron or DeepSpeed objects, without importing or running them.

    Tensors come back as read-only numpy arrays (memory-mapped), argparse Namespaces as
    Namespaces, Megatron and DeepSpeed classes as inert :class:`PickledObject` records; any other
    global is refused.
    """
    _check_file(path)
    try:
        return pt_archive.load(path, foreign="record")
    except pt_archive.PtArchiveError as e:
        raise UniversalCheckpointError(f"{e}; or re-run ds_to_universal.py") from None


def load_tensor_file(path: str) -> Any:
    """Loads a tensor file (fp32.pt, exp_avg.pt, step.pt...): tensors and containers only."""
    _check_file(path)
    try:
        return pt_archive.load(path, foreign="refuse")
    except pt_archive.PtArchiveError as e:
        raise UniversalCheckpointError(
            f"{e}; a DeepSpeed universal tensor file holds only tensors: copy it again or re-run "
            "ds_to_universal.py") from None


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UniversalCheckpointError(f"{path}: missing")


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy of a pickled value (enums and foreign objects by name, tensors by shape)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, PickledObject):
        out: dict[str, Any] = {"pickled_class": value.pickled_class}
        if value.args:
            out["args"] = to_jsonable(list(value.args))
        if value.state is not None:
            out["state"] = to_jsonable(value.state)
        return out
    if isinstance(value, argparse.Namespace):
        return {k: to_jsonable(v) for k, v in sorted(vars(value).items())}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, TorchDtype):
        return str(value)
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return to_jsonable(value.reshape(()).item())
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    return repr(value)


# ----------------------------------------------------------------------------------------------
# Locating the checkpoint.


def resolve_universal_dir(path: str) -> str:
    """The `global_stepN_universal` folder for a `--load` root or the folder itself.

    Megatron reads `<load>/latest_universal` for the tag when `--universal-checkpoint` is given
    and fails when it is missing (spec §2.6); the same here.

    Raises:
        UniversalCheckpointError: not a universal checkpoint, with what it looks like instead.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UniversalCheckpointError(f"{path}: no such directory")
    tag_file = os.path.join(path, LATEST_UNIVERSAL)
    if os.path.isfile(tag_file):
        with open(tag_file) as f:
            tag = f.read().strip()
        folder = os.path.join(path, tag)
        if not tag or not os.path.isdir(folder):
            raise UniversalCheckpointError(
                f"{tag_file}: names {tag!r}, but {folder} does not exist; point --load at the "
                "global_stepN_universal folder or fix the tag")
        return _check_universal_folder(folder)
    if os.path.isdir(os.path.join(path, ZERO)) or os.path.isfile(os.path.join(path, MODEL_STATES)):
        return _check_universal_folder(path)
    if os.path.isfile(os.path.join(path, "latest")) or any(
            n.endswith("_optim_states.pt") for n in os.listdir(path)) or any(
            re.fullmatch(r"global_step\d+", n) for n in os.listdir(path)):
        raise UniversalCheckpointError(
            f"{path}: a ZeRO (non-universal) DeepSpeed checkpoint, not a universal one; convert "
            "it with `python -m converters.zero_to_orbax --load <root> --save DIR` (TP = PP = 1) "
            "or first with `python ds_to_universal.py --input_folder <root>/global_stepN "
            "--output_folder <root>/global_stepN_universal`")
    raise UniversalCheckpointError(
        f"{path}: not a universal checkpoint: expected a {LATEST_UNIVERSAL} tag file or a "
        f"global_stepN_universal folder holding {ZERO}/ and {MODEL_STATES}")


def _check_universal_folder(folder: str) -> str:
    for needed in (os.path.join(folder, ZERO), os.path.join(folder, ZERO, OPTIMIZER_STATE),
                   os.path.join(folder, MODEL_STATES)):
        if not os.path.exists(needed):
            raise UniversalCheckpointError(
                f"{needed}: missing, so {folder} is not a complete universal checkpoint "
                "(ds_to_universal.py writes zero/, zero/optimizer_state.pt and copies "
                f"{MODEL_STATES})")
    return folder


# ----------------------------------------------------------------------------------------------
# Model config from Megatron args.


def _arg(args: Mapping[str, Any], name: str, where: str, default: Any = None) -> Any:
    value = args.get(name, default)
    if value is None:
        raise UniversalCheckpointError(f"{where}: args has no {name!r}; cannot tell the model "
                                       "shape (is this a Megatron GPT checkpoint?)")
    return value


def config_from_args(args: Mapping[str, Any], info: Mapping[str, Any], where: str) -> GPTConfig:
    """The GPTConfig a Megatron run's args describe.

    Args:
        args: `vars(state['args'])` of mp_rank_00_model_states.pt.
        info: its `universal_checkpoint_info` (original and padded vocab sizes).
        where: file path for messages.

    Raises:
        UniversalCheckpointError: a field is missing or the model is not Llama-style.
    """
    problems = []
    for name, want in (("swiglu", True), ("normalization", "rmsnorm"),
                       ("untie_embeddings_and_output_weights", True), ("add_bias_linear", False)):
        if name in args and args[name] is not None and args[name] != want:
            problems.append(f"{name}={args[name]!r} (agpt-jax needs {want!r})")
    if problems:
        raise UniversalCheckpointError(f"{where}: not a Llama-style model: " + "; ".join(problems))
    heads = int(_arg(args, "num_attention_heads", where))
    kv = args.get("num_key_value_heads") or heads
    vocab = info.get("original_vocab_size")
    if vocab is None:
        raise UniversalCheckpointError(f"{where}: universal_checkpoint_info has no "
                                       "original_vocab_size; was it written by ds_to_universal?")
    theta = args.get("rope_theta")
    if theta is None:
        # Megatron-DeepSpeed's arguments.py default before the flag existed (spec §1.5).
        logging.warning("%s: args has no rope_theta; using Megatron's default 10000", where)
        theta = 10000.0
    divisible = int(args.get("make_vocab_size_divisible_by") or 128)
    tp = int(args.get("tensor_model_parallel_size") or 1)
    cfg = GPTConfig(
        num_layers=int(_arg(args, "num_layers", where)),
        hidden_size=int(_arg(args, "hidden_size", where)),
        num_heads=heads,
        num_kv_heads=int(kv),
        ffn_hidden_size=int(_arg(args, "ffn_hidden_size", where)),
        vocab_size=int(vocab),
        seq_length=int(args.get("seq_length") or _arg(args, "max_position_embeddings", where)),
        make_vocab_size_divisible_by=divisible,
        tensor_parallel_for_padding=tp,
        rope_theta=float(theta),
        norm_eps=float(args.get("layernorm_epsilon") or 1e-5),
        init_std=float(args.get("init_method_std") or 0.02),
    )
    padded = info.get("padded_vocab_size", args.get("padded_vocab_size"))
    if padded is not None and int(padded) != cfg.padded_vocab_size:
        raise UniversalCheckpointError(
            f"{where}: padded_vocab_size={padded}, but vocab {vocab} padded to a multiple of "
            f"make_vocab_size_divisible_by={divisible} x TP={tp} is "
            f"{vocab_size_with_padding(int(vocab), divisible, tp)}")
    return cfg


SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
                "vocab_size", "padded_vocab_size", "seq_length", "rope_theta", "norm_eps")


def config_mismatches(given: GPTConfig, found: GPTConfig) -> list[str]:
    """Every model field on which a user-given config disagrees with the checkpoint's."""
    out = []
    for name in SHAPE_FIELDS:
        a, b = getattr(given, name), getattr(found, name)
        if a != b:
            out.append(f"{name}: given {a}, checkpoint {b}")
    return out


# ----------------------------------------------------------------------------------------------
# The checkpoint.


@dataclasses.dataclass
class SourceCheckpoint:
    """What a DeepSpeed checkpoint (universal or ZeRO) holds besides its tensors: what the
    converters' metadata (universal_to_orbax.build_metadata) is made of.

    Attributes:
        folder: the global_stepN_universal (or ZeRO global_stepN) folder.
        scheme: the parameter naming scheme.
        config: the model config from args.
        args: the Megatron args (Namespace contents; foreign objects as PickledObject).
        iteration: the Megatron iteration saved.
        checkpoint_version: Megatron's checkpoint_version (3.0).
        universal_info: universal_checkpoint_info.
        optimizer_state: zero/optimizer_state.pt minus param_groups (for a ZeRO checkpoint: what
            ds_to_universal would write there).
        param_groups: the optimizer's param groups (lr, betas, eps, weight_decay, ...).
        tensors: every Megatron parameter expected, in named_parameters() order.
        model_states_extra: other top-level keys of mp_rank_00_model_states.pt (JSON-safe).
    """

    folder: str
    scheme: megatron_layout.NameScheme
    config: GPTConfig
    args: dict[str, Any]
    iteration: int
    checkpoint_version: Any
    universal_info: dict[str, Any]
    optimizer_state: dict[str, Any]
    param_groups: list[dict[str, Any]]
    tensors: list[megatron_layout.MegatronTensor]
    model_states_extra: dict[str, Any]


@dataclasses.dataclass
class UniversalCheckpoint(SourceCheckpoint):
    """An opened universal checkpoint: everything but the tensors, which are read on demand."""

    def param_dir(self, name: str) -> str:
        return os.path.join(self.folder, ZERO, name)

    def read_step(self) -> float:
        """The Adam step: every parameter's step.pt must hold the same value (DeepSpeed asserts)."""
        steps = {}
        for t in self.tensors:
            steps[t.name] = read_step_file(os.path.join(self.param_dir(t.name), "step.pt"))
        values = set(steps.values())
        if len(values) != 1:
            raise UniversalCheckpointError(f"{self.folder}: step.pt differs between parameters: "
                                           f"{sorted(values)[:4]}")
        return values.pop()

    def read(self, t: megatron_layout.MegatronTensor, state: str) -> np.ndarray:
        """One full Megatron tensor, fp32 numpy, vocab tensors zero-padded to V_pad rows.

        Args:
            t: the tensor.
            state: "fp32", "exp_avg" or "exp_avg_sq".
        """
        path = os.path.join(self.param_dir(t.name), f"{state}.pt")
        obj = load_tensor_file(path)
        return validate_state_dict(obj, t, self.config, path)


def validate_state_dict(obj: Any, t: megatron_layout.MegatronTensor, config: GPTConfig,
                        path: str) -> np.ndarray:
    """Check one universal state dict against the expected tensor and return it as numpy."""
    if not isinstance(obj, Mapping) or "param" not in obj:
        raise UniversalCheckpointError(f"{path}: expected a dict with 'param' (and 'cat_dim'), "
                                       f"found {type(obj).__name__}")
    param = obj["param"]
    if not isinstance(param, np.ndarray):
        raise UniversalCheckpointError(f"{path}: field 'param' is {type(param).__name__}, not a "
                                       "tensor")
    if param.dtype != np.float32:
        raise UniversalCheckpointError(f"{path}: field 'param' is {param.dtype}; universal "
                                       "checkpoints hold float32")
    shape = tuple(param.shape)
    want = t.shape
    if t.is_vocab:
        ok = len(shape) == 2 and shape[1] == want[1] and shape[0] in (config.vocab_size, want[0])
        if not ok:
            raise UniversalCheckpointError(
                f"{path}: shape {list(shape)} does not match the config: expected "
                f"[{config.vocab_size}, {want[1]}] (original vocab x hidden) for {t.name}; check "
                "--model-config or the checkpoint's args")
    elif shape != want:
        raise UniversalCheckpointError(
            f"{path}: shape {list(shape)} does not match the config: expected {list(want)} for "
            f"{t.name}; check --model-config or the checkpoint's args")
    if t.n_sub_params == 2 and obj.get("param_n_sub_params") not in (None, 2):
        raise UniversalCheckpointError(f"{path}: param_n_sub_params={obj['param_n_sub_params']}, "
                                       "expected 2 for dense_h_to_4h")
    w = param
    if t.is_vocab:
        w = megatron_layout.pad_vocab_rows(w, config.padded_vocab_size)
    return w


def read_step_file(path: str) -> float:
    """The value of a step.pt (a bare tensor, or a number in old files)."""
    obj = load_tensor_file(path)
    if isinstance(obj, np.ndarray) and obj.size == 1:
        return float(obj.reshape(()))
    if isinstance(obj, (int, float)):
        return float(obj)
    raise UniversalCheckpointError(f"{path}: expected a one-element step tensor, found "
                                   f"{type(obj).__name__}")


#: Top-level keys of mp_rank_XX_model_states.pt that the metadata does not copy into
#: `megatron_model_states` (they have fields of their own, or are too large to be useful).
MODEL_STATES_SKIP = frozenset({"args", "module", "universal_checkpoint_info", "iteration",
                               "checkpoint_version", "rng_state", "optimizer"})


def model_states_args(states: Mapping[str, Any], states_path: str) -> dict[str, Any]:
    """The Megatron args of a model-states file as a dict (Namespace or its inert record)."""
    args_obj = states.get("args")
    if isinstance(args_obj, argparse.Namespace):
        return dict(vars(args_obj))
    if isinstance(args_obj, PickledObject) and isinstance(args_obj.state, Mapping):
        return dict(args_obj.state)
    raise UniversalCheckpointError(f"{states_path}: field 'args' is missing or not an "
                                   "argparse Namespace")


def model_states_extra(states: Mapping[str, Any]) -> dict[str, Any]:
    """The other top-level keys of a model-states file, JSON-safe (`megatron_model_states`)."""
    return {k: to_jsonable(v) for k, v in states.items() if k not in MODEL_STATES_SKIP}


def open_universal(path: str, expected: GPTConfig | None = None) -> UniversalCheckpoint:
    """Open a universal checkpoint: read args, step metadata, param groups; check every folder.

    Args:
        path: a `--load` root (with latest_universal) or a global_stepN_universal folder.
        expected: a user-given config to check against the checkpoint's args; every mismatch is
            listed in the error.

    Raises:
        UniversalCheckpointError: with the file, the field and the fix.
    """
    folder = resolve_universal_dir(path)
    states_path = os.path.join(folder, MODEL_STATES)
    states = load_restricted(states_path)
    if not isinstance(states, Mapping):
        raise UniversalCheckpointError(f"{states_path}: expected a dict, found "
                                       f"{type(states).__name__}")
    args = model_states_args(states, states_path)
    info = states.get("universal_checkpoint_info")
    if not isinstance(info, Mapping):
        raise UniversalCheckpointError(
            f"{states_path}: field 'universal_checkpoint_info' is missing; the checkpoint was "
            "not prepared by Megatron-DeepSpeed for universal conversion")
    config = config_from_args(args, info, states_path)
    if expected is not None:
        diffs = config_mismatches(expected, config)
        if diffs:
            raise UniversalCheckpointError(
                f"{states_path}: the given model config does not match the checkpoint's args: "
                + "; ".join(diffs))

    zero = os.path.join(folder, ZERO)
    names = {n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n))}
    scheme = megatron_layout.detect_scheme(names, zero)
    tensors = megatron_layout.megatron_tensors(config, scheme)
    expected_names = {t.name for t in tensors}
    missing = [t.name for t in tensors if t.name not in names]
    if missing:
        raise UniversalCheckpointError(
            f"{zero}: missing parameter folder(s) {missing[:4]}"
            f"{' and %d more' % (len(missing) - 4) if len(missing) > 4 else ''}; the conversion "
            "is incomplete or the args do not describe this checkpoint")
    extra = sorted(names - expected_names)
    if extra:
        raise UniversalCheckpointError(
            f"{zero}: unexpected parameter folder(s) {extra[:4]}: agpt-jax's Llama model has no "
            "such tensor (biases? tied embeddings? a different layer count in args?)")

    opt_path = os.path.join(zero, OPTIMIZER_STATE)
    opt = load_restricted(opt_path)
    if not isinstance(opt, Mapping) or "param_groups" not in opt:
        raise UniversalCheckpointError(f"{opt_path}: field 'param_groups' is missing")
    groups = [dict(g) for g in opt["param_groups"]]
    for i, g in enumerate(groups):
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key not in g:
                raise UniversalCheckpointError(f"{opt_path}: param_groups[{i}] has no {key!r}")
    optimizer_state = {k: v for k, v in opt.items() if k != "param_groups"}

    iteration = states.get("iteration")
    if not isinstance(iteration, int):
        raise UniversalCheckpointError(f"{states_path}: field 'iteration' is missing")
    extra_states = model_states_extra(states)
    return UniversalCheckpoint(
        folder=folder, scheme=scheme, config=config, args=args, iteration=iteration,
        checkpoint_version=states.get("checkpoint_version"), universal_info=dict(info),
        optimizer_state=optimizer_state, param_groups=groups, tensors=tensors,
        model_states_extra=extra_states)
