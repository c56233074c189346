"""Megatron-DeepSpeed's command-line flags in scripts/cpt.py: the accepted ones and the refused ones.

Users paste the tail of their `train_alcf.sh` line (`--universal-checkpoint --finetune
--lr_constant_plus_cooldown`) after `--config`. The flags of `ACCEPTED` are spelled exactly as
Megatron spells them (hyphens, and the Argonne fork's underscores in `--lr_constant_plus_cooldown`),
parsed by absl, mean what they mean in Megatron's `arguments.py` (spec megatron-deepspeed.md §1-2),
and override the environment and the config. Every other Megatron flag is refused with one line
naming the config field to use instead (`refusal`); nothing is silently ignored.

`sources` tells, for every config key, where its effective value came from (a Megatron flag, a
`--config.<key>` flag, a launcher variable, or the recipe's default); scripts/cpt.py logs it and
keeps it in config.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags

# Megatron's --lr_constant_plus_cooldown_frac default (arguments.py, spec §2.3).
MEGATRON_COOLDOWN_FRAC = 0.05


@dataclasses.dataclass(frozen=True)
class Flag:
    """One accepted Megatron flag.

    Attributes:
        name: the flag as Megatron spells it, without the leading `--`.
        kind: bool (a switch), int, float or str.
        key: the config key it sets (agpt_jax/recipes.py).
        help: what it means in Megatron.
        launcher_overrides: train_alcf.sh passes this flag itself after the user's extra
            arguments (ALCF/helpers.sh `get_training_args`), so there argparse keeps the launcher's
            value and the pasted one has no effect; agpt-jax applies the pasted one and says so.
    """

    name: str
    kind: type
    key: str
    help: str
    launcher_overrides: bool = False


ACCEPTED: tuple[Flag, ...] = (
    Flag("universal-checkpoint", bool, "universal_checkpoint",
         "LOAD is a DeepSpeed universal checkpoint (a root with latest_universal, or a "
         "global_stepN_universal folder); it is converted once into SAVE/converted_init/"),
    Flag("finetune", bool, "reset_iteration",
         "start the iteration, the LR schedule and the consumed samples at 0 (Adam state is still "
         "loaded from a universal checkpoint, as DeepSpeed does)"),
    Flag("lr_constant_plus_cooldown", bool, "cooldown_frac",
         "with --lr-decay-style constant: a 1-sqrt cooldown to --min-lr over the last "
         "--lr_constant_plus_cooldown_frac of the run"),
    Flag("lr_constant_plus_cooldown_frac", float, "cooldown_frac",
         f"the cooldown's length as a fraction of the decay iterations (Megatron's default "
         f"{MEGATRON_COOLDOWN_FRAC}); read only with --lr_constant_plus_cooldown"),
    Flag("lr", float, "lr", "the peak learning rate"),
    Flag("min-lr", float, "min_lr", "the LR at the end of the decay (Megatron's default 0.0)"),
    Flag("lr-decay-style", str, "lr_decay_style",
         "constant | linear | cosine | inverse-square-root | infinite-cosine | "
         "infinite-inv-square-root | WSD"),
    Flag("lr-warmup-fraction", float, "lr_warmup_frac",
         "warmup as a fraction of the decay iterations; wins over --lr-warmup-iters"),
    Flag("lr-warmup-iters", int, "lr_warmup_iters", "warmup iterations"),
    Flag("train-iters", int, "train_iters", "iterations of the run (replaces TRAIN_TOKENS)",
         launcher_overrides=True),
    Flag("micro-batch-size", int, "micro_batch", "sequences per data-parallel rank per micro-step",
         launcher_overrides=True),
    Flag("global-batch-size", int, "global_batch",
         "sequences per iteration; the gradient accumulation steps follow from it unless "
         "GRAD_ACC_STEPS is set", launcher_overrides=True),
    Flag("seed", int, "seed", "the seed of the sample shuffles and of a random init"),
    Flag("shuffle-sample-in-corpus", bool, "shuffle_sample_in_corpus",
         "shuffle each corpus's samples once more (AuroraGPT's launcher always passes it; "
         "--noshuffle-sample-in-corpus turns it off)"),
    Flag("blend-sample-in-corpus", bool, "blend_sample_in_corpus",
         "blend a corpus's files by weight instead of concatenating them (the 2024 launcher)"),
    Flag("save-interval", int, "save_interval", "iterations between checkpoints",
         launcher_overrides=True),
    Flag("eval-interval", int, "eval_interval", "iterations between evaluations",
         launcher_overrides=True),
    Flag("eval-iters", int, "eval_iters", "validation batches per evaluation",
         launcher_overrides=True),
)

# Megatron flags agpt-jax does not take, and what to use instead (one line each).
_MODEL = "the model preset: the config's scale (configs/<recipe>.py:agpt_7b|demo|smoke) or config.model"
_FIXED = "agpt-jax's model is Megatron's Llama (SwiGLU, RMSNorm, RoPE, no biases, untied, no dropout); drop it"
_RUNTIME = "the runtime picks these; config.attention and config.platform choose by hand; drop it"
_DEEPSPEED = "agpt-jax does not run DeepSpeed; shard with config.mesh and config.strategy (fsdp | zero1)"
_REFUSED: dict[str, str] = {
    "seq-length": "config.seq_length (env SEQ)",
    "max-position-embeddings": "nothing: with rotary embeddings it has no effect (config.seq_length sets the length)",
    "num-layers": _MODEL, "hidden-size": _MODEL, "num-attention-heads": _MODEL,
    "num-key-value-heads": _MODEL, "ffn-hidden-size": _MODEL, "kv-channels": _MODEL,
    "make-vocab-size-divisible-by": _MODEL, "layernorm-epsilon": _MODEL,
    "rotary-position-embeddings-theta": _MODEL, "rope-theta": _MODEL,
    "swiglu": _FIXED, "normalization": _FIXED, "disable-bias-linear": _FIXED,
    "no-query-key-layer-scaling": _FIXED, "use-rotary-position-embeddings": _FIXED,
    "untie-embeddings-and-output-weights": _FIXED, "hidden-dropout": _FIXED,
    "attention-dropout": _FIXED, "init-method-std": _FIXED, "adjust-word-embedding-init": _FIXED,
    "word-embedding-init-std": _FIXED,
    "use-flash-attn-builder": _RUNTIME, "use-flash-attn-v2": _RUNTIME, "use-flash-attn": _RUNTIME,
    "no-bias-gelu-fusion": _RUNTIME, "no-bias-dropout-fusion": _RUNTIME,
    "no-masked-softmax-fusion": _RUNTIME, "no-gradient-accumulation-fusion": _RUNTIME,
    "accumulate-allreduce-grads-in-fp32": _RUNTIME, "distributed-backend": _RUNTIME,
    "timing-log-level": _RUNTIME, "log-timers-to-tensorboard": _RUNTIME,
    "log-optimizer-states-to-tensorboard": _RUNTIME,
    "tensorboard-dir": "nothing: metrics go to <run_dir>/metrics.jsonl (plot with scripts/plot_runs.py)",
    "deepspeed": _DEEPSPEED, "deepspeed_config": _DEEPSPEED, "no-pipeline-parallel": _DEEPSPEED,
    "zero-stage": "config.strategy (fsdp, or zero1 for ZeRO-1's layout)",
    "pipeline-model-parallel-size": "nothing: pipeline parallelism is not supported; use config.mesh",
    "ds-sequence-parallel-size": "nothing: sequence parallelism is not supported; use config.mesh",
    "tensor-model-parallel-size": "config.tp (env TP)",
    "data-file-list": "config.data_file_list (env DATA_FILE_LIST)",
    "data-path": "config.data_file_list (a DATA_FILE_LIST file of 'weight prefix corpus' lines)",
    "data-cache-path": "config.data_cache_dir",
    "split": "config.split (env SPLIT)",
    "load": "config.load (env LOAD)", "save": "config.save (env SAVE)",
    "train-tokens": "config.train_tokens (env TRAIN_TOKENS)",
    "train-samples": "config.train_iters (or env TRAIN_TOKENS)",
    "lr-decay-iters": "config.lr_decay_iters (env LR_DECAY_ITERS)",
    "lr-decay-samples": "config.lr_decay_iters",
    "lr-warmup-samples": "--lr-warmup-iters or --lr-warmup-fraction",
    "weight-decay": "config.weight_decay (env WEIGHT_DECAY)",
    "adam-beta1": "config.adam_beta1 (env ADAM_BETA1)", "adam-beta2": "config.adam_beta2 (env ADAM_BETA2)",
    "adam-eps": "config.adam_eps (env ADAM_EPS)", "clip-grad": "config.clip_grad (env CLIP_GRAD)",
    "optimizer": "nothing: the optimizer is Megatron's AdamW (config.adam_*, config.weight_decay)",
    "log-interval": "config.log_interval (env LOG_INTERVAL)",
    "bf16": "config.compute_dtype (bfloat16 is the presets' default)",
    "fp16": "config.compute_dtype (float16 is not supported; bfloat16 or float32)",
    "tokenizer-type": "nothing: training reads tokenized .bin/.idx (scripts/preprocess_data.py takes it)",
    "tokenizer-model": "nothing: training reads tokenized .bin/.idx (scripts/preprocess_data.py takes it)",
    "use-checkpoint-opt_param-scheduler": "nothing: --finetune recipes restart the schedule; config.reset_iteration=False resumes it",
    "override-opt_param-scheduler": "nothing: the config's schedule always wins",
    "no-load-optim": "config.load_optimizer_state=False",
    "no-load-rng": "nothing: agpt-jax's random state is the seed and the iteration",
    "reset-iteration": "--finetune (config.reset_iteration)",
}


class FlagError(ValueError):
    """A Megatron flag cpt.py refuses, or a combination Megatron would not run."""


def define(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines every accepted flag (default None: "not given") and returns their holders."""
    definers: dict[type, Callable[..., flags.FlagHolder]] = {
        bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
        str: flags.DEFINE_string}
    return {f.name: definers[f.kind](f.name, None, f"Megatron's --{f.name}: {f.help} "
                                     f"(sets config.{f.key})", flag_values=flag_values)
            for f in ACCEPTED}


