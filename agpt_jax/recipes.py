"""Shared pieces of the run configs: the strict argument parser, launcher env defaults, the key set.

Every config file (configs/legacy.py, configs/constant_cooldown.py, configs/cooldown.py,
configs/pretrain.py) returns `base_config(...)` with its recipe's values filled in. The keys are
the same in every file so that `--config.<key>=<value>` works everywhere and
`agpt_jax.config.from_config` reads one schema.

Environment variables of the Megatron-DeepSpeed launcher (`ALCF/helpers.sh`, spec §1.2) are read
here as defaults, with Megatron's meaning; a `--config.<key>` flag overrides them. A value of 0 (or
"") for `train_tokens`, `train_iters` and `global_batch` means "not set".

This module lives in the package so that a config file, which ml_collections' config_flags loads
by path from any working directory, imports it as `from agpt_jax import recipes` with no edit of
the import path. It is a leaf of config building: it imports only the standard library and
ml_collections, never agpt_jax.loop, agpt_jax.train, agpt_jax.model, jax or the converters, so
that loading a config stays cheap and free of import cycles.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

# The argument after the colon in `--config configs/<recipe>.py:<arg>`.
SCALES = ("agpt_7b", "demo", "smoke")

# Which model preset each scale trains (agpt_jax.model.PRESETS).
MODEL_OF_SCALE = {"agpt_7b": "agpt_7b", "demo": "demo", "smoke": "tiny"}


def parse_arg(arg: str | None, recipe: str) -> str:
    """The scale named by a config argument, strictly.

    Args:
        arg: the text after the colon ("agpt_7b", "demo", "smoke"); None or "" means "agpt_7b".
        recipe: the config file's name, for the error message.

    Returns:
        One of SCALES.

    Raises:
        ValueError: an unknown argument, naming the accepted ones.
    """
    scale = (arg or "agpt_7b").strip()
    if scale not in SCALES:
        raise ValueError(f"configs/{recipe}.py:{arg}: unknown argument {arg!r}; use one of "
                         f"{', '.join(SCALES)} (e.g. --config configs/{recipe}.py:demo)")
    return scale


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_int(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    """Integer environment variable `name`, or `default`; a malformed value is a ValueError."""
    value = _env(environ, name)
    if value is None:
        return default
    try:
        return int(float(value)) if "e" in value.lower() else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; "
                         f"unset it or give a whole number") from None


def env_float(name: str, default: float, environ: Mapping[str, str] = os.environ) -> float:
    """Float environment variable `name`, or `default`; a malformed value is a ValueError."""
    value = _env(environ, name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number; "
                         f"unset it or give a number such as 2e-4") from None


def env_str(name: str, default: str, environ: Mapping[str, str] = os.environ) -> str:
    """String environment variable `name`, or `default`."""
    value = _env(environ, name)
    return default if value is None else value


def warmup_frac_from_env(default: float,
                         environ: Mapping[str, str] = os.environ) -> tuple[float, str]:
    """The warmup fraction from LR_WARMUP_FRAC, as Megatron's launcher reads it, and a note.

    Megatron-DeepSpeed's launcher reads only LR_WARMUP_FRAC (spec §1.2 and §0 item 2); the CPT
    notes' command sets LR_WARMUP_FRACTION=0.01, which the launcher ignores, so that run used the
    default 0.05. agpt-jax does the same, so that the seed's command gives the seed's schedule, and
    the note says so loudly (it is printed at start-up and kept in config.json).

    Returns:
        (fraction, a sentence naming the variable that decided, for the start-up log).
    """
    frac = _env(environ, "LR_WARMUP_FRAC")
    fraction = _env(environ, "LR_WARMUP_FRACTION")
    ignored = ""
    if fraction is not None:
        ignored = (f"; LR_WARMUP_FRACTION={fraction} is ignored, as Megatron-DeepSpeed's "
                   f"launcher ignores it (it reads only LR_WARMUP_FRAC): for {fraction} set "
                   f"LR_WARMUP_FRAC={fraction} or pass --lr-warmup-fraction {fraction}")
    if frac is not None:
        return env_float("LR_WARMUP_FRAC", default, environ), f"from LR_WARMUP_FRAC={frac}" + ignored
    return default, "the recipe's default (LR_WARMUP_FRAC is not set)" + ignored


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: what `--config.<key>` sets, which launcher variables default it.

    Attributes:
        key: the ConfigDict key (`--config.<key>`).
        kind: bool, int, float or str.
        default: the value when no variable is set; SCALE: the scale's size (`SIZES`); RECIPE:
            the recipe file's argument to `base_config`.
        env: the launcher's environment variables (ALCF/helpers.sh), the first set one wins.
        doc: what it means.
    """

    key: str
    kind: type
    default: Any
    env: tuple[str, ...] = ()
    doc: str = ""


