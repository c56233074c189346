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

import os
from collections.abc import Mapping

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


def base_config(recipe: str, scale: str, *, lr: float, min_lr: float, lr_decay_style: str,
                lr_warmup_frac: float, environ: Mapping[str, str] = os.environ
                ) -> ml_collections.ConfigDict:
    """The full key set with launcher env defaults; the recipe files adjust their own keys.

    Args:
        recipe: "legacy" | "constant_cooldown" | "cooldown" | "pretrain".
        scale: one of SCALES (model preset and batch/iteration sizes).
        lr, min_lr, lr_decay_style, lr_warmup_frac: the recipe's defaults when the env is unset.
        environ: the environment (os.environ).

    Returns:
        A ConfigDict; `agpt_jax.config.from_config` documents every key.
    """
    sizes = {
        # micro_batch, grad_acc, seq, train_tokens, save, eval interval, eval iters, log
        # The 7B default is the CPT notes' 22e9 tokens (874 iterations at GBS 6144, spec §1.3).
        "agpt_7b": dict(micro_batch=1, grad_acc_steps=1, seq=4096, train_tokens=22_000_000_000,
                        train_iters=0, save_interval=50, eval_interval=100, eval_iters=20),
        "demo": dict(micro_batch=16, grad_acc_steps=1, seq=128, train_tokens=0, train_iters=120,
                     save_interval=40, eval_interval=20, eval_iters=2),
        "smoke": dict(micro_batch=1, grad_acc_steps=2, seq=32, train_tokens=0, train_iters=6,
                      save_interval=4, eval_interval=3, eval_iters=1),
    }[scale]
    frac, frac_note = warmup_frac_from_env(lr_warmup_frac, environ)
    c = ml_collections.ConfigDict()
    c.recipe = recipe
    c.scale = scale
    # Model.
    c.model = MODEL_OF_SCALE[scale]
    c.seq_length = env_int("SEQ", sizes["seq"], environ)
    c.compute_dtype = env_str("DTYPE_COMPUTE", "", environ)  # "" = the preset's
    c.attention = ""  # "" = the runtime's default implementation
    c.remat = ""  # "" = the preset's
    # Data.
    c.data_file_list = env_str("DATA_FILE_LIST", "", environ)
    c.split = env_str("SPLIT", "990,10,0", environ)
    c.seed = env_int("SEED", 1234, environ)
    c.data_cache_dir = ""  # "" = <run_dir>/data_cache
    # AuroraGPT's launcher always passes --shuffle-sample-in-corpus; --blend-sample-in-corpus only
    # until 2025-09 (spec §1.4, §1.5).
    c.shuffle_sample_in_corpus = True
    c.blend_sample_in_corpus = False
    # Checkpoints in and out.
    c.load = env_str("LOAD", "", environ)
    c.save = env_str("SAVE", "", environ)
    c.run_dir = ""  # "" = save
    c.load_optimizer_state = True
    c.reset_iteration = recipe != "pretrain"
    c.universal_checkpoint = False  # True: LOAD must be a universal checkpoint (--universal-checkpoint)
    c.allow_cooled_down_source = False
    c.save_interval = env_int("SAVE_INTERVAL", sizes["save_interval"], environ)
    c.keep_checkpoints = 3
    # Length and batch.
    # The launcher's precedence (spec §1.3): TRAIN_TOKENS, else TRAIN_ITERS / TRAIN_ITER.
    env_tokens = env_int("TRAIN_TOKENS", 0, environ)
    env_iters = env_int("TRAIN_ITERS", env_int("TRAIN_ITER", 0, environ), environ)
    if env_tokens:
        c.train_tokens, c.train_iters = env_tokens, 0
    elif env_iters:
        c.train_tokens, c.train_iters = 0, env_iters
    else:
        c.train_tokens, c.train_iters = sizes["train_tokens"], sizes["train_iters"]
    c.micro_batch = env_int("MICRO_BATCH", sizes["micro_batch"], environ)
    # 0 = derived from global_batch, as Megatron derives it from --global-batch-size.
    c.grad_acc_steps = env_int("GRAD_ACC_STEPS", sizes["grad_acc_steps"], environ)
    c.global_batch = env_int("GLOBAL_BATCH", 0, environ)
    c.stop_at_iteration = 0  # 0 = run to train_iters; otherwise save and stop after it
    # Schedule.
    c.lr = env_float("LR", lr, environ)
    c.min_lr = env_float("MIN_LR", min_lr, environ)
    c.lr_decay_style = env_str("LR_DECAY_STYLE", lr_decay_style, environ)
    c.lr_warmup_frac = frac
    c.lr_warmup_frac_note = frac_note
    c.lr_warmup_iters = 0
    c.lr_decay_iters = env_int("LR_DECAY_ITERS", 0, environ)
    c.cooldown_frac = 0.0  # > 0: 1-sqrt cooldown over the last frac of the run (constant style)
    c.cooldown_tokens = 0  # cooldown recipe: tokens of the branch
    # Optimizer (spec §1.2 defaults).
    c.adam_beta1 = env_float("ADAM_BETA1", 0.9, environ)
    c.adam_beta2 = env_float("ADAM_BETA2", 0.95, environ)
    c.adam_eps = env_float("ADAM_EPS", 1e-5, environ)
    c.weight_decay = env_float("WEIGHT_DECAY", 0.1, environ)
    c.clip_grad = env_float("CLIP_GRAD", 1.0, environ)
    # Parallelism.
    c.tp = env_int("TP", 1, environ)
    c.mesh = ""  # "" = data=1, fsdp=all devices / tp, tensor=tp
    c.strategy = "fsdp"
    c.platform = "auto"
    # Evaluation, logging, failure handling.
    c.eval_interval = env_int("EVAL_INTERVAL", sizes["eval_interval"], environ)
    c.eval_iters = env_int("EVAL_ITERS", sizes["eval_iters"], environ)
    c.log_interval = env_int("LOG_INTERVAL", 1, environ)
    c.max_skipped_in_a_row = 5
    c.peak_tflops_per_device = 0.0  # 0 = the table in agpt_jax/metrics.py
    c.progress_bar = True
    return c
