"""Run configs: every recipe at every scale resolves; launcher arithmetic; one-line errors."""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import numpy as np
import pytest

from agpt_jax import config as config_lib
from agpt_jax import schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("legacy", "constant_cooldown", "cooldown", "pretrain")
LAUNCHER_VARS = ("DATA_FILE_LIST", "LOAD", "SAVE", "TRAIN_TOKENS", "TRAIN_ITERS", "TRAIN_ITER",
                 "GRAD_ACC_STEPS", "MICRO_BATCH", "GLOBAL_BATCH", "SEQ", "LR", "LR_DECAY_STYLE",
                 "LR_WARMUP_FRAC", "LR_WARMUP_FRACTION", "MIN_LR", "SAVE_INTERVAL",
                 "EVAL_INTERVAL", "EVAL_ITERS", "TP", "LR_DECAY_ITERS")


def load_config(recipe: str, arg: str):
    path = ROOT / "configs" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{recipe}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def paths(tmp_path):
    data = tmp_path / "list.txt"
    data.write_text("1.0 x web\n")
    load = tmp_path / "ckpt"
    load.mkdir()
    return {"data_file_list": str(data), "load": str(load), "save": str(tmp_path / "run")}


def resolve(cd, paths, devices=8, **over):
    for k, v in {**paths, **over}.items():
        if k == "load" and cd.recipe == "pretrain":
            continue
        setattr(cd, k, v)
    return config_lib.from_config(cd, devices)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arg", ["smoke", "demo", "agpt_7b"])
def test_every_config_resolves(recipe, arg, paths):
    cd = load_config(recipe, arg)
    assert set(cd.keys()) == set(config_lib.KEYS)
    cfg = resolve(cd, paths, devices=8)
    b = cfg.batch
    assert b.global_batch_size == b.micro_batch * b.grad_acc_steps * b.data_parallel
    assert cfg.train_iters >= 1 and cfg.schedule.train_iters == cfg.train_iters
    assert cfg.checkpoint.reset_iteration == (recipe != "pretrain")
    if recipe in ("constant_cooldown", "cooldown"):
        assert cfg.schedule.style == "constant" and cfg.schedule.warmup_fraction is None


def test_unknown_scale_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown argument 'big'.*agpt_7b, demo, smoke"):
        load_config("legacy", "big")


