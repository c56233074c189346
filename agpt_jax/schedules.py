"""Megatron's learning-rate schedules, as optax schedules and as float64 host curves.

Spec ``megatron-deepspeed.md`` §2.1-2.3, ``schedules-and-cpt.md`` §1.5 and §4. Megatron's
``OptimizerParamScheduler`` counts *samples*. It is stepped by the global batch size after every
update, so the update with optax count ``k`` (0-based; Megatron iteration ``k + 1``) uses
``get_lr()`` at ``num_steps = k * global_batch_size``; that is also the ``learning_rate`` Megatron
logs at iteration ``k``. A warmup given as a fraction, ``warmup_fraction * decay_iters * GBS``
samples, need not be a whole number of iterations. The schedule therefore decides every phase with
integer thresholds on ``k`` found on the host with Megatron's own float64 comparisons, and
evaluates each curve from offsets split into an exact integer part and a small fraction, so the
compiled float32 schedule is accurate to a few ulp and the host float64 one
(:func:`lr_at_iterations`) to ~1e-15. optax's schedule primitives take integer transition steps and
restart each phase at an integer boundary; they reproduce Megatron only when every boundary is a
multiple of the global batch (``schedules-and-cpt.md`` §3.3), so the phases are written here
directly (the tests check them against those optax recipes where they apply).

Every ``--lr-decay-style`` is one row of :data:`DECAY_STYLES` (its curve after the warmup, its
own flags' checks, whether it takes the constant-plus-cooldown flag); WSD's anneal shapes are the
rows of :data:`WSD_ANNEALS`. Validation and evaluation both read those tables.

Over 400 lines on purpose: the seven Megatron decay styles and WSD's anneals, each row of the
table next to the spec section and Megatron source it reproduces; split, a row would leave its
formula's citation behind.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Megatron's LR schedule flags, in Megatron's units (iterations; samples via the batch size).

    Attributes:
      style: ``--lr-decay-style``: constant | linear | cosine | inverse-square-root |
        infinite-cosine | infinite-inv-square-root (Argonne fork) | WSD (Megatron-LM).
      max_lr: ``--lr``, the peak LR.
      min_lr: ``--min-lr``, the floor reached at the end of the decay.
      init_lr: ``--lr-warmup-init`` (Megatron-LM): the LR at the start of warmup. The Argonne fork
        warms up from 0, which is the default.
      train_iters: ``--train-iters``.
      decay_iters: ``--lr-decay-iters``; None means ``train_iters``.
      warmup_fraction: ``--lr-warmup-fraction`` of the decay samples; wins over ``warmup_iters``
        when set, as in Megatron.
      warmup_iters: ``--lr-warmup-iters``.
      constant_plus_cooldown: ``--lr_constant_plus_cooldown`` (Argonne fork, style constant only):
        a 1-sqrt cooldown to ``min_lr`` over the last ``int(cooldown_frac * decay samples)`` samples.
      cooldown_frac: ``--lr_constant_plus_cooldown_frac``: the cooldown *length* (spec §2.3).
      wsd_decay_iters: ``--lr-wsd-decay-iters``: the WSD anneal window; required for WSD.
      wsd_decay_style: ``--lr-wsd-decay-style``: linear | cosine | exponential | minus_sqrt.
      constant_lr: ``--constant-lr`` of the infinite styles.
      infinite_cooldown_fraction: ``--lr-cooldown-fraction`` of the infinite styles (of the decay
        samples); not cooldown_frac, the length of the constant style's cooldown.
      constant_fraction: ``--lr-constant-fraction`` of the infinite styles (of the decay samples).
      timescale: ``--timescale``, alpha of the infinite inverse-square-root cooldown.
      global_batch_size: samples per iteration; the scheduler counts samples like Megatron.
    """

    style: str = "cosine"
    max_lr: float = 2e-4
    min_lr: float = 0.0
    init_lr: float = 0.0
    train_iters: int = 1
    decay_iters: int | None = None
    warmup_fraction: float | None = None
    warmup_iters: int = 0
    constant_plus_cooldown: bool = False
    cooldown_frac: float = 0.05
    wsd_decay_iters: int | None = None
    wsd_decay_style: str = "exponential"
    constant_lr: float = 1.1e-4
    infinite_cooldown_fraction: float = 0.65
    constant_fraction: float = 0.001
    timescale: float = 10.0
    global_batch_size: int = 1

    def __post_init__(self) -> None:
        _validate_schedule_config(self)

    @property
    def lr_decay_iters(self) -> int:
        """The decay length in iterations (``decay_iters``, else ``train_iters``)."""
        return self.train_iters if self.decay_iters is None else self.decay_iters


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"ScheduleConfig.{field}={value!r}: {why}")


