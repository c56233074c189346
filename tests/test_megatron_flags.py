"""Megatron's flags and the seed's commands in scripts/cpt.py.

The dry runs at the bottom are the seed's two CPT commands (and variations: cooldown length,
--min-lr, LR/2 and 2LR, warmup fractions and iterations) on a one-device machine planning a
2-node Aurora job: the LR of every iteration in lr_schedule.csv must equal Megatron's scheduler
(`OptimizerParamScheduler.get_lr`, spec megatron-deepspeed.md §2.1-2.3), written here from the
spec and not from agpt_jax.optim.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from agpt_jax import config as config_lib
from agpt_jax import megatron_flags as mf

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPT = str(ROOT / "scripts" / "cpt.py")
UNIVERSAL = str(ROOT / "tests" / "fixtures" / "universal_tiny")

# The flags the seed's commands and the ALCF notes pass (the list), as Megatron spells them.
MEGATRON_ACCEPTED = {
    "--universal-checkpoint": None, "--finetune": None, "--lr_constant_plus_cooldown": None,
    "--lr_constant_plus_cooldown_frac": "0.2", "--min-lr": "2e-5", "--lr-decay-style": "cosine",
    "--lr-warmup-fraction": "0.01", "--lr-warmup-iters": "10", "--lr": "1e-4",
    "--train-iters": "100", "--micro-batch-size": "2", "--global-batch-size": "64",
    "--seed": "7", "--save-interval": "5", "--eval-interval": "10", "--eval-iters": "3",
    # Always passed by the launcher (ALCF/helpers.sh); the 2024 one also passed the second.
    "--shuffle-sample-in-corpus": None, "--blend-sample-in-corpus": None,
}
LAUNCHER_VARS = ("DATA_FILE_LIST", "LOAD", "SAVE", "TRAIN_TOKENS", "TRAIN_ITERS", "TRAIN_ITER",
                 "GRAD_ACC_STEPS", "MICRO_BATCH", "GLOBAL_BATCH", "SEQ", "LR", "LR_DECAY_STYLE",
                 "LR_WARMUP_FRAC", "LR_WARMUP_FRACTION", "MIN_LR", "SAVE_INTERVAL",
                 "EVAL_INTERVAL", "EVAL_ITERS", "TP", "LR_DECAY_ITERS", "NGPUS", "NHOSTS",
                 "NGPU_PER_HOST", "PBS_NODEFILE", "SEED", "SPLIT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def load_config(recipe: str, arg: str, environ=None):
    spec = importlib.util.spec_from_file_location(f"mf_{recipe}", ROOT / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg, environ={} if environ is None else environ)


def fresh_flags() -> flags.FlagValues:
    values = flags.FlagValues()
    mf.define(values)
    flags.DEFINE_string("config", None, "", flag_values=values)
    return values


# ------------------------------------------------------------------------------------------------
# Parsing and refusing.


def test_every_seed_flag_parses_as_megatron_spells_it():
    values = fresh_flags()
    argv = ["cpt.py"]
    for name, value in MEGATRON_ACCEPTED.items():
        argv += [name] if value is None else [name, value]  # Megatron's `--flag value` form
    assert values(argv) == ["cpt.py"]
    assert mf.refusal(argv, values) is None
    for name, value in MEGATRON_ACCEPTED.items():
        got = values[name[2:]]
        assert got.present, name
        if value is None:
            assert got.value is True, name
        elif isinstance(got.value, str):
            assert got.value == value, name
        else:
            assert got.value == float(value), name


@pytest.mark.parametrize("flag,field", [
    ("--seq-length", r"config.seq_length (env SEQ)"),
    ("--num-layers", "config.model"),
    ("--tensor-model-parallel-size", "config.tp (env TP)"),
    ("--data-file-list", "config.data_file_list (env DATA_FILE_LIST)"),
    ("--zero-stage", "config.strategy"),
    ("--lr-decay-iters", "config.lr_decay_iters (env LR_DECAY_ITERS)"),
    ("--adam-beta2", "config.adam_beta2"),
    ("--load", "config.load (env LOAD)"),
])
def test_other_megatron_flags_are_refused_naming_the_config_field(flag, field):
    line = mf.refusal(["cpt.py", "--config", "x.py", flag, "3"], fresh_flags())
    assert line is not None and f"Megatron's {flag} is not taken" in line and field in line


def test_an_unknown_flag_lists_the_accepted_megatron_flags():
    line = mf.refusal(["cpt.py", "--frobnicate=1"], fresh_flags())
    assert "unknown flag --frobnicate" in line
    assert all(name in line for name in MEGATRON_ACCEPTED)
    # Config overrides, negated switches and values are not flags to refuse.
    assert mf.refusal(["cpt.py", "--config.lr=1", "--nofinetune", "--lr", "-1"],
                      fresh_flags()) is None


# ------------------------------------------------------------------------------------------------
# Megatron's rules.


def test_the_cooldown_length_needs_the_switch_unless_the_recipe_cools_down():
    cd = load_config("legacy", "smoke")
    with pytest.raises(mf.FlagError, match="without --lr_constant_plus_cooldown: Megatron reads"):
        mf.apply(cd, {"lr_constant_plus_cooldown_frac": 0.2}, set())
    cd = load_config("legacy", "smoke")
    mf.apply(cd, {"lr-decay-style": "constant", "lr_constant_plus_cooldown": True}, set())
    assert cd.cooldown_frac == 0.05 and cd.lr_decay_style == "constant"  # Megatron's default
    cd = load_config("constant_cooldown", "smoke")
    applied = mf.apply(cd, {"lr_constant_plus_cooldown_frac": 0.2}, set())
    assert cd.cooldown_frac == 0.2 and applied.keys["cooldown_frac"].endswith("0.2")
    cd = load_config("constant_cooldown", "smoke")
    mf.apply(cd, {"lr_constant_plus_cooldown": False}, set())
    assert cd.cooldown_frac == 0.0


def test_warmup_iters_apply_only_without_a_warmup_fraction():
    cd = load_config("legacy", "smoke")  # the recipe's warmup fraction is 0.05
    mf.apply(cd, {"lr-warmup-iters": 3}, set())
    cfg = config_lib.from_config(_paths(cd), 1, check_paths=False)
    assert cfg.schedule.warmup_fraction is None and cfg.schedule.warmup_iters == 3
    cd = load_config("legacy", "smoke")
    applied = mf.apply(cd, {"lr-warmup-iters": 3, "lr-warmup-fraction": 0.25}, set())
    cfg = config_lib.from_config(_paths(cd), 1, check_paths=False)
    assert cfg.schedule.warmup_fraction == 0.25
    assert any("has no effect" in n for n in applied.notes)


def test_global_batch_size_sets_the_accumulation_steps_as_megatron_does():
    cd = load_config("legacy", "smoke")  # micro batch 1
    mf.apply(cd, {"global-batch-size": 48, "micro-batch-size": 2}, set())
    cfg = config_lib.from_config(_paths(cd), 8, check_paths=False)
    # num_micro_batches = global / (micro x data-parallel) = 48 / (2 x 8)
    assert (cfg.batch.grad_acc_steps, cfg.batch.global_batch_size) == (3, 48)
    # GRAD_ACC_STEPS given: Megatron would assert; agpt-jax reports the mismatch.
    cd = load_config("legacy", "smoke", {"GRAD_ACC_STEPS": "2"})
    mf.apply(cd, {"global-batch-size": 48}, {"grad_acc_steps"})
    with pytest.raises(config_lib.ConfigError, match="GLOBAL_BATCH=16"):
        config_lib.from_config(_paths(cd), 8, check_paths=False)
    cd = load_config("legacy", "smoke")
    mf.apply(cd, {"global-batch-size": 20}, set())
    with pytest.raises(config_lib.ConfigError, match="not a multiple of micro_batch 1 x "
                                                     "data-parallel size 8"):
        config_lib.from_config(_paths(cd), 8, check_paths=False)


def test_train_iters_replaces_train_tokens():
    cd = load_config("legacy", "agpt_7b")  # 22e9 tokens by default
    applied = mf.apply(cd, {"train-iters": 10}, set())
    assert (cd.train_iters, cd.train_tokens) == (10, 0)
    assert any("replaces train_tokens=22000000000" in n for n in applied.notes)
    assert any("train_alcf.sh would have dropped it" in n for n in applied.notes)


def _paths(cd):
    cd.data_file_list, cd.save = "/nonexistent/list.txt", "/nonexistent/run"
    if cd.recipe != "pretrain":
        cd.load = "/nonexistent/ckpt"
    return cd


# ------------------------------------------------------------------------------------------------
# The seed's commands, dry-run on a one-device login node for a 2-node job.


def megatron_lr(n: float, *, max_lr: float, min_lr: float, warmup: float, decay: float,
                style: str, cooldown_frac: float | None = None) -> float:
    """OptimizerParamScheduler.get_lr (spec §2.2, §2.3), steps counted in samples."""
    if warmup > 0 and n <= warmup:
        return max_lr * n / warmup
    if style == "constant" and cooldown_frac is not None:
        n_, t_ = n - warmup, decay - warmup
        if n_ >= t_:
            return min_lr
        c = int(cooldown_frac * decay)
        if n_ < t_ - c:
            return max_lr
        ratio = min(max((n_ - (t_ - c)) / c, 0.0), 1.0)
        return min_lr + (max_lr - min_lr) * (1.0 - math.sqrt(ratio))
    if style == "constant":
        return max_lr
    if n > decay:
        return min_lr
    r = (n - warmup) / (decay - warmup)
    if style == "cosine":
        return min_lr + (max_lr - min_lr) * 0.5 * (math.cos(math.pi * r) + 1.0)
    return min_lr + (max_lr - min_lr) * (1.0 - r)  # linear


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A DATA_FILE_LIST of two small corpora and a 2-host PBS_NODEFILE."""
    from agpt_jax.data.indexed import write_indexed_dataset

    d = tmp_path_factory.mktemp("seed")
    rng = np.random.default_rng(0)
    for name in ("papers", "dolma"):
        write_indexed_dataset(str(d / name), [rng.integers(3, 32000, size=int(n))
                                              for n in rng.integers(50, 900, size=60)], np.uint16)
    (d / "mix.txt").write_text(f"0.9 {d / 'papers'} papers\n0.1 {d / 'dolma'} dolma\n")
    (d / "nodefile").write_text("x4102c5s0b0n0\nx4102c5s1b0n0\n")
    return d


