"""Megatron LR schedules: the spec's test vectors, its formulas at every iteration, the real log."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agpt_jax import schedules


def megatron_get_lr(cfg: schedules.ScheduleConfig, num_steps: int) -> float:
    """The scheduler's get_lr() at ``num_steps`` samples, written out from the spec in float64.

    megatron-deepspeed.md §2.1-2.3 (units, warmup/cosine/linear, constant plus 1-sqrt cooldown),
    schedules-and-cpt.md §1.5/§4.3 (infinite styles of the Argonne fork) and §4.1 (Megatron-LM:
    init_lr warmup, inverse-square-root, WSD).
    """
    gbs = cfg.global_batch_size
    decay_iters = cfg.train_iters if cfg.decay_iters is None else cfg.decay_iters
    D = decay_iters * gbs
    W = cfg.warmup_fraction * D if cfg.warmup_fraction is not None else cfg.warmup_iters * gbs
    n = num_steps
    max_lr, min_lr = cfg.max_lr, cfg.min_lr
    if W > 0 and n <= W:
        return cfg.init_lr + (max_lr - cfg.init_lr) * float(n) / float(W)
    if cfg.style == "constant":
        if not cfg.constant_plus_cooldown:
            return max_lr
        n_ = n - W
        T_ = D - W
        if n_ >= T_:
            return min_lr
        C = int(cfg.cooldown_frac * D)
        if n_ < T_ - C:
            return max_lr
        ratio = (n_ - (T_ - C)) / float(C)
        ratio = min(max(ratio, 0.0), 1.0)
        return min_lr + (max_lr - min_lr) * (1.0 - math.sqrt(ratio))
    if n > D:
        return min_lr
    if cfg.style == "inverse-square-root":
        return max(min_lr, max_lr * max(W, 1) ** 0.5 / max(n, 1) ** 0.5)
    if cfg.style in ("infinite-cosine", "infinite-inv-square-root"):
        const = cfg.constant_lr
        delta = max_lr - const
        cooldown = cfg.infinite_cooldown_fraction * D
        constant = cfg.constant_fraction * D
        n_ = n - W
        if n_ <= cooldown:
            r = float(n_) / float(cooldown)
            if cfg.style == "infinite-cosine":
                lr = const + delta * 0.5 * (math.cos(math.pi * r) + 1.0)
            else:
                inv_f = lambda t: 1.0 / math.sqrt(1.0 + cfg.timescale * t) - 1.0  # noqa: E731
                lr = max_lr - delta * inv_f(r) / inv_f(1.0)
        else:
            n_ = n_ - cooldown
            if n_ <= constant:
                lr = const
            else:
                end_ = D - W - cooldown - constant
                n_ = n_ - constant
                exp_factor = -math.log(min_lr / const) / end_
                lr = const * math.exp(-exp_factor * n_)
        return max(lr, min_lr)
    ratio = float(n - W) / float(D - W)
    assert 0.0 <= ratio <= 1.0
    delta = max_lr - min_lr
    if cfg.style == "linear":
        coeff = 1.0 - ratio
    elif cfg.style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        assert cfg.style == "WSD"
        wsd = cfg.wsd_decay_iters * gbs
        start = D - wsd
        if n <= start:
            coeff = 1.0
        else:
            r = float(n - start) / float(wsd)
            coeff = {"linear": lambda: 1.0 - r,
                     "cosine": lambda: 0.5 * (math.cos(math.pi * r) + 1.0),
                     "exponential": lambda: 2.0 * 0.5**r - 1.0,
                     "minus_sqrt": lambda: 1.0 - math.sqrt(r)}[cfg.wsd_decay_style]()
    return min_lr + coeff * delta


def reference_curve(cfg: schedules.ScheduleConfig, iterations: np.ndarray) -> np.ndarray:
    """LR after k iterations: the scheduler stepped k times by GBS (spec §2.1)."""
    return np.array([megatron_get_lr(cfg, int(k) * cfg.global_batch_size) for k in iterations])


# schedules-and-cpt.md §4.2 (GBS 1, init 0, max 1e-3, min 1e-4, warmup 10, decay 100, WSD 20).
SPEC_STEPS = [0, 5, 10, 11, 50, 80, 81, 85, 90, 95, 99, 100]
SPEC_TABLE = {
    ("cosine", None): [0, 5.000000e-4, 1.000000e-3, 9.997259e-4, 6.281417e-4, 2.052800e-4,
                       1.953952e-4, 1.602886e-4, 1.271383e-4, 1.068365e-4, 1.002741e-4, 1.0e-4],
    ("linear", None): [0, 5.0e-4, 1.0e-3, 9.9e-4, 6.0e-4, 3.0e-4, 2.9e-4, 2.5e-4, 2.0e-4, 1.5e-4,
                       1.1e-4, 1.0e-4],
    ("WSD", "linear"): [0, 5.0e-4, 1.0e-3, 1.0e-3, 1.0e-3, 1.0e-3, 9.55e-4, 7.75e-4, 5.5e-4,
                        3.25e-4, 1.45e-4, 1.0e-4],
    ("WSD", "cosine"): [0, 5.0e-4, 1.0e-3, 1.0e-3, 1.0e-3, 1.0e-3, 9.944598e-4, 8.681981e-4,
                        5.500000e-4, 2.318019e-4, 1.055402e-4, 1.0e-4],
    ("WSD", "exponential"): [0, 5.0e-4, 1.0e-3, 1.0e-3, 1.0e-3, 1.0e-3, 9.386854e-4, 7.136135e-4,
                             4.727922e-4, 2.702864e-4, 1.317384e-4, 1.0e-4],
    ("WSD", "minus_sqrt"): [0, 5.0e-4, 1.0e-3, 1.0e-3, 1.0e-3, 1.0e-3, 7.987539e-4, 5.500000e-4,
                            3.636039e-4, 2.205771e-4, 1.227885e-4, 1.0e-4],
}


@pytest.mark.parametrize("style,wsd_style", list(SPEC_TABLE))
def test_spec_test_vectors(style, wsd_style):
    cfg = schedules.ScheduleConfig(style=style, max_lr=1e-3, min_lr=1e-4, train_iters=100,
                                   warmup_iters=10, wsd_decay_iters=20 if style == "WSD" else None,
                                   wsd_decay_style=wsd_style or "exponential")
    expected = np.array(SPEC_TABLE[(style, wsd_style)])
    steps = np.array(SPEC_STEPS)
    # The table has 7 significant digits.
    np.testing.assert_allclose(schedules.lr_at_iterations(cfg, steps), expected, rtol=6e-7,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(schedules.make_schedule(cfg))(steps)), expected,
                               rtol=1e-6, atol=1e-12)


def _sweep_configs() -> list[schedules.ScheduleConfig]:
    """Every style, GBS 7, a warmup fraction that ends mid-iteration, a few hundred iterations."""
    base = schedules.ScheduleConfig(max_lr=3e-4, min_lr=3e-5, train_iters=300,
                                    warmup_fraction=0.037, global_batch_size=7)
    cfgs = [dataclasses.replace(base, style=s)
            for s in ("constant", "linear", "cosine", "inverse-square-root")]
    cfgs += [dataclasses.replace(base, style="constant", constant_plus_cooldown=True, cooldown_frac=f)
             for f in (0.05, 0.2 + 1 / 7000, 0.5)]
    cfgs += [dataclasses.replace(base, style="WSD", wsd_decay_iters=61, wsd_decay_style=w)
             for w in schedules.WSD_DECAY_STYLES]
    cfgs += [dataclasses.replace(base, style=s, constant_lr=1.65e-4, infinite_cooldown_fraction=0.45,
                                 constant_fraction=c, timescale=t)
             for s in ("infinite-cosine", "infinite-inv-square-root")
             for c, t in ((0.1, 10.0), (0.001, 3.0))]
    # Warmup in iterations from an initial LR, decay shorter than the run, min_lr 0, GBS 1.
    cfgs += [dataclasses.replace(base, style=s, warmup_fraction=None, warmup_iters=13, init_lr=2e-5,
                                 decay_iters=250, min_lr=0.0)
             for s in ("linear", "cosine", "inverse-square-root")]
    cfgs += [dataclasses.replace(base, style="cosine", warmup_fraction=None, warmup_iters=0,
                                 global_batch_size=1)]
    return cfgs


@pytest.mark.parametrize("cfg", _sweep_configs(), ids=lambda c: (
    f"{c.style}-{c.wsd_decay_style if c.style == 'WSD' else ''}"
    f"{'cd%.4f' % c.cooldown_frac if c.constant_plus_cooldown else ''}"
    f"{'cf%g' % c.constant_fraction if c.style.startswith('inf') else ''}"
    f"-w{c.warmup_fraction if c.warmup_fraction is not None else c.warmup_iters}"))
def test_formulas_at_every_iteration(cfg):
    iterations = np.arange(0, cfg.train_iters + 25)
    expected = reference_curve(cfg, iterations)
    # float64 on the host: the same numbers as Megatron's float64 arithmetic.
    np.testing.assert_allclose(schedules.lr_at_iterations(cfg, iterations), expected, rtol=1e-11,
                               atol=1e-18)
    # float32 under jit, one compiled call per count as the optimizer does.
    schedule = jax.jit(schedules.make_schedule(cfg))
    got = np.array([float(schedule(jnp.int32(k))) for k in iterations[::17]])
    np.testing.assert_allclose(got, expected[::17], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(schedule(jnp.asarray(iterations, jnp.int32))), expected,
                               rtol=1e-6)


def test_sweep_exercises_fractional_warmup_and_every_phase():
    """The sweep's warmup ends between iterations and its curves leave max_lr and reach min_lr."""
    cfg = dataclasses.replace(_sweep_configs()[2])  # cosine, GBS 7, warmup fraction 0.037
    warmup_samples = 0.037 * 300 * 7
    assert warmup_samples % 7 != 0
    k_last_warm = math.floor(warmup_samples / 7)
    lr = schedules.lr_at_iterations(cfg, np.arange(0, 320))
    # Warmup is still linear at the last iteration whose samples are <= W, decay right after.
    np.testing.assert_allclose(lr[k_last_warm], cfg.max_lr * k_last_warm * 7 / warmup_samples,
                               rtol=1e-12)
    assert lr[k_last_warm + 1] < cfg.max_lr and lr[k_last_warm + 1] > lr[k_last_warm]
    for c in _sweep_configs():
        if c.style != "constant" or c.constant_plus_cooldown:
            curve = schedules.lr_at_iterations(c, np.arange(0, c.train_iters + 2))
            assert curve[-1] == c.min_lr and curve.max() == pytest.approx(c.max_lr, rel=0.05)


