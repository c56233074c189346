"""The run configuration: ConfigDict (configs/*.py) -> validated frozen dataclasses.

`from_config` is the only place that reads a ConfigDict. It resolves the launcher arithmetic of
Megatron-DeepSpeed (spec §1.2-1.3): global batch = micro batch x grad-acc steps x data-parallel
size, iterations = TRAIN_TOKENS // SEQ // GLOBAL_BATCH (bash integer division, left to right),
and the schedule's warmup and cooldown. Every problem is reported as one line naming the config
key (and the launcher variable behind it) and the fix; all problems are reported at once.

Over 400 lines on purpose: the RunConfig dataclasses and `from_config`, the one pass that
checks every key and lists every problem at once; the keys themselves are agpt_jax/recipes.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from agpt_jax import model as model_lib
from agpt_jax import optim, recipes, schedules
from agpt_jax.runtime import PLATFORMS, MeshConfig, parse_mesh

RECIPES = ("legacy", "constant_cooldown", "cooldown", "pretrain")
# Recipes that start from a checkpoint (LOAD) with Megatron's --finetune semantics.
CPT_RECIPES = ("legacy", "constant_cooldown", "cooldown")
STRATEGIES = ("fsdp", "zero1")

# The ConfigDict keys (agpt_jax/recipes.py) and the launcher variables each one defaults from
# (several: the first set one wins, agpt_jax/recipes.py).
ENV_OF_KEY: dict[str, tuple[str, ...]] = {f.key: f.env for f in recipes.SCHEMA if f.env}
KEYS: tuple[str, ...] = tuple(f.key for f in recipes.SCHEMA)


class ConfigError(ValueError):
    """The run configuration is wrong; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid run config:\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from.

    Attributes:
        file_list: the DATA_FILE_LIST (`weight prefix corpus` lines).
        split: Megatron's --split ("990,10,0": train, valid, test parts).
        seed: Megatron's --seed (sample shuffles and the random init).
        cache_dir: where the sample and blend index arrays are cached.
        shuffle_sample_in_corpus: Megatron's --shuffle-sample-in-corpus, which AuroraGPT's
            launcher always passes: each corpus's samples are shuffled once more (spec §5.5).
        blend_sample_in_corpus: Megatron's --blend-sample-in-corpus (the 2024 launcher passed it;
            the current one does not): a corpus's files are blended by weight, not concatenated.
    """

    file_list: str
    split: str
    seed: int
    cache_dir: str
    shuffle_sample_in_corpus: bool = True
    blend_sample_in_corpus: bool = False


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batch arithmetic, as Megatron computes it.

    Attributes:
        micro_batch: sequences per data-parallel rank per micro-step (MICRO_BATCH).
        grad_acc_steps: micro-steps per update (GRAD_ACC_STEPS).
        data_parallel: data x fsdp mesh size.
        global_batch_size: micro_batch x grad_acc_steps x data_parallel (GLOBAL_BATCH).
        seq_length: tokens per sequence (SEQ).
    """

    micro_batch: int
    grad_acc_steps: int
    data_parallel: int
    global_batch_size: int
    seq_length: int

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints in and out.

    Attributes:
        load: the checkpoint to start from (LOAD): an agpt-jax checkpoint, a run's SAVE folder, a
            DeepSpeed universal checkpoint or a DeepSpeed ZeRO-1 checkpoint (TP = PP = 1); "" for
            random init.
        save_interval: iterations between saves (SAVE_INTERVAL); also saved at the end and on
            SIGTERM/SIGUSR1.
        keep: newest checkpoints kept.
        load_optimizer_state: restore Adam moments and step from `load` (Megatron's universal
            load does, spec §2.6); False starts fresh moments.
        reset_iteration: Megatron's --finetune: iteration, schedule and consumed samples start at 0.
        universal_checkpoint: Megatron's --universal-checkpoint: LOAD must be a DeepSpeed universal
            checkpoint (checked before anything runs); False detects the kind of LOAD.
        allow_cooled_down_source: constant_cooldown only: accept a source whose LR was decayed.
        origin: the LOAD the user gave when the checkpoint border (converters.load) replaced it
            by its conversion (a universal or ZeRO checkpoint); "" when `load` is what the user
            gave.
    """

    load: str
    save_interval: int
    keep: int
    load_optimizer_state: bool
    reset_iteration: bool
    allow_cooled_down_source: bool
    universal_checkpoint: bool = False
    origin: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated; library code reads only this.

    Attributes:
        recipe: legacy | constant_cooldown | cooldown | pretrain.
        scale: the config argument (agpt_7b | demo | smoke).
        run_dir: SAVE (or run_dir): config.json, metrics, LR schedule, checkpoints/.
        model, data, batch, schedule, optim, mesh, checkpoint: the parts.
        train_iters: iterations of this run (Megatron's --train-iters).
        stop_at_iteration: stop (with a checkpoint) after this iteration; 0 = train_iters.
        cooldown_tokens: cooldown recipe: the branch length in tokens (0 otherwise).
        eval_interval, eval_iters: evaluation every eval_interval iterations on eval_iters batches.
        log_interval: iterations between console log lines (metrics are written every iteration).
        max_skipped_in_a_row: stop after this many consecutive non-finite updates.
        peak_tflops_per_device: MFU denominator; 0 = the platform's (Runtime.capabilities).
        strategy: fsdp | zero1 (agpt_jax.sharding).
        platform: auto | cpu | xpu (agpt_jax.runtime.initialize).
        progress_bar: tqdm bar with ETA on process 0.
        notes: human-readable resolution notes (which variable won, derived numbers).
    """

    recipe: str
    scale: str
    run_dir: str
    model: model_lib.GPTConfig
    data: DataConfig
    batch: BatchConfig
    schedule: schedules.ScheduleConfig
    optim: optim.OptimConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    train_iters: int
    stop_at_iteration: int
    cooldown_tokens: int
    eval_interval: int
    eval_iters: int
    log_interval: int
    max_skipped_in_a_row: int
    peak_tflops_per_device: float
    strategy: str
    platform: str
    progress_bar: bool
    notes: tuple[str, ...] = ()

    @property
    def last_iteration(self) -> int:
        """The iteration after which this invocation stops."""
        return self.stop_at_iteration or self.train_iters

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (saved as config.json and in checkpoint metadata)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def field_name(key: str) -> str:
    env = ENV_OF_KEY.get(key)
    return f"config.{key}" + (f" (env {' or '.join(env)})" if env else "")