# (name, recipe, env, flags, expected schedule); 2 Aurora nodes = 24 tiles, MICRO_BATCH 1.
PHASE2_ENV = {"TRAIN_TOKENS": str(22 * 10**9), "GRAD_ACC_STEPS": "16", "LR": "0.0002",
              "LR_DECAY_STYLE": "constant", "LR_WARMUP_FRAC": "0.0"}
PHASE2_FLAGS = ["--universal-checkpoint", "--finetune", "--lr_constant_plus_cooldown"]
LEGACY_ENV = {"TRAIN_TOKENS": str(22 * 10**9), "GRAD_ACC_STEPS": "16", "LR": "0.0002",
              "LR_WARMUP_FRACTION": "0.01"}
LEGACY_FLAGS = ["--universal-checkpoint", "--finetune"]
GBS = 1 * 16 * 24
ITERS = 22 * 10**9 // 4096 // GBS
SEED_CASES = [
    ("phase2 as the seed, NHOSTS=2", "constant_cooldown", dict(PHASE2_ENV, NHOSTS="2"),
     PHASE2_FLAGS, dict(max_lr=2e-4, min_lr=0.0, w=0.0, style="constant", frac=0.05)),
    ("phase2 cooldown 0.2 to 2e-5 as flags, PBS_NODEFILE", "constant_cooldown",
     dict(PHASE2_ENV, PBS_NODEFILE="{nodefile}"),
     PHASE2_FLAGS + ["--lr_constant_plus_cooldown_frac", "0.2", "--min-lr", "2e-5"],
     dict(max_lr=2e-4, min_lr=2e-5, w=0.0, style="constant", frac=0.2)),
    ("phase2 cooldown 0.2 to 2e-5 as env and config, NGPUS=24", "constant_cooldown",
     dict(PHASE2_ENV, MIN_LR="2e-5", NGPUS="24"), ["--config.cooldown_frac=0.2"],
     dict(max_lr=2e-4, min_lr=2e-5, w=0.0, style="constant", frac=0.2)),
    ("phase2 entirely as Megatron flags, --world_size 24", "constant_cooldown", {},
     PHASE2_FLAGS + ["--lr", "0.0002", "--lr-decay-style", "constant", "--lr-warmup-fraction",
                     "0.0", "--micro-batch-size", "1", "--global-batch-size", str(GBS),
                     "--train-iters", str(ITERS), "--world_size", "24"],
     dict(max_lr=2e-4, min_lr=0.0, w=0.0, style="constant", frac=0.05)),
    # The CPT notes' command: LR_WARMUP_FRACTION is not read by the launcher, so 0.05 applies.
    ("legacy as the seed, PBS_NODEFILE", "legacy", dict(LEGACY_ENV, PBS_NODEFILE="{nodefile}"),
     LEGACY_FLAGS, dict(max_lr=2e-4, min_lr=0.0, w=0.05, style="cosine")),
    ("legacy LR/2 as a flag", "legacy", dict(LEGACY_ENV, NHOSTS="2"),
     LEGACY_FLAGS + ["--lr", "1e-4"], dict(max_lr=1e-4, min_lr=0.0, w=0.05, style="cosine")),
    ("legacy 2LR as env, warmup fraction 0.01 as a flag", "legacy",
     dict(LEGACY_ENV, LR="0.0004", NHOSTS="2"), LEGACY_FLAGS + ["--lr-warmup-fraction", "0.01"],
     dict(max_lr=4e-4, min_lr=0.0, w=0.01, style="cosine")),
    ("legacy warmup 100 iterations and min-lr", "legacy", dict(LEGACY_ENV, NHOSTS="2"),
     LEGACY_FLAGS + ["--lr-warmup-iters", "100", "--min-lr", "2e-5"],
     dict(max_lr=2e-4, min_lr=2e-5, w_iters=100, style="cosine")),
]