def test_schedule_count_is_the_iterations_completed():
    """Update with optax count k (Megatron iteration k + 1) uses get_lr() at k * GBS samples."""
    cfg = schedules.ScheduleConfig(style="cosine", max_lr=1e-3, train_iters=50, warmup_fraction=0.1,
                                   global_batch_size=3)
    schedule = schedules.make_schedule(cfg)
    assert float(schedule(0)) == 0.0  # Megatron's first iteration of a warmup has lr 0
    for k in (1, 4, 5, 6, 30, 49, 50, 51):
        np.testing.assert_allclose(float(schedule(k)), megatron_get_lr(cfg, 3 * k), rtol=1e-6)


def test_real_log_constant_plus_cooldown():
    """megatron-deepspeed.md §2.1: ALCF cooldown log, max 2e-4, min 2e-5, T = 136100, frac 0.5.

    DeepSpeed's ``lr=2.012568679e-05 @ step 136005`` and Megatron's ``learning_rate=2.0127e-05``
    logged at iteration 136004 are get_lr() after 136005 and 136004 iterations.
    """
    for gbs, warmup in ((1, 0.05), (3072, 0.05), (3072, 0.01)):
        cfg = schedules.ScheduleConfig(style="constant", constant_plus_cooldown=True,
                                       cooldown_frac=0.5, max_lr=2e-4, min_lr=2e-5,
                                       train_iters=136100, warmup_fraction=warmup,
                                       global_batch_size=gbs)
        lr = schedules.lr_at_iterations(cfg, np.array([136004, 136005]))
        np.testing.assert_allclose(lr[1], 2.012568679e-05, rtol=1e-9)
        np.testing.assert_allclose(lr[0], 2.0127e-05, rtol=5e-5)
        got = float(jax.jit(schedules.make_schedule(cfg))(jnp.int32(136005)))
        np.testing.assert_allclose(got, 2.012568679e-05, rtol=1e-6)