def _validate_schedule_config(cfg: ScheduleConfig) -> None:
    """Raises ValueError naming the field when ``cfg`` is not a schedule Megatron could run."""
    if cfg.style not in SCHEDULE_STYLES:
        _fail("style", cfg.style, f"must be one of {', '.join(SCHEDULE_STYLES)}")
    for name in ("train_iters", "global_batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, np.integer)) or not 1 <= value <= _INT32_MAX:
            _fail(name, value, "must be an integer >= 1")
    if cfg.decay_iters is not None and (
        not isinstance(cfg.decay_iters, (int, np.integer)) or not 1 <= cfg.decay_iters <= _INT32_MAX
    ):
        _fail("decay_iters", cfg.decay_iters, "must be an integer >= 1, or None for train_iters")
    if not isinstance(cfg.warmup_iters, (int, np.integer)) or cfg.warmup_iters < 0:
        _fail("warmup_iters", cfg.warmup_iters, "must be an integer >= 0")
    if not 0.0 <= cfg.min_lr <= cfg.max_lr:
        _fail("min_lr", cfg.min_lr, f"must satisfy 0 <= min_lr <= max_lr (= {cfg.max_lr})")
    if not 0.0 <= cfg.init_lr <= cfg.max_lr:
        _fail("init_lr", cfg.init_lr, f"must satisfy 0 <= init_lr <= max_lr (= {cfg.max_lr})")
    if cfg.warmup_fraction is not None and not 0.0 <= cfg.warmup_fraction < 1.0:
        _fail("warmup_fraction", cfg.warmup_fraction, "must be in [0, 1), or None to use warmup_iters")
    decay_samples = cfg.lr_decay_iters * cfg.global_batch_size
    if _warmup_samples(cfg) >= decay_samples:
        # Megatron asserts lr_warmup_steps < lr_decay_steps.
        _fail("warmup_iters", cfg.warmup_iters,
              f"warmup must end before the decay does (decay_iters = {cfg.lr_decay_iters})")
    style = DECAY_STYLES[cfg.style]
    if cfg.constant_plus_cooldown:
        if not style.accepts_cooldown:
            takers = ", ".join(repr(s.name) for s in DECAY_STYLES.values() if s.accepts_cooldown)
            _fail("constant_plus_cooldown", True,
                  f"only applies to style {takers} (style is {cfg.style!r}); use WSD with "
                  "wsd_decay_style='minus_sqrt' for a cooldown after another style")
        if not 0.0 <= cfg.cooldown_frac <= 1.0:
            _fail("cooldown_frac", cfg.cooldown_frac, "must be in [0, 1] (the cooldown length)")
    if style.check is not None:
        style.check(cfg)


def _check_wsd(cfg: ScheduleConfig) -> None:
    if cfg.wsd_decay_iters is None:
        _fail("wsd_decay_iters", None, "WSD needs the anneal window in iterations")
    if not isinstance(cfg.wsd_decay_iters, (int, np.integer)) or not (
        1 <= cfg.wsd_decay_iters <= cfg.lr_decay_iters
    ):
        _fail("wsd_decay_iters", cfg.wsd_decay_iters,
              f"must be an integer in [1, decay_iters = {cfg.lr_decay_iters}]")
    if cfg.wsd_decay_style not in WSD_DECAY_STYLES:
        _fail("wsd_decay_style", cfg.wsd_decay_style,
              f"must be one of {', '.join(WSD_DECAY_STYLES)}")


def _check_infinite(cfg: ScheduleConfig) -> None:
    if not cfg.min_lr < cfg.constant_lr <= cfg.max_lr:
        _fail("constant_lr", cfg.constant_lr,
              f"infinite schedules need min_lr < constant_lr <= max_lr "
              f"(min_lr = {cfg.min_lr}, max_lr = {cfg.max_lr})")
    if cfg.min_lr <= 0.0:
        _fail("min_lr", cfg.min_lr,
              "infinite schedules anneal exponentially to min_lr (log(min_lr / constant_lr)), "
              "so min_lr must be > 0")
    if not 0.0 < cfg.infinite_cooldown_fraction <= 1.0:
        _fail("infinite_cooldown_fraction", cfg.infinite_cooldown_fraction, "must be in (0, 1]")
    if not 0.0 <= cfg.constant_fraction <= 1.0:
        _fail("constant_fraction", cfg.constant_fraction, "must be in [0, 1]")
    if cfg.timescale <= 0.0:
        _fail("timescale", cfg.timescale, "must be > 0")


def _warmup_samples(cfg: ScheduleConfig) -> float:
    """Megatron's ``lr_warmup_steps`` in samples (``training.py:get_optimizer_param_scheduler``)."""
    decay_samples = cfg.lr_decay_iters * cfg.global_batch_size
    if cfg.warmup_fraction is not None:
        return cfg.warmup_fraction * decay_samples  # a float, as in Megatron
    return float(cfg.warmup_iters * cfg.global_batch_size)


def _last_true(pred: Callable[[int], bool], guess: float, lo: int, hi: int) -> int:
    """Largest integer k in [lo, hi] with ``pred(k)`` for a predicate true up to a point.

    Returns ``lo - 1`` when ``pred(lo)`` is false. ``guess`` is a float estimate of the answer; the
    search walks from it, so it costs a few evaluations of the exact float64 predicate.
    """
    k = int(min(max(math.floor(guess), lo - 1), hi))
    while k + 1 <= hi and pred(k + 1):
        k += 1
    while k >= lo and not pred(k):
        k -= 1
    return k


@dataclasses.dataclass(frozen=True)
class _Offset:
    """A float64 position ``b`` (iterations) split as ``b_int + b_frac`` for exact ``k - b``."""

    b_int: int
    b_frac: float

    @classmethod
    def of(cls, b: float) -> "_Offset":
        b_int = math.floor(b)
        return cls(b_int, b - b_int)  # exact in float64

    def since(self, k: Any, xp: Any, dtype: Any) -> Any:
        """``k - b`` for integer ``k``: the integer part is exact, one rounding for the fraction."""
        return (k - self.b_int).astype(dtype) - dtype(self.b_frac)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Host-side constants of a schedule: integer phase thresholds and float64 curve constants.

    All positions are in iterations (samples / global batch). ``k`` below is the optax count.
    """

    cfg: ScheduleConfig
    last_warmup: int  # last k with W > 0 and k * GBS <= W; -1 when there is no warmup
    warmup: float  # W / GBS
    decay: int  # lr_decay_iters
    # constant + cooldown
    last_not_min: int  # constant + cooldown: last k before min_lr (n_ < T_)
    last_constant: int  # last k with max_lr (before the cooldown)
    cooldown: float  # C / GBS with C = int(frac * decay samples)
    cooldown_start: _Offset  # (decay samples - C) / GBS
    # infinite styles
    last_inf_cooldown: int  # last k with (k * GBS - W) <= cooldown samples
    last_inf_constant: int  # last k with (k * GBS - W) - cooldown samples <= constant samples
    inf_cooldown: float
    anneal_start: _Offset
    anneal_len: float

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "_Plan":
        gbs = cfg.global_batch_size
        decay = cfg.lr_decay_iters
        decay_samples = decay * gbs
        w_s = _warmup_samples(cfg)
        # Megatron's predicates, evaluated exactly as it does (float64 samples), give the thresholds.
        if w_s > 0:
            last_warmup = _last_true(lambda k: k * gbs <= w_s, w_s / gbs, 0, decay)
        else:
            last_warmup = -1
        # --lr_constant_plus_cooldown (Argonne fork optimizer_param_scheduler.py, get_lr).
        c_s = int(cfg.cooldown_frac * decay_samples) if cfg.constant_plus_cooldown else 0
        total_ = decay_samples - w_s
        last_not_min = _last_true(lambda k: (k * gbs - w_s) < total_, decay - 1, 0, decay + 1)
        last_constant = _last_true(
            lambda k: (k * gbs - w_s) < total_ - c_s, (decay_samples - c_s) / gbs, 0, decay)
        # Infinite styles (same file): cooldown, constant, then exponential anneal.
        cc_s = cfg.infinite_cooldown_fraction * decay_samples
        ck_s = cfg.constant_fraction * decay_samples
        last_inf_cooldown = _last_true(lambda k: (k * gbs - w_s) <= cc_s, (w_s + cc_s) / gbs, 0, decay)
        last_inf_constant = _last_true(
            lambda k: (k * gbs - w_s) - cc_s <= ck_s, (w_s + cc_s + ck_s) / gbs, 0, decay)
        anneal_s = decay_samples - w_s - cc_s - ck_s
        return cls(
            cfg=cfg,
            last_warmup=last_warmup,
            warmup=w_s / gbs,
            decay=decay,
            last_not_min=last_not_min,
            last_constant=last_constant,
            cooldown=c_s / gbs,
            cooldown_start=_Offset.of((decay_samples - c_s) / gbs),
            last_inf_cooldown=last_inf_cooldown,
            last_inf_constant=last_inf_constant,
            inf_cooldown=cc_s / gbs,
            anneal_start=_Offset.of((w_s + cc_s + ck_s) / gbs),
            # When non-positive the anneal is never reached before the decay ends (n > D wins).
            anneal_len=anneal_s / gbs if anneal_s > 0 else 1.0,
        )


def _sin2_half_pi(q: Any, xp: Any) -> Any:
    """``0.5 * (cos(pi * (1 - q)) + 1)`` as ``sin(pi q / 2)^2``: accurate as q -> 0 (r -> 1)."""
    return xp.square(xp.sin((0.5 * math.pi) * q))


def _clip01(x: Any, xp: Any) -> Any:
    return xp.clip(x, 0.0, 1.0)


def _between(cfg: ScheduleConfig, coeff: Any) -> Any:
    """Megatron's ``min_lr + coeff * delta`` with ``delta = max_lr - min_lr``."""
    return cfg.min_lr + (cfg.max_lr - cfg.min_lr) * coeff


def _decay_share(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    """The share of the decay still ahead, (D - n) / (D - W) in [0, 1], exact numerator."""
    return _clip01((plan.decay - k).astype(dtype) / dtype(plan.decay - plan.warmup), xp)


def _constant(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    """max_lr; with ``--lr_constant_plus_cooldown`` a 1-sqrt cooldown to min_lr (spec §2.3)."""
    cfg = plan.cfg
    max_lr, min_lr = cfg.max_lr, cfg.min_lr
    if cfg.constant_plus_cooldown and plan.cooldown > 0:
        # 1 - sqrt(ratio) = (1 - ratio) / (1 + sqrt(ratio)), 1 - ratio = (D - n) / C exactly.
        ratio = _clip01(plan.cooldown_start.since(k, xp, dtype) / dtype(plan.cooldown), xp)
        one_minus = _clip01((plan.decay - k).astype(dtype) / dtype(plan.cooldown), xp)
        cool = min_lr + (max_lr - min_lr) * (one_minus / (1.0 + xp.sqrt(ratio)))
        after = xp.where(k <= plan.last_constant, dtype(max_lr), cool)
        return xp.where(k > plan.last_not_min, dtype(min_lr), after)
    if cfg.constant_plus_cooldown:  # C == 0: max_lr until the end of the decay, then min_lr
        return xp.where(k > plan.last_not_min, dtype(min_lr), dtype(max_lr))
    return xp.full(k.shape, max_lr, dtype)


def _linear(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    return _between(plan.cfg, _decay_share(plan, k, xp, dtype))


def _cosine(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    return _between(plan.cfg, _sin2_half_pi(_decay_share(plan, k, xp, dtype), xp))


def _inverse_square_root(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    # max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)), in iterations to keep n out of float32.
    cfg, gbs = plan.cfg, plan.cfg.global_batch_size
    a = max(plan.warmup * gbs, 1.0) / gbs
    n = xp.maximum(k.astype(dtype), dtype(1.0 / gbs))
    return xp.maximum(dtype(cfg.min_lr), cfg.max_lr * xp.sqrt(a / n))


# ``--lr-wsd-decay-style``: q = 1 - r -> coeff, with r the share of the anneal window done.
WSD_ANNEALS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "linear": lambda q, r, xp: q,  # 1 - r
    "cosine": lambda q, r, xp: _sin2_half_pi(q, xp),  # 0.5 (cos(pi r) + 1)
    "exponential": lambda q, r, xp: xp.expm1(q * math.log(2.0)),  # 2 * 0.5^r - 1 = 2^(1 - r) - 1
    "minus_sqrt": lambda q, r, xp: q / (1.0 + xp.sqrt(r)),  # 1 - sqrt(r)
}
WSD_DECAY_STYLES = tuple(WSD_ANNEALS)


def _wsd(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    """Megatron-LM's WSD: max_lr, then the anneal shape over the last ``wsd_decay_iters``."""
    cfg = plan.cfg
    wsd = cfg.wsd_decay_iters
    start = plan.decay - wsd
    q = _clip01((plan.decay - k).astype(dtype) / dtype(wsd), xp)  # 1 - r, exact numerator
    r = _clip01((k - start).astype(dtype) / dtype(wsd), xp)
    coeff = WSD_ANNEALS[cfg.wsd_decay_style](q, r, xp)
    return _between(cfg, xp.where(k <= start, dtype(1.0), coeff))


def _infinite(cooldown: Callable[[ScheduleConfig, Any, Any, Any], Any]) -> Callable[..., Any]:
    """An infinite style (Argonne fork): ``cooldown(cfg, cr, xp, dtype)`` from max_lr to
    constant_lr over the cooldown share ``cr``, then constant_lr, then an exponential anneal."""

    def curve(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
        cfg = plan.cfg
        const = cfg.constant_lr
        cr = _clip01(_Offset.of(plan.warmup).since(k, xp, dtype) / dtype(plan.inf_cooldown), xp)
        ramp = cooldown(cfg, cr, xp, dtype)
        m = xp.maximum(plan.anneal_start.since(k, xp, dtype), dtype(0.0))
        anneal = const * xp.exp(math.log(cfg.min_lr / const) * (m / dtype(plan.anneal_len)))
        after = xp.where(k <= plan.last_inf_constant, dtype(const), anneal)
        after = xp.where(k <= plan.last_inf_cooldown, ramp, after)
        return xp.maximum(after, dtype(cfg.min_lr))

    return curve


def _inf_cosine_cooldown(cfg: ScheduleConfig, cr: Any, xp: Any, dtype: Any) -> Any:
    const = cfg.constant_lr
    return const + (cfg.max_lr - const) * (0.5 * (xp.cos(math.pi * cr) + 1.0))


def _inf_inv_sqrt_cooldown(cfg: ScheduleConfig, cr: Any, xp: Any, dtype: Any) -> Any:
    alpha = cfg.timescale

    def h(x: Any) -> Any:  # 1 / sqrt(1 + alpha x) - 1, without cancellation near 0
        s = xp.sqrt(1.0 + alpha * x)
        return -(alpha * x) / (s * (1.0 + s))

    return cfg.max_lr - (cfg.max_lr - cfg.constant_lr) * (h(cr) / h(dtype(1.0)))


@dataclasses.dataclass(frozen=True)
class DecayStyle:
    """One ``--lr-decay-style``: a row of :data:`DECAY_STYLES`.

    Attributes:
      name: Megatron's name for it (the ``--lr-decay-style`` value).
      curve: ``curve(plan, k, xp, dtype)``, the LR at optax counts ``k`` once the warmup is over
        (:func:`_lr` puts the warmup ramp, and min_lr past the decay, on top).
      spec: where the formula is written down.
      floor_after_decay: min_lr once ``num_steps > lr_decay_steps``; Megatron returns max_lr for
        constant before that test, and the constant-plus-cooldown curve ends at min_lr itself.
      accepts_cooldown: ``--lr_constant_plus_cooldown`` applies (Argonne fork: constant only).
      check: validates the style's own flags (raises ValueError naming the field), or None.
    """

    name: str
    curve: Callable[[_Plan, Any, Any, Any], Any]
    spec: str
    floor_after_decay: bool = True
    accepts_cooldown: bool = False
    check: Callable[[ScheduleConfig], None] | None = None


DECAY_STYLES: dict[str, DecayStyle] = {s.name: s for s in (
    DecayStyle("constant", _constant, "megatron-deepspeed.md §2.2-2.3 (Argonne fork)",
               floor_after_decay=False, accepts_cooldown=True),
    DecayStyle("linear", _linear, "megatron-deepspeed.md §2.2"),
    DecayStyle("cosine", _cosine, "megatron-deepspeed.md §2.2"),
    DecayStyle("inverse-square-root", _inverse_square_root, "schedules-and-cpt.md §4.1"),
    DecayStyle("infinite-cosine", _infinite(_inf_cosine_cooldown),
               "schedules-and-cpt.md §1.5, §4.3 (Argonne fork)", check=_check_infinite),
    DecayStyle("infinite-inv-square-root", _infinite(_inf_inv_sqrt_cooldown),
               "schedules-and-cpt.md §1.5, §4.3 (Argonne fork)", check=_check_infinite),
    DecayStyle("WSD", _wsd, "schedules-and-cpt.md §4.1 (Megatron-LM)", check=_check_wsd),
)}
SCHEDULE_STYLES = tuple(DECAY_STYLES)


def _lr(plan: _Plan, k: Any, xp: Any, dtype: Any) -> Any:
    """Megatron's ``get_lr()`` at ``num_steps = k * GBS`` for integer arrays ``k``.

    Args:
      plan: host constants of the schedule.
      k: integer array of optax counts (updates already applied), any shape.
      xp: ``numpy`` (float64 on the host) or ``jax.numpy`` (float32 under jit).
      dtype: the float dtype of the result.

    Returns:
      The learning rates, ``dtype``, shaped like ``k``.
    """
    cfg = plan.cfg
    kf = k.astype(dtype)
    max_lr, min_lr = cfg.max_lr, cfg.min_lr
    style = DECAY_STYLES[cfg.style]
    after = style.curve(plan, k, xp, dtype)
    if style.floor_after_decay:
        after = xp.where(k > plan.decay, dtype(min_lr), after)
    if plan.last_warmup >= 0:
        warm = cfg.init_lr + (max_lr - cfg.init_lr) * (kf / dtype(plan.warmup))
        after = xp.where(k <= plan.last_warmup, warm, after)
    return after.astype(dtype)


def make_schedule(cfg: ScheduleConfig) -> optax.Schedule:
    """Megatron's LR schedule as an optax schedule (float32, jit-safe, no host callbacks).

    Args:
      cfg: the schedule flags.

    Returns:
      ``schedule(count)``: the LR of the update with optax count ``count`` (0-based), i.e. Megatron
      iteration ``count + 1``, which is Megatron's ``get_lr()`` at ``num_steps = count * GBS``
      samples. ``count`` is an integer scalar or array; the result is float32 of its shape.
    """
    plan = _Plan.from_config(cfg)

    def schedule(count: Any) -> jax.Array:
        k = jnp.asarray(count)
        if not jnp.issubdtype(k.dtype, jnp.integer):
            k = k.astype(jnp.int32)
        return _lr(plan, k, jnp, jnp.float32)

    return schedule


def lr_at_iterations(cfg: ScheduleConfig, iterations: Any) -> np.ndarray:
    """Megatron's LR after ``iterations`` completed iterations, in float64 on the host.

    The value at ``k`` is ``get_lr()`` at ``num_steps = k * GBS``: the ``learning_rate`` Megatron
    logs at iteration ``k`` and the LR the next update uses; it equals ``make_schedule(cfg)(k)``
    up to float32 rounding. For CSV files and plots.

    Args:
      cfg: the schedule flags.
      iterations: non-negative integers, any shape.

    Returns:
      float64 array shaped like ``iterations``.
    """
    its = np.asarray(iterations)
    if its.size and (not np.all(np.isfinite(its)) or np.any(its != np.floor(its)) or np.any(its < 0)):
        raise ValueError(
            f"lr_at_iterations: iterations must be non-negative integers, got {its.ravel()[:5]!r}...")
    return _lr(_Plan.from_config(cfg), its.astype(np.int64), np, np.float64)