SCALE, RECIPE = "<the scale's>", "<the recipe's>"

#: Every config key, in the order config.json lists them: the one table that base_config builds
#: the ConfigDict from, that agpt_jax.config names env variables by, and that docs/config.md
#: shows (with the Megatron flag of each key, from agpt_jax.megatron_flags).
SCHEMA: tuple[Field, ...] = (
    Field("recipe", str, RECIPE, doc="legacy | constant_cooldown | cooldown | pretrain"),
    Field("scale", str, RECIPE, doc="agpt_7b | demo | smoke: the model and sizes"),
    Field("model", str, SCALE, doc="the model preset (agpt_jax.model.PRESETS)"),
    Field("seq_length", int, SCALE, ("SEQ",), "tokens per sequence"),
    Field("compute_dtype", str, "", ("DTYPE_COMPUTE",), '"" = the preset\'s (bfloat16)'),
    Field("attention", str, "", doc='"" = the runtime\'s default implementation'),
    Field("remat", str, "", doc='"" = the preset\'s'),
    Field("data_file_list", str, "", ("DATA_FILE_LIST",), "weight prefix corpus lines"),
    Field("split", str, "990,10,0", ("SPLIT",), "train, valid, test parts"),
    Field("seed", int, 1234, ("SEED",), "sample shuffles and random init"),
    Field("data_cache_dir", str, "", doc='"" = <run_dir>/data_cache'),
    # AuroraGPT's launcher always passes --shuffle-sample-in-corpus; --blend-sample-in-corpus
    # only until 2025-09 (spec §1.4, §1.5).
    Field("shuffle_sample_in_corpus", bool, True, doc="shuffle each corpus's samples once more"),
    Field("blend_sample_in_corpus", bool, False, doc="blend a corpus's files by weight"),
    Field("load", str, "", ("LOAD",), "the checkpoint to start from"),
    Field("save", str, "", ("SAVE",), "the run directory"),
    Field("run_dir", str, "", doc='"" = save'),
    Field("load_optimizer_state", bool, True, doc="restore Adam moments and step from LOAD"),
    Field("reset_iteration", bool, RECIPE, doc="Megatron's --finetune (every CPT recipe)"),
    Field("universal_checkpoint", bool, False, doc="LOAD must be a universal checkpoint"),
    Field("allow_cooled_down_source", bool, False,
          doc="constant_cooldown: accept a source whose LR was decayed"),
    Field("save_interval", int, SCALE, ("SAVE_INTERVAL",), "iterations between checkpoints"),
    Field("keep_checkpoints", int, 3, doc="newest checkpoints kept"),
    Field("train_tokens", int, SCALE, ("TRAIN_TOKENS",), "tokens of the run (0 = not set)"),
    Field("train_iters", int, SCALE, ("TRAIN_ITERS", "TRAIN_ITER"),
          "iterations (0 = from train_tokens)"),
    Field("micro_batch", int, SCALE, ("MICRO_BATCH",), "sequences per rank per micro-step"),
    Field("grad_acc_steps", int, SCALE, ("GRAD_ACC_STEPS",),
          "micro-steps per update (0 = derived from global_batch)"),
    Field("global_batch", int, 0, ("GLOBAL_BATCH",), "sequences per update (0 = derived)"),
    Field("stop_at_iteration", int, 0, doc="save and stop after this iteration (0 = the end)"),
    Field("lr", float, RECIPE, ("LR",), "the peak LR"),
    Field("min_lr", float, RECIPE, ("MIN_LR",), "the LR at the end of the decay"),
    Field("lr_decay_style", str, RECIPE, ("LR_DECAY_STYLE",), "agpt_jax.schedules.DECAY_STYLES"),
    Field("lr_warmup_frac", float, RECIPE, ("LR_WARMUP_FRAC",),
          "warmup fraction (LR_WARMUP_FRACTION is ignored, as Megatron's launcher ignores it)"),
    Field("lr_warmup_frac_note", str, "", doc="which variable decided lr_warmup_frac (set here)"),
    Field("lr_warmup_iters", int, 0, doc="warmup iterations (lr_warmup_frac wins when set)"),
    Field("lr_decay_iters", int, 0, ("LR_DECAY_ITERS",), "0 = train_iters"),
    Field("cooldown_frac", float, 0.0, doc="> 0: 1-sqrt cooldown over the last frac (constant)"),
    Field("cooldown_tokens", int, 0, doc="cooldown recipe: tokens of the branch"),
    Field("adam_beta1", float, 0.9, ("ADAM_BETA1",), "Adam beta1 (spec §1.2)"),
    Field("adam_beta2", float, 0.95, ("ADAM_BETA2",), "Adam beta2"),
    Field("adam_eps", float, 1e-5, ("ADAM_EPS",), "Adam eps"),
    Field("weight_decay", float, 0.1, ("WEIGHT_DECAY",), "decoupled weight decay"),
    Field("clip_grad", float, 1.0, ("CLIP_GRAD",), "global gradient-norm clip"),
    Field("tp", int, 1, ("TP",), "tensor parallel size"),
    Field("mesh", str, "", doc='"" = data=1, fsdp=all devices / tp, tensor=tp'),
    Field("strategy", str, "fsdp", doc="fsdp | zero1"),
    Field("platform", str, "auto", doc="auto | cpu | xpu"),
    Field("eval_interval", int, SCALE, ("EVAL_INTERVAL",), "iterations between evaluations"),
    Field("eval_iters", int, SCALE, ("EVAL_ITERS",), "validation batches per evaluation"),
    Field("log_interval", int, 1, ("LOG_INTERVAL",), "iterations between log lines"),
    Field("max_skipped_in_a_row", int, 5, doc="non-finite updates in a row before stopping"),
    Field("peak_tflops_per_device", float, 0.0, doc="0 = the platform's (for MFU)"),
    Field("progress_bar", bool, True, doc="a progress bar instead of log lines"),
)
FIELDS: dict[str, Field] = {f.key: f for f in SCHEMA}