def test_matches_optax_recipes_where_they_apply():
    """schedules-and-cpt.md §3.3: optax reproduces Megatron when every boundary is an integer."""
    W, D, Wd, mx, mn = 10, 100, 20, 1e-3, 1e-4
    warm = optax.linear_schedule(0.0, mx, W)
    tails = {"linear": optax.linear_schedule(mx, mn, Wd),
             "cosine": optax.cosine_decay_schedule(mx, Wd, alpha=mn / mx),
             "exponential": lambda c: mn + (mx - mn) * (2 * 0.5 ** jnp.clip(c / Wd, 0, 1) - 1),
             "minus_sqrt": lambda c: mn + (mx - mn) * (1 - jnp.sqrt(jnp.clip(c / Wd, 0, 1)))}
    recipes = {
        ("cosine", None): optax.warmup_cosine_decay_schedule(0.0, mx, W, D, end_value=mn),
        ("linear", None): optax.join_schedules([warm, optax.linear_schedule(mx, mn, D - W)], [W]),
    }
    for k, tail in tails.items():
        recipes[("WSD", k)] = optax.join_schedules([warm, optax.constant_schedule(mx), tail],
                                                   [W, D - Wd])
    counts = jnp.arange(0, 121)
    for (style, wsd), recipe in recipes.items():
        cfg = schedules.ScheduleConfig(style=style, max_lr=mx, min_lr=mn, train_iters=D,
                                       warmup_iters=W, wsd_decay_iters=Wd if wsd else None,
                                       wsd_decay_style=wsd or "exponential")
        np.testing.assert_allclose(np.asarray(jax.jit(schedules.make_schedule(cfg))(counts)),
                                   np.asarray(jax.jit(recipe)(counts)), rtol=2e-6,
                                   err_msg=f"{style} {wsd}")
    # NeoX infinite cosine (N 1000, cooldown 60 %, constant 20 %) via join of optax primitives.
    N, mx, const, mn = 1000, 3e-4, 1.65e-4, 3e-5
    Tw, Tcd, Tc = 10, 600, 200
    recipe = optax.join_schedules(
        [optax.linear_schedule(0.0, mx, Tw), optax.cosine_decay_schedule(mx, Tcd, alpha=const / mx),
         optax.constant_schedule(const), optax.exponential_decay(const, N - Tw - Tcd - Tc, mn / const)],
        [Tw, Tw + Tcd, Tw + Tcd + Tc])
    cfg = schedules.ScheduleConfig(style="infinite-cosine", max_lr=mx, min_lr=mn, constant_lr=const,
                                   train_iters=N, warmup_iters=Tw, infinite_cooldown_fraction=0.6,
                                   constant_fraction=0.2)
    counts = jnp.arange(0, N + 1)
    np.testing.assert_allclose(np.asarray(jax.jit(schedules.make_schedule(cfg))(counts)),
                               np.asarray(jax.jit(recipe)(counts)), rtol=2e-6)