def test_train_tokens_become_iterations_as_the_launcher(monkeypatch, paths):
    # spec §1.3 worked example: 22e9 tokens, SEQ 4096, GBS 6144 -> 874 (bash integer division).
    monkeypatch.setenv("TRAIN_TOKENS", "22000000000")
    monkeypatch.setenv("TRAIN_ITERS", "5")  # TRAIN_TOKENS wins, as in setParams
    monkeypatch.setenv("SEQ", "4096")
    monkeypatch.setenv("GLOBAL_BATCH", "6144")
    cfg = resolve(load_config("legacy", "agpt_7b"), paths, devices=6144)
    assert cfg.train_iters == (22_000_000_000 // 4096) // 6144 == 874
    assert cfg.batch.global_batch_size == 6144


def test_env_defaults_and_flag_overrides(monkeypatch, paths):
    monkeypatch.setenv("LR", "3e-4")
    monkeypatch.setenv("MIN_LR", "3e-5")
    monkeypatch.setenv("GRAD_ACC_STEPS", "4")
    monkeypatch.setenv("MICRO_BATCH", "2")
    monkeypatch.setenv("TRAIN_ITERS", "10")
    monkeypatch.setenv("SAVE_INTERVAL", "7")
    cd = load_config("legacy", "smoke")
    assert (cd.lr, cd.min_lr, cd.grad_acc_steps, cd.micro_batch) == (3e-4, 3e-5, 4, 2)
    cfg = resolve(cd, paths, lr=1e-4)  # a --config.lr flag wins over LR
    assert cfg.schedule.max_lr == 1e-4 and cfg.schedule.min_lr == 3e-5
    assert cfg.batch.global_batch_size == 2 * 4 * 8 and cfg.train_iters == 10
    assert cfg.checkpoint.save_interval == 7


@pytest.mark.parametrize("frac,fraction,expected,says", [
    ("0.02", None, 0.02, "from LR_WARMUP_FRAC=0.02"),
    # Megatron's launcher reads only LR_WARMUP_FRAC (spec §0 item 2): the CPT notes' command with
    # LR_WARMUP_FRACTION=0.01 ran with the default 0.05.
    (None, "0.01", 0.05, "LR_WARMUP_FRACTION=0.01 is ignored, as Megatron-DeepSpeed's launcher"),
    ("0.02", "0.01", 0.02, "for 0.01 set LR_WARMUP_FRAC=0.01 or pass --lr-warmup-fraction 0.01"),
    (None, None, 0.05, "recipe's default"),
])
def test_warmup_fraction_is_read_as_megatrons_launcher_reads_it(monkeypatch, paths, frac,
                                                                fraction, expected, says):
    for name, value in (("LR_WARMUP_FRAC", frac), ("LR_WARMUP_FRACTION", fraction)):
        if value is not None:
            monkeypatch.setenv(name, value)
    cfg = resolve(load_config("legacy", "smoke"), paths)
    assert cfg.schedule.warmup_fraction == expected
    assert any(says in n for n in cfg.notes)


@pytest.mark.parametrize("over,pattern", [
    ({"global_batch": 20}, r"config.global_batch \(env GLOBAL_BATCH\)=20 but micro_batch 1 x "
                           r"grad_acc_steps 2 x data-parallel size 8 = 16; set GLOBAL_BATCH=16"),
    ({"train_iters": 0, "train_tokens": 100}, r"train_tokens \(env TRAIN_TOKENS\)=100 gives 0 "
                                              r"iterations: one iteration takes SEQ 32 x "
                                              r"GLOBAL_BATCH 16 = 512 tokens"),
    ({"load": ""}, r"recipe legacy continues a checkpoint but LOAD is empty"),
    ({"load": "/nonexistent/ckpt"}, r"config.load \(env LOAD\)='/nonexistent/ckpt' does not "
                                    r"exist"),
    ({"data_file_list": ""}, r"set DATA_FILE_LIST=<list file>"),
    ({"save": ""}, r"set SAVE=<dir>"),
    ({"cooldown_frac": 0.2}, r"cooldown_frac=0.2 needs lr_decay_style 'constant'"),
    ({"mesh": "fsdp=3"}, r"config.mesh=fsdp=3 on 8 devices"),
    ({"micro_batch": 0}, r"config.micro_batch \(env MICRO_BATCH\)=0 must be a positive integer"),
])
def test_config_errors_are_one_line_each(paths, over, pattern):
    cd = load_config("legacy", "smoke")
    with pytest.raises(config_lib.ConfigError) as err:
        resolve(cd, paths, **over)
    assert any(__import__("re").search(pattern, p) for p in err.value.problems), err.value.problems
    assert all("\n" not in p for p in err.value.problems)


def test_unknown_key_is_an_error(paths):
    cd = dict(load_config("legacy", "smoke").items())
    cd.update(paths)
    cd["learning_rate"] = 1.0
    with pytest.raises(config_lib.ConfigError, match=r"unknown config keys \['learning_rate'\]"):
        config_lib.from_config(cd, 8)


def test_locked_config_rejects_unknown_override():
    cd = load_config("legacy", "smoke")
    cd.lock()
    with pytest.raises(AttributeError):
        cd.learning_rate = 1.0


def _megatron_lr(n: int, max_lr: float, min_lr: float, warmup: float, decay: float,
                 style: str) -> float:
    """spec §2.2, written out independently: n, warmup and decay in samples."""
    if warmup > 0 and n <= warmup:
        return max_lr * n / warmup
    if n > decay:
        return min_lr
    r = (n - warmup) / (decay - warmup)
    if style == "cosine":
        return min_lr + (max_lr - min_lr) * 0.5 * (math.cos(math.pi * r) + 1)
    return max_lr


def _cooldown_lr(n: int, max_lr: float, min_lr: float, frac: float, decay: float) -> float:
    """spec §2.3 (constant style, no warmup): 1-sqrt over the last int(frac*decay) samples."""
    if n >= decay:
        return min_lr
    c = int(frac * decay)
    if n < decay - c:
        return max_lr
    ratio = min(max((n - (decay - c)) / c, 0.0), 1.0)
    return min_lr + (max_lr - min_lr) * (1 - math.sqrt(ratio))


def test_lr_schedule_rows_follow_megatron(paths):
    from agpt_jax import run_files

    cfg = resolve(load_config("legacy", "smoke"), paths, train_iters=40)
    its, lrs = run_files.lr_schedule_rows(cfg)
    g = cfg.batch.global_batch_size
    want = [_megatron_lr((k - 1) * g, cfg.schedule.max_lr, cfg.schedule.min_lr,
                         0.05 * 40 * g, 40 * g, "cosine") for k in its]
    assert its[0] == 1 and its[-1] == 40 and lrs[0] == 0.0
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)

    # The seed's phase-2 command: Megatron's default cooldown length 0.05 and min_lr 0.0 (spec
    # §2.3 and §1.2), at every scale.
    for scale in ("smoke", "demo", "agpt_7b"):
        cd = load_config("constant_cooldown", scale)
        assert (cd.cooldown_frac, cd.min_lr, cd.lr_warmup_frac) == (0.05, 0.0, 0.0), scale
    cfg = resolve(load_config("constant_cooldown", "smoke"), paths, train_iters=40)
    its, lrs = run_files.lr_schedule_rows(cfg)
    want = [_cooldown_lr((k - 1) * g, cfg.schedule.max_lr, 0.0, 0.05, 40 * g) for k in its]
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)
    assert lrs[0] == cfg.schedule.max_lr  # no warmup: the first update runs at the constant LR