def _model(c: Mapping[str, Any], problems: list[str]) -> model_lib.GPTConfig | None:
    try:
        base = model_lib.get_preset(c["model"])
    except ValueError as e:
        problems.append(f"{field_name('model')}: {e}")
        return None
    changes: dict[str, Any] = {"seq_length": int(c["seq_length"])}
    for key in ("compute_dtype", "attention", "remat"):
        if c[key]:
            changes[key] = c[key]
    if int(c["tp"]) > 1:
        changes["tensor_parallel_for_padding"] = int(c["tp"])
    try:
        return base.replace(**changes)
    except (ValueError, TypeError) as e:
        problems.append(f"config.model={c['model']!r} with {changes}: {e}")
        return None


def _mesh(c: Mapping[str, Any], device_count: int,
          problems: list[str]) -> tuple[MeshConfig | None, int]:
    tp = int(c["tp"])
    try:
        mesh = parse_mesh(c["mesh"]) if c["mesh"] else MeshConfig(data=1, fsdp=-1, tensor=tp)
    except ValueError as e:
        problems.append(f"{field_name('mesh')}: {e}")
        return None, 0
    if c["mesh"] and mesh.tensor != tp and tp != 1:
        problems.append(f"config.mesh={c['mesh']!r} has tensor={mesh.tensor} but {field_name('tp')} "
                        f"is {tp}; make them agree")
        return None, 0
    try:
        data, fsdp, _ = mesh.resolve(device_count)
    except ValueError as e:
        problems.append(f"{field_name('mesh')}={c['mesh'] or 'default'} on {device_count} devices: {e}")
        return None, 0
    return mesh, data * fsdp


def _positive(c: Mapping[str, Any], keys: tuple[str, ...], problems: list[str]) -> None:
    for key in keys:
        if int(c[key]) < 1:
            problems.append(f"{field_name(key)}={c[key]} must be a positive integer")