def _dry_run(job, recipe, env, argv, tmp_path):
    save = tmp_path / "run"
    child = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    child.update({k: v.format(nodefile=job / "nodefile") for k, v in env.items()})
    child.update(DATA_FILE_LIST=str(job / "mix.txt"), LOAD=UNIVERSAL, SAVE=str(save),
                 JAX_PLATFORMS="cpu")
    child["XLA_FLAGS"] = " ".join(f for f in child.get("XLA_FLAGS", "").split()
                                  if "device_count" not in f)
    proc = subprocess.run([sys.executable, CPT, "--config", f"configs/{recipe}.py:agpt_7b",
                           "--dry_run", "--num_cpu_devices=1", *argv],
                          cwd=ROOT, env=child, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(save / "lr_schedule.csv") as f:
        rows = list(csv.DictReader(f))
    with open(save / "config.json") as f:
        config = json.load(f)
    return proc.stdout, rows, config


@pytest.mark.parametrize("name,recipe,env,argv,want", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_dry_run_lr_is_megatrons_for_the_seed_commands(job, tmp_path, name, recipe, env, argv,
                                                       want):
    out, rows, config = _dry_run(job, recipe, env, argv, tmp_path)
    assert "dry run: world size 24 from " in out
    assert config["batch"]["global_batch_size"] == GBS and config["train_iters"] == ITERS
    decay = ITERS * GBS  # lr_decay_steps = lr_decay_iters (= train_iters) x GBS, in samples
    warmup = want["w"] * decay if "w" in want else want["w_iters"] * GBS
    expected = np.array([megatron_lr((k - 1) * GBS, max_lr=want["max_lr"], min_lr=want["min_lr"],
                                     warmup=warmup, decay=decay, style=want["style"],
                                     cooldown_frac=want.get("frac"))
                         for k in range(1, ITERS + 1)])
    got = np.array([float(r["lr"]) for r in rows])
    assert [int(r["iteration"]) for r in rows] == list(range(1, ITERS + 1))
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7 * want["min_lr"])
    if want.get("frac"):
        # The cooldown spans the last frac of the run and ends near min_lr.
        cooling = np.flatnonzero(expected < want["max_lr"])
        assert abs(len(cooling) - want["frac"] * ITERS) <= 2
    # Where each setting came from is in the log and in config.json.
    notes = "\n".join(config["notes"])
    for flag in argv:
        if flag in ("--universal-checkpoint", "--finetune"):
            assert f"from Megatron flag {flag}" in notes
    if "GRAD_ACC_STEPS" in env:
        assert "setting grad_acc_steps=16 from env GRAD_ACC_STEPS=16" in out


def test_dry_run_without_a_job_size_says_it_plans_this_machine(job, tmp_path):
    out, rows, config = _dry_run(job, "constant_cooldown", {"TRAIN_ITERS": "20"}, [], tmp_path)
    assert "world size 1 from the 1 device(s) of this machine" in out
    assert config["batch"]["global_batch_size"] == 1 and len(rows) == 20