def refusal(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> str | None:
    """One line for the first `--name` in argv that is not a defined flag, or None.

    A Megatron flag gets the config field that replaces it; any other unknown flag gets the list
    of accepted Megatron flags.
    """
    for arg in argv[1:]:
        if arg == "--":
            return None
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        name = arg[2:].split("=", 1)[0]
        if not name or name in flag_values:
            continue
        if name.startswith("no") and name[2:] in flag_values and isinstance(
                flag_values[name[2:]], flags.BooleanFlag):
            continue
        if name in _REFUSED:
            return (f"Megatron's --{name} is not taken by cpt.py; instead: {_REFUSED[name]}")
        accepted = " ".join(f"--{f.name}" for f in ACCEPTED)
        return (f"unknown flag --{name}; cpt.py takes --config.<key>=<value> (the keys of "
                f"agpt_jax/recipes.py), its own flags (--helpfull) and these Megatron flags: "
                f"{accepted}")
    return None


@dataclasses.dataclass(frozen=True)
class Applied:
    """What the Megatron flags did to the config: keys set, and sentences for the log."""

    keys: dict[str, str]  # config key -> the flag text that set it
    notes: tuple[str, ...]


def apply(config: Any, given: Mapping[str, Any], explicit_keys: set[str]) -> Applied:
    """Applies the given Megatron flags to the (locked) ConfigDict, with Megatron's rules.

    Args:
        config: the ConfigDict from configs/<recipe>.py (with env and --config.* already in).
        given: Megatron flag name -> value, only the flags given on the command line.
        explicit_keys: config keys set by the user (a launcher variable or --config.<key>); the
            `--global-batch-size` rule needs to know whether GRAD_ACC_STEPS was given.

    Returns:
        Applied: the keys each flag set, and notes (launcher quirks, rules applied).

    Raises:
        FlagError: a combination Megatron would not accept or would silently ignore.
    """
    keys: dict[str, str] = {}
    notes: list[str] = []
    by_name = {f.name: f for f in ACCEPTED}

    def put(key: str, value: Any, text: str) -> None:
        setattr(config, key, value)
        keys[key] = text

    for name, value in given.items():
        flag = by_name[name]
        text = f"--{name}" if flag.kind is bool else f"--{name} {value}"
        if flag.launcher_overrides:
            notes.append(f"{text}: applied; note that train_alcf.sh would have dropped it (the "
                         f"launcher passes its own --{name} after the extra arguments and argparse "
                         "keeps the last)")
        if name in ("lr_constant_plus_cooldown", "lr_constant_plus_cooldown_frac"):
            continue  # together below
        if name == "universal-checkpoint":
            put("universal_checkpoint", bool(value), text)
        elif name == "finetune":
            put("reset_iteration", bool(value), text)
        elif name == "train-iters":
            put("train_iters", int(value), text)
            if int(config.train_tokens):
                notes.append(f"{text} replaces train_tokens={config.train_tokens} (TRAIN_TOKENS)")
            put("train_tokens", 0, text)
        elif name == "lr-warmup-fraction":
            put("lr_warmup_frac", float(value), text)
            put("lr_warmup_frac_note", f"from Megatron flag {text}", text)
        elif name == "lr-warmup-iters":
            put("lr_warmup_iters", int(value), text)
        elif name == "global-batch-size":
            put("global_batch", int(value), text)
        else:
            put(flag.key, flag.kind(value), text)

    # --lr-warmup-iters: Megatron uses it only when --lr-warmup-fraction is None.
    if "lr-warmup-iters" in given:
        if "lr-warmup-fraction" in given:
            notes.append(f"--lr-warmup-iters {given['lr-warmup-iters']} has no effect: "
                         f"--lr-warmup-fraction {given['lr-warmup-fraction']} is given and wins, "
                         "as in Megatron")
        elif float(config.lr_warmup_frac):
            notes.append(f"--lr-warmup-iters {given['lr-warmup-iters']} replaces lr_warmup_frac="
                         f"{config.lr_warmup_frac} ({config.lr_warmup_frac_note})")
            put("lr_warmup_frac", 0.0, f"--lr-warmup-iters {given['lr-warmup-iters']}")
            put("lr_warmup_frac_note", "0: --lr-warmup-iters is given",
                f"--lr-warmup-iters {given['lr-warmup-iters']}")

    # --global-batch-size: Megatron derives the micro-batches per update from it.
    if "global-batch-size" in given and "grad_acc_steps" not in explicit_keys:
        put("grad_acc_steps", 0, f"--global-batch-size {given['global-batch-size']}")
        notes.append(f"grad_acc_steps follows from --global-batch-size "
                     f"{given['global-batch-size']} / (micro batch x data-parallel size), as in "
                     "Megatron (GRAD_ACC_STEPS is not set)")

    # The cooldown switch and its length: Megatron reads the length only with the switch.
    switch = given.get("lr_constant_plus_cooldown")
    frac = given.get("lr_constant_plus_cooldown_frac")
    if switch is False:
        if frac is not None:
            raise FlagError(f"--lr_constant_plus_cooldown_frac {frac} with "
                            "--nolr_constant_plus_cooldown: the length of a cooldown that is off; "
                            "drop one of them")
        put("cooldown_frac", 0.0, "--nolr_constant_plus_cooldown")
    elif switch:
        if frac is not None:
            put("cooldown_frac", float(frac),
                f"--lr_constant_plus_cooldown --lr_constant_plus_cooldown_frac {frac}")
        elif float(config.cooldown_frac) > 0:
            keys["cooldown_frac"] = "--lr_constant_plus_cooldown (length from the config)"
        else:
            put("cooldown_frac", MEGATRON_COOLDOWN_FRAC,
                f"--lr_constant_plus_cooldown (Megatron's default length "
                f"{MEGATRON_COOLDOWN_FRAC})")
    elif frac is not None:
        if float(config.cooldown_frac) > 0:
            put("cooldown_frac", float(frac), f"--lr_constant_plus_cooldown_frac {frac}")
            notes.append(f"--lr_constant_plus_cooldown_frac {frac} sets the length of the "
                         f"recipe's cooldown ({config.recipe} cools down by default; Megatron "
                         "would also need --lr_constant_plus_cooldown)")
        else:
            raise FlagError(f"--lr_constant_plus_cooldown_frac {frac} without "
                            "--lr_constant_plus_cooldown: Megatron reads the length only with the "
                            "switch, so this run would not cool down; add "
                            "--lr_constant_plus_cooldown")
    return Applied(keys=keys, notes=tuple(notes))


def config_overrides(argv: Sequence[str]) -> set[str]:
    """The config keys given as `--config.<key>=...` (or `--config.<key> ...`) in argv."""
    keys = set()
    for arg in argv:
        if arg.startswith("--config."):
            keys.add(arg[len("--config."):].split("=", 1)[0].split(".")[0])
    return keys


def sources(config: Mapping[str, Any], recipe_defaults: Mapping[str, Any],
            env_values: Mapping[str, Any], env_of_key: Mapping[str, Sequence[str]],
            environ: Mapping[str, str], argv: Sequence[str],
            applied: Applied) -> dict[str, str]:
    """Where each config key's effective value came from.

    Args:
        config: the final config (after env, --config.* and Megatron flags).
        recipe_defaults: the recipe's config built with an empty environment.
        env_values: the recipe's config built with the real environment (no flags).
        env_of_key: config key -> the launcher variables it is read from.
        environ: the environment.
        argv: the command line.
        applied: what `apply` did.

    Returns:
        key -> "Megatron flag --lr 0.0002" | "--config.lr" | "env LR=0.0002" | "recipe default".
    """
    overridden = config_overrides(argv)
    out = {}
    for key in config.keys():
        if key in applied.keys:
            out[key] = f"Megatron flag {applied.keys[key]}"
        elif key in overridden:
            out[key] = f"--config.{key}"
        elif names := [n for n in env_of_key.get(key, ()) if environ.get(n, "").strip()]:
            out[key] = "env " + ", ".join(f"{n}={environ[n].strip()}" for n in names)
        elif env_values[key] != recipe_defaults[key]:
            out[key] = ("the launcher's variables (another one replaces it, e.g. TRAIN_TOKENS "
                        "replaces TRAIN_ITERS)")
        else:
            out[key] = "recipe default"
    return out


def source_lines(config: Mapping[str, Any], where: Mapping[str, str], recipe: str) -> list[str]:
    """Log lines: every key not at its recipe default, with its value and source."""
    lines = [f"setting {key}={config[key]!r} from {src}" for key, src in where.items()
             if src != "recipe default" and key != "lr_warmup_frac_note"]
    rest = sum(1 for src in where.values() if src == "recipe default")
    lines.append(f"the other {rest} settings are the defaults of configs/{recipe}.py")
    return lines