# Per-scale sizes. The 7B default is the CPT notes' 22e9 tokens (874 iterations at GBS 6144,
# spec §1.3).
SIZES = {
    "agpt_7b": dict(micro_batch=1, grad_acc_steps=1, seq_length=4096, train_tokens=22_000_000_000,
                    train_iters=0, save_interval=50, eval_interval=100, eval_iters=20),
    "demo": dict(micro_batch=16, grad_acc_steps=1, seq_length=128, train_tokens=0,
                 train_iters=120, save_interval=40, eval_interval=20, eval_iters=2),
    "smoke": dict(micro_batch=1, grad_acc_steps=2, seq_length=32, train_tokens=0, train_iters=6,
                  save_interval=4, eval_interval=3, eval_iters=1),
}
_READ = {int: env_int, float: env_float, str: env_str}


def base_config(recipe: str, scale: str, *, lr: float, min_lr: float, lr_decay_style: str,
                lr_warmup_frac: float, environ: Mapping[str, str] = os.environ
                ) -> ml_collections.ConfigDict:
    """The full key set (SCHEMA) with launcher env defaults; the recipe files adjust their keys.

    Args:
        recipe: "legacy" | "constant_cooldown" | "cooldown" | "pretrain".
        scale: one of SCALES (model preset and batch/iteration sizes).
        lr, min_lr, lr_decay_style, lr_warmup_frac: the recipe's defaults when the env is unset.
        environ: the environment (os.environ).

    Returns:
        A ConfigDict; `agpt_jax.config.from_config` documents every key.
    """
    frac, frac_note = warmup_frac_from_env(lr_warmup_frac, environ)
    given = {"recipe": recipe, "scale": scale, "lr": lr, "min_lr": min_lr,
             "lr_decay_style": lr_decay_style, "reset_iteration": recipe != "pretrain"}
    scale_values = {**SIZES[scale], "model": MODEL_OF_SCALE[scale]}
    c = ml_collections.ConfigDict()
    for f in SCHEMA:
        default = (scale_values[f.key] if f.default == SCALE else
                   given.get(f.key) if f.default == RECIPE else f.default)
        if f.env and f.key not in _SPECIAL:
            default = _READ[f.kind](f.env[0], default, environ)
        c[f.key] = default
    c.lr_warmup_frac, c.lr_warmup_frac_note = frac, frac_note
    # The launcher's precedence (spec §1.3): TRAIN_TOKENS, else TRAIN_ITERS / TRAIN_ITER.
    env_tokens = env_int("TRAIN_TOKENS", 0, environ)
    env_iters = env_int("TRAIN_ITERS", env_int("TRAIN_ITER", 0, environ), environ)
    if env_tokens:
        c.train_tokens, c.train_iters = env_tokens, 0
    elif env_iters:
        c.train_tokens, c.train_iters = 0, env_iters
    return c


# Keys whose variables are read above by their own rule, not by the table's first variable.
_SPECIAL = ("lr_warmup_frac", "train_tokens", "train_iters")