def from_config(config: Mapping[str, Any], device_count: int,
                check_paths: bool = True) -> RunConfig:
    """Validates a ConfigDict from configs/*.py and resolves the derived numbers.

    Args:
        config: the ConfigDict (or any mapping with the keys of agpt_jax/recipes.py).
        device_count: devices across all processes (the mesh and data-parallel size need it).
        check_paths: check that LOAD exists (the dry run and the run both do).

    Returns:
        The frozen RunConfig.

    Raises:
        ConfigError: every problem, one line each, naming the key, the env variable and the fix.
    """
    c = dict(config.items()) if hasattr(config, "items") else dict(config)
    problems: list[str] = []
    unknown = sorted(set(c) - set(KEYS))
    missing = sorted(set(KEYS) - set(c))
    if unknown:
        problems.append(f"unknown config keys {unknown}; the keys are those of agpt_jax/recipes.py")
    if missing:
        problems.append(f"config keys {missing} are missing; build configs with "
                        "agpt_jax/recipes.py:base_config")
    if problems:
        raise ConfigError(problems)
    notes = [f"lr_warmup_frac={c['lr_warmup_frac']} (environment: {c['lr_warmup_frac_note']})"]

    recipe = c["recipe"]
    if recipe not in RECIPES:
        problems.append(f"config.recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
    for key, choices in (("strategy", STRATEGIES), ("platform", PLATFORMS)):
        if c[key] not in choices:
            problems.append(f"config.{key}={c[key]!r}: choose one of {', '.join(choices)}")
    _positive(c, ("micro_batch", "seq_length", "save_interval",
                  "eval_interval", "log_interval", "keep_checkpoints", "max_skipped_in_a_row",
                  "tp"), problems)
    for key in ("grad_acc_steps", "eval_iters", "train_tokens", "train_iters", "global_batch",
                "stop_at_iteration",
                "lr_warmup_iters", "lr_decay_iters", "cooldown_tokens"):
        if int(c[key]) < 0:
            problems.append(f"{field_name(key)}={c[key]} must be >= 0")
    model = _model(c, problems)
    mesh, dp = _mesh(c, device_count, problems)

    # Data and run directory.
    if not c["data_file_list"]:
        problems.append("config.data_file_list is empty: set DATA_FILE_LIST=<list file> or "
                        "--config.data_file_list=<list file> (lines 'weight prefix corpus')")
    run_dir = c["run_dir"] or c["save"]
    if not run_dir:
        problems.append("no run directory: set SAVE=<dir> or --config.save=<dir> "
                        "(or --config.run_dir=<dir>)")
    load = c["load"]
    if recipe in CPT_RECIPES and not load:
        problems.append(f"recipe {recipe} continues a checkpoint but LOAD is empty: set LOAD=<dir> "
                        "or --config.load=<dir> (agpt-jax checkpoint, run SAVE dir or universal "
                        "checkpoint)")
    if recipe == "pretrain" and load:
        problems.append(f"recipe pretrain starts from random weights but config.load={load!r}; "
                        "unset it, or use configs/legacy.py to continue a checkpoint")
    if load and check_paths and not os.path.exists(load):
        problems.append(f"{field_name('load')}={load!r} does not exist; give an existing checkpoint")
    elif c["universal_checkpoint"] and not load:
        problems.append("--universal-checkpoint (config.universal_checkpoint) needs LOAD: set "
                        "LOAD=<universal checkpoint root> or --config.load=<dir>")
    # Whether LOAD is the universal checkpoint --universal-checkpoint promises is checked at the
    # checkpoint border (converters.load), which owns DeepSpeed's layout.

    # Batch arithmetic (spec §1.2: GLOBAL_BATCH = WORLD_SIZE * MICRO_BATCH * GRAD_ACC_STEPS / TP).
    batch = None
    micro, acc, want = int(c["micro_batch"]), int(c["grad_acc_steps"]), int(c["global_batch"])
    if dp and micro > 0 and acc == 0 and not want:
        problems.append(f"{field_name('grad_acc_steps')}=0 derives the accumulation steps from "
                        f"{field_name('global_batch')}, which is not set; set one of them")
    elif dp and micro > 0 and acc == 0:
        # Megatron: num_micro_batches = global_batch_size // (micro_batch_size x data_parallel).
        if want % (micro * dp):
            problems.append(f"{field_name('global_batch')}={want} is not a multiple of micro_batch "
                            f"{micro} x data-parallel size {dp} = {micro * dp}; choose a multiple "
                            "or set GRAD_ACC_STEPS")
        else:
            acc = want // (micro * dp)
            notes.append(f"grad_acc_steps={acc} from global_batch {want} / (micro_batch {micro} x "
                         f"data-parallel size {dp})")
    if dp and micro > 0 and acc > 0:
        gbs = micro * acc * dp
        if want and want != gbs:
            problems.append(
                f"{field_name('global_batch')}={want} but micro_batch {micro} x grad_acc_steps {acc} "
                f"x data-parallel size {dp} = {gbs}; set GLOBAL_BATCH={gbs} (or 0), or change "
                f"MICRO_BATCH / GRAD_ACC_STEPS")
        else:
            batch = BatchConfig(micro_batch=micro, grad_acc_steps=acc, data_parallel=dp,
                                global_batch_size=gbs, seq_length=int(c["seq_length"]))

    # Iterations (spec §1.3: bash integer division, left to right).
    train_iters = 0
    if batch is not None:
        seq, gbs = batch.seq_length, batch.global_batch_size
        if recipe == "cooldown":
            if int(c["train_tokens"]) or int(c["train_iters"]):
                problems.append("recipe cooldown takes its length from config.cooldown_tokens; "
                                "set TRAIN_TOKENS/TRAIN_ITERS (train_tokens/train_iters) to 0")
            train_iters = int(c["cooldown_tokens"]) // seq // gbs
            what = f"config.cooldown_tokens={c['cooldown_tokens']}"
        elif int(c["train_tokens"]) and int(c["train_iters"]):
            problems.append(f"both {field_name('train_tokens')}={c['train_tokens']} and "
                            f"{field_name('train_iters')}={c['train_iters']} are set; set one to 0")
            what = ""
        elif int(c["train_tokens"]):
            train_iters = int(c["train_tokens"]) // seq // gbs
            what = f"{field_name('train_tokens')}={c['train_tokens']}"
        else:
            train_iters = int(c["train_iters"])
            what = f"{field_name('train_iters')}={c['train_iters']}"
        if what and train_iters < 1:
            problems.append(f"{what} gives {train_iters} iterations: one iteration takes SEQ "
                            f"{seq} x GLOBAL_BATCH {gbs} = {seq * gbs} tokens; train longer")
        elif what:
            notes.append(f"train_iters={train_iters} from {what} (SEQ {seq}, GLOBAL_BATCH {gbs})")
    stop = int(c["stop_at_iteration"])
    if train_iters and stop > train_iters:
        problems.append(f"config.stop_at_iteration={stop} is beyond train_iters={train_iters}")

    # Schedule and optimizer.
    schedule = optimizer = None
    style = schedules.DECAY_STYLES.get(c["lr_decay_style"])  # unknown: ScheduleConfig says so
    if float(c["cooldown_frac"]) and style is not None and not style.accepts_cooldown:
        cooling = [s.name for s in schedules.DECAY_STYLES.values() if s.accepts_cooldown]
        problems.append(f"config.cooldown_frac={c['cooldown_frac']} needs "
                        f"lr_decay_style {' or '.join(map(repr, cooling))} (LR_DECAY_STYLE), not "
                        f"{c['lr_decay_style']!r}")
    elif train_iters and batch is not None:
        frac = float(c["lr_warmup_frac"])
        try:
            schedule = schedules.ScheduleConfig(
                style=c["lr_decay_style"], max_lr=float(c["lr"]), min_lr=float(c["min_lr"]),
                train_iters=train_iters, decay_iters=int(c["lr_decay_iters"]) or None,
                warmup_fraction=frac if frac > 0 else None,
                warmup_iters=int(c["lr_warmup_iters"]),
                constant_plus_cooldown=float(c["cooldown_frac"]) > 0,
                cooldown_frac=float(c["cooldown_frac"]) or 0.05,
                global_batch_size=batch.global_batch_size)
        except ValueError as e:
            problems.append(f"LR schedule (config.lr, min_lr, lr_decay_style, lr_warmup_frac, "
                            f"cooldown_frac): {e}")
    try:
        optimizer = optim.OptimConfig(beta1=float(c["adam_beta1"]), beta2=float(c["adam_beta2"]),
                                      eps=float(c["adam_eps"]),
                                      weight_decay=float(c["weight_decay"]),
                                      clip_grad=float(c["clip_grad"]))
    except ValueError as e:
        problems.append(f"optimizer (config.adam_*, weight_decay, clip_grad): {e}")
    if float(c["peak_tflops_per_device"]) < 0:
        problems.append("config.peak_tflops_per_device must be >= 0 (0 = the platform's table)")
    if problems:
        raise ConfigError(problems)
    assert model and mesh and batch and schedule and optimizer  # every failure was reported

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    data = DataConfig(file_list=os.path.abspath(os.path.expanduser(c["data_file_list"])),
                      split=c["split"], seed=int(c["seed"]),
                      cache_dir=c["data_cache_dir"] or os.path.join(run_dir, "data_cache"),
                      shuffle_sample_in_corpus=bool(c["shuffle_sample_in_corpus"]),
                      blend_sample_in_corpus=bool(c["blend_sample_in_corpus"]))
    ckpt = CheckpointConfig(
        load=os.path.abspath(os.path.expanduser(load)) if load else "",
        save_interval=int(c["save_interval"]), keep=int(c["keep_checkpoints"]),
        load_optimizer_state=bool(c["load_optimizer_state"]),
        reset_iteration=bool(c["reset_iteration"]),
        allow_cooled_down_source=bool(c["allow_cooled_down_source"]),
        universal_checkpoint=bool(c["universal_checkpoint"]))
    return RunConfig(
        recipe=recipe, scale=c["scale"], run_dir=run_dir, model=model, data=data, batch=batch,
        schedule=schedule, optim=optimizer, mesh=mesh, checkpoint=ckpt, train_iters=train_iters,
        stop_at_iteration=stop, cooldown_tokens=int(c["cooldown_tokens"]),
        eval_interval=int(c["eval_interval"]), eval_iters=int(c["eval_iters"]),
        log_interval=int(c["log_interval"]), max_skipped_in_a_row=int(c["max_skipped_in_a_row"]),
        peak_tflops_per_device=float(c["peak_tflops_per_device"]), strategy=c["strategy"],
        platform=c["platform"], progress_bar=bool(c["progress_bar"]), notes=tuple(notes))


# Fields of GPTConfig that must match between LOAD and the configured model.
_MATCHED_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
                   "vocab_size", "rope_theta", "norm_eps")