def test_bad_configs_name_the_field():
    cases = [
        (dict(style="cosin"), "style"),
        (dict(style="WSD"), "wsd_decay_iters"),
        (dict(style="WSD", wsd_decay_iters=200, train_iters=100), "wsd_decay_iters"),
        (dict(style="WSD", wsd_decay_iters=10, train_iters=100, wsd_decay_style="exp"),
         "wsd_decay_style"),
        (dict(style="cosine", constant_plus_cooldown=True), "constant_plus_cooldown"),
        (dict(train_iters=10, warmup_iters=10), "warmup"),
        (dict(train_iters=10, warmup_fraction=1.0), "warmup_fraction"),
        (dict(min_lr=1e-3, max_lr=1e-4), "min_lr"),
        (dict(train_iters=0), "train_iters"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(style="infinite-cosine", min_lr=0.0), "min_lr"),
        (dict(style="infinite-cosine", min_lr=1e-5, constant_lr=3e-4), "constant_lr"),
        (dict(style="infinite-inv-square-root", min_lr=1e-5, infinite_cooldown_fraction=0.0),
         "infinite_cooldown_fraction"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=f"ScheduleConfig.{field}"):
            schedules.ScheduleConfig(**kwargs)
    with pytest.raises(ValueError, match="non-negative integers"):
        schedules.lr_at_iterations(schedules.ScheduleConfig(train_iters=10), np.array([-1, 2]))