def test_schedule_matches_optax_schedule(paths):
    """The cooldown branch's LR, as the host rows (float64) and as the optax schedule the compiled
    step uses (float32), against spec §2.3 written out above (constant style with
    --lr_constant_plus_cooldown_frac 1.0: 1-sqrt from LR to MIN_LR over the whole branch)."""
    cfg = resolve(load_config("cooldown", "smoke"), paths, cooldown_tokens=40 * 32 * 16)
    from agpt_jax import run_files

    its, lrs = run_files.lr_schedule_rows(cfg)
    g = cfg.batch.global_batch_size
    assert cfg.train_iters == 40 and (cfg.schedule.max_lr, cfg.schedule.min_lr) == (1e-3, 1e-4)
    want = [_cooldown_lr((k - 1) * g, 1e-3, 1e-4, 1.0, 40 * g) for k in its]
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)
    # float32: 1 - sqrt(r) near r = 1 keeps ~6e-8 absolute, i.e. up to ~5e-7 of the last LRs.
    sched = schedules.make_schedule(cfg.schedule)
    np.testing.assert_allclose([float(sched(k - 1)) for k in its], want, rtol=1e-6)
    assert lrs[-1] < lrs[0]


def test_config_json_round_trips(paths, tmp_path):
    import json

    cfg = resolve(load_config("pretrain", "smoke"), paths)
    path = os.path.join(tmp_path, "config.json")
    config_lib.write_config_json(cfg, path)
    with open(path) as f:
        d = json.load(f)
    assert d["batch"]["global_batch_size"] == cfg.batch.global_batch_size
    assert d["model"]["num_layers"] == cfg.model.num_layers and d["recipe"] == "pretrain"