def check_model(cfg: RunConfig, found: model_lib.GPTConfig, where: str) -> None:
    """Raises ConfigError listing every shape field on which LOAD's model (`found`, read from
    `where`) differs from the configured one."""
    diffs = [f"{f}: checkpoint {getattr(found, f)} vs config {getattr(cfg.model, f)}"
             for f in _MATCHED_FIELDS if getattr(found, f) != getattr(cfg.model, f)]
    if diffs:
        raise ConfigError([f"LOAD {where} holds another model than config.model="
                           f"{cfg.scale}: {d}; load a checkpoint of this model size or choose "
                           "the config scale that matches it" for d in diffs])


def describe(cfg: RunConfig) -> str:
    """Multi-line human summary of the resolved config and its derived numbers."""
    b, s = cfg.batch, cfg.schedule
    lines = [
        f"recipe {cfg.recipe} ({cfg.scale}), run dir {cfg.run_dir}",
        f"model {cfg.model}",
        f"params {cfg.model.num_params():,}",
        f"data {cfg.data.file_list} split {cfg.data.split} seed {cfg.data.seed}"
        f" shuffle_sample_in_corpus {cfg.data.shuffle_sample_in_corpus} blend_sample_in_corpus "
        f"{cfg.data.blend_sample_in_corpus}",
        f"batch: micro {b.micro_batch} x grad-acc {b.grad_acc_steps} x data-parallel "
        f"{b.data_parallel} = global {b.global_batch_size} sequences of {b.seq_length} tokens "
        f"({b.tokens_per_iteration:,} tokens/iteration)",
        f"iterations {cfg.train_iters} ({cfg.train_iters * b.tokens_per_iteration:,} tokens, "
        f"{cfg.train_iters * b.global_batch_size:,} samples)"
        + (f", stopping after {cfg.stop_at_iteration}" if cfg.stop_at_iteration else ""),
        f"schedule {s.style} lr {s.max_lr} min_lr {s.min_lr} warmup_fraction "
        f"{s.warmup_fraction} warmup_iters {s.warmup_iters} decay_iters {s.lr_decay_iters}"
        + (f" cooldown_frac {s.cooldown_frac}" if s.constant_plus_cooldown else ""),
        f"optimizer {cfg.optim}",
        f"mesh {cfg.mesh} strategy {cfg.strategy} platform {cfg.platform}",
        f"load {cfg.checkpoint.load or '(random init)'} optimizer state "
        f"{'loaded' if cfg.checkpoint.load_optimizer_state else 'fresh'}, reset iteration "
        f"{cfg.checkpoint.reset_iteration}; save every {cfg.checkpoint.save_interval}, keep "
        f"{cfg.checkpoint.keep}",
        f"eval every {cfg.eval_interval} iterations on {cfg.eval_iters} batches",
    ]
    lines += list(cfg.notes)
    return "\n".join(lines)


def log_config(cfg: RunConfig) -> None:
    """Logs `describe(cfg)` line by line."""
    for line in describe(cfg).splitlines():
        logging.info("config: %s", line)


def write_config_json(cfg: RunConfig, path: str) -> None:
    """Writes the resolved config (RunConfig.to_json) to `path` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_json(), f, indent=1)
    os.replace(tmp, path)
