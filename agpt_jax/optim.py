"""AdamW with Megatron's parameter groups, DeepSpeed's gradient clipping, and Megatron's LR schedules.

Optimizer (spec ``megatron-deepspeed.md`` §2.4): AuroraGPT trains with ``torch.optim.AdamW``
(betas (0.9, 0.95), eps 1e-5, weight decay 0.1) inside DeepSpeed ZeRO-1, which clips the global
gradient norm before the step. :func:`make_optimizer` builds the same update as one
``optax.named_chain``:

``"clip"``
    DeepSpeed's clipping (``deepspeed/runtime/zero/stage_1_and_2.py:unscale_and_clip_grads``):
    ``clip = (norm + 1e-6) / clip_grad``; when ``clip > 1`` every gradient is multiplied by
    ``1 / clip``. The global L2 norm over *all* parameters, before clipping, is kept in the state
    (:func:`pre_clip_grad_norm`) so the train step reports it without computing it twice.
``"adam"``
    torch's Adam moments and bias correction (``torch/optim/adam.py:_single_tensor_adam``):
    ``m.lerp_(g, 1 - b1)``, ``v = v * b2 + (1 - b2) g^2``, ``denom = sqrt(v) / sqrt(1 - b2^t) + eps``
    (eps outside the square root), update ``(m / (1 - b1^t)) / denom``. ``t`` is torch's ``step``:
    the number of updates applied, which a converted checkpoint carries (``step.pt``).
``"weight_decay"``
    Decoupled weight decay, masked by Megatron's parameter groups (:func:`weight_decay_mask`):
    torch does ``p *= 1 - lr * wd`` before the Adam step; here ``wd * p`` is added to the update
    before it is scaled by ``-lr``, the same arithmetic.
``"lr"``
    ``-schedule(count)`` with the schedule's own ``count``.

Skipping an update: every transformation here takes an optional ``apply`` (a bool scalar, passed
as ``tx.update(grads, state, params, apply=ok)``). When it is False the update is zero and the state
(counts, moments, stored norm) comes back bit-for-bit unchanged, whatever the gradients hold. The
train step uses it to skip non-finite steps with plain arithmetic instead of a ``lax.cond`` (XLA's
CPU runtime runs a conditional's branches on one thread: the bench_125m optimizer took 1.15-1.35 s
inside one and 0.53-0.67 s outside) or a select of new against old state (which makes XLA copy
all the donated state first).

Two counters, on purpose: the Adam ``count`` (bias correction) and the schedule's ``count`` are
separate leaves of the state. A continued-pretraining run loads a checkpoint's Adam moments and step
(bias correction continues from e.g. 95600) while the LR schedule restarts at 0, which is what
Megatron-DeepSpeed does with ``--universal-checkpoint --finetune`` (spec §2.6). Use
:func:`replace_adam_state` for the former; it leaves the schedule position alone, which
:func:`replace_schedule_count` sets (e.g. to resume a run mid-schedule).

Schedules (spec §2.1-2.3, ``schedules-and-cpt.md`` §1.5 and §4): Megatron's
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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

SCHEDULE_STYLES = (
    "constant",
    "linear",
    "cosine",
    "inverse-square-root",
    "infinite-cosine",
    "infinite-inv-square-root",
    "WSD",
)
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

# DeepSpeed adds this to the norm before dividing by clip_grad (stage_1_and_2.py).
_DEEPSPEED_CLIP_EPS = 1e-6
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------


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
      cooldown_fraction: ``--lr-cooldown-fraction`` of the infinite styles (of the decay samples).
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
    cooldown_fraction: float = 0.65
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
    if cfg.constant_plus_cooldown:
        if cfg.style != "constant":
            _fail("constant_plus_cooldown", True,
                  f"only applies to style 'constant' (style is {cfg.style!r}); use WSD with "
                  "wsd_decay_style='minus_sqrt' for a cooldown after another style")
        if not 0.0 <= cfg.cooldown_frac <= 1.0:
            _fail("cooldown_frac", cfg.cooldown_frac, "must be in [0, 1] (the cooldown length)")
    if cfg.style == "WSD":
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
    if cfg.style.startswith("infinite-"):
        if not cfg.min_lr < cfg.constant_lr <= cfg.max_lr:
            _fail("constant_lr", cfg.constant_lr,
                  f"infinite schedules need min_lr < constant_lr <= max_lr "
                  f"(min_lr = {cfg.min_lr}, max_lr = {cfg.max_lr})")
        if cfg.min_lr <= 0.0:
            _fail("min_lr", cfg.min_lr,
                  "infinite schedules anneal exponentially to min_lr (log(min_lr / constant_lr)), "
                  "so min_lr must be > 0")
        if not 0.0 < cfg.cooldown_fraction <= 1.0:
            _fail("cooldown_fraction", cfg.cooldown_fraction, "must be in (0, 1]")
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
        cc_s = cfg.cooldown_fraction * decay_samples
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

    def clip01(x: Any) -> Any:
        return xp.clip(x, 0.0, 1.0)

    # Share of the way from the decay's end back to its start, (D - n) / (D - W), exact numerator.
    q_decay = clip01((plan.decay - k).astype(dtype) / dtype(plan.decay - plan.warmup))
    style = cfg.style
    if style == "constant":
        if cfg.constant_plus_cooldown and plan.cooldown > 0:
            # 1 - sqrt(ratio) = (1 - ratio) / (1 + sqrt(ratio)), 1 - ratio = (D - n) / C exactly.
            ratio = clip01(plan.cooldown_start.since(k, xp, dtype) / dtype(plan.cooldown))
            one_minus = clip01((plan.decay - k).astype(dtype) / dtype(plan.cooldown))
            cool = min_lr + (max_lr - min_lr) * (one_minus / (1.0 + xp.sqrt(ratio)))
            after = xp.where(k <= plan.last_constant, dtype(max_lr), cool)
            after = xp.where(k > plan.last_not_min, dtype(min_lr), after)
        elif cfg.constant_plus_cooldown:  # C == 0: max_lr until the end of the decay, then min_lr
            after = xp.where(k > plan.last_not_min, dtype(min_lr), dtype(max_lr))
        else:
            after = xp.full(k.shape, max_lr, dtype)
    elif style == "linear":
        after = min_lr + (max_lr - min_lr) * q_decay
    elif style == "cosine":
        after = min_lr + (max_lr - min_lr) * _sin2_half_pi(q_decay, xp)
    elif style == "inverse-square-root":
        # max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)), in iterations to keep n out of float32.
        gbs = cfg.global_batch_size
        a = max(plan.warmup * gbs, 1.0) / gbs
        after = xp.maximum(dtype(min_lr), max_lr * xp.sqrt(a / xp.maximum(kf, dtype(1.0 / gbs))))
    elif style == "WSD":
        wsd = cfg.wsd_decay_iters
        start = plan.decay - wsd
        q = clip01((plan.decay - k).astype(dtype) / dtype(wsd))  # 1 - r, exact numerator
        r = clip01((k - start).astype(dtype) / dtype(wsd))
        shape = cfg.wsd_decay_style
        if shape == "linear":
            coeff = q
        elif shape == "cosine":
            coeff = _sin2_half_pi(q, xp)
        elif shape == "exponential":
            coeff = xp.expm1(q * math.log(2.0))  # 2 * 0.5^r - 1 = 2^(1 - r) - 1
        else:  # minus_sqrt: 1 - sqrt(r)
            coeff = q / (1.0 + xp.sqrt(r))
        coeff = xp.where(k <= start, dtype(1.0), coeff)
        after = min_lr + (max_lr - min_lr) * coeff
    else:  # infinite-cosine | infinite-inv-square-root (Argonne fork)
        const = cfg.constant_lr
        cr = clip01(_Offset.of(plan.warmup).since(k, xp, dtype) / dtype(plan.inf_cooldown))
        if style == "infinite-cosine":
            cooldown = const + (max_lr - const) * (0.5 * (xp.cos(math.pi * cr) + 1.0))
        else:
            alpha = cfg.timescale

            def h(x: Any) -> Any:  # 1 / sqrt(1 + alpha x) - 1, without cancellation near 0
                s = xp.sqrt(1.0 + alpha * x)
                return -(alpha * x) / (s * (1.0 + s))

            cooldown = max_lr - (max_lr - const) * (h(cr) / h(dtype(1.0)))
        m = xp.maximum(plan.anneal_start.since(k, xp, dtype), dtype(0.0))
        anneal = const * xp.exp(math.log(min_lr / const) * (m / dtype(plan.anneal_len)))
        after = xp.where(k <= plan.last_inf_constant, dtype(const), anneal)
        after = xp.where(k <= plan.last_inf_cooldown, cooldown, after)
        after = xp.maximum(after, dtype(min_lr))

    if style != "constant":
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


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and clipping settings (Megatron flags and the DeepSpeed config).

    Attributes:
      beta1: ``--adam-beta1``.
      beta2: ``--adam-beta2``.
      eps: ``--adam-eps``, added outside the square root (torch).
      weight_decay: ``--weight-decay`` for the decayed group (matrices); norms and biases get 0.
      clip_grad: DeepSpeed ``gradient_clipping``: grads are multiplied by
        ``1 / ((norm + 1e-6) / clip_grad)`` when that ratio exceeds 1; 0 disables clipping.
    """

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"OptimConfig.{name}={value!r}: must be in [0, 1)")
        if not self.eps > 0.0:
            raise ValueError(f"OptimConfig.eps={self.eps!r}: must be > 0")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        if not self.clip_grad >= 0.0:
            raise ValueError(f"OptimConfig.clip_grad={self.clip_grad!r}: must be >= 0 (0 disables)")


class DeepSpeedClipState(NamedTuple):
    """State of :func:`clip_by_deepspeed_global_norm`.

    Attributes:
      grad_norm: float32 scalar, global L2 norm of the last gradients, before clipping.
    """

    grad_norm: jax.Array


class TorchAdamState(NamedTuple):
    """State of :func:`scale_by_torch_adam`, torch's ``state['step']``, ``exp_avg``, ``exp_avg_sq``.

    Attributes:
      count: int32 scalar, updates applied (torch's ``step``; bias correction uses ``count + 1``).
      mu: first moments, float32, the params' tree.
      nu: second moments, float32, the params' tree.
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree


def global_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm of all leaves, accumulated in float32.

    Args:
      tree: arrays of any float dtype and shape.

    Returns:
      float32 scalar ``sqrt(sum over leaves of sum(x^2))``.
    """
    leaves = jax.tree.leaves(tree)
    total = sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0.0))
    return jnp.sqrt(total)


def clip_by_deepspeed_global_norm(clip_grad: float) -> optax.GradientTransformation:
    """DeepSpeed ZeRO's global-norm clipping (``stage_1_and_2.py:unscale_and_clip_grads``).

    ``clip = (norm + 1e-6) / clip_grad``; if ``clip > 1`` the gradients are multiplied by
    ``1 / clip``, otherwise left unchanged. ``clip_grad == 0`` disables clipping; the norm is still
    computed and stored for logging. Outputs are float32.

    Args:
      clip_grad: the DeepSpeed ``gradient_clipping`` value, >= 0.

    Returns:
      The transformation; its state holds the pre-clip norm (:func:`pre_clip_grad_norm`).
    """
    if clip_grad < 0:
        raise ValueError(f"clip_grad={clip_grad!r}: must be >= 0 (0 disables clipping)")

    def init_fn(params: PyTree) -> DeepSpeedClipState:
        del params
        return DeepSpeedClipState(grad_norm=jnp.zeros([], jnp.float32))

    def update_fn(updates: PyTree, state: DeepSpeedClipState, params: PyTree = None, *,
                  apply: Any = None, **extra_args: Any):
        del params, extra_args
        norm = global_norm(updates)
        updates = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        if clip_grad > 0:
            clip = (norm + jnp.float32(_DEEPSPEED_CLIP_EPS)) / jnp.float32(clip_grad)
            scale = jnp.where(clip > 1.0, 1.0 / clip, jnp.float32(1.0))
            updates = jax.tree.map(lambda g: g * scale, updates)
        if apply is None:
            return updates, DeepSpeedClipState(grad_norm=norm)
        # A skipped update passes zeros on, so nothing downstream sees a non-finite gradient.
        updates = jax.tree.map(lambda g: jnp.where(apply, g, jnp.float32(0.0)), updates)
        return updates, DeepSpeedClipState(grad_norm=jnp.where(apply, norm, state.grad_norm))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's bias-corrected direction, with torch's arithmetic (``torch/optim/adam.py``).

    ``m <- m + (1 - b1)(g - m)`` (``lerp_``), ``v <- v b2 + (1 - b2) g^2``, ``t <- t + 1``;
    output ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``. The caller scales it by
    ``-lr``. ``1 - b^t`` is computed as ``-expm1(t log b)`` with ``log b`` in float64 on the host,
    which is closer to torch's float64 bias correction than ``1 - b**t`` in float32.

    Args:
      b1: beta1.
      b2: beta2.
      eps: added to the bias-corrected root of the second moment.

    Returns:
      The transformation with :class:`TorchAdamState`.
    """
    log_b1 = math.log(b1) if b1 > 0 else -math.inf
    log_b2 = math.log(b2) if b2 > 0 else -math.inf

    def init_fn(params: PyTree) -> TorchAdamState:
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
        return TorchAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates: PyTree, state: TorchAdamState, params: PyTree = None, *,
                  apply: Any = None, **extra_args: Any):
        del params, extra_args
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        if apply is None:
            mu = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.mu, grads)
            nu = jax.tree.map(lambda v, g: v * b2 + (1.0 - b2) * (g * g), state.nu, grads)
            count = optax.safe_int32_increment(state.count)
        else:
            # The same arithmetic when applied (x 1.0 is exact); a skipped update gets the weights
            # 0 and decay 1, so m + 0 (0 - m) = m and v 1 + 0 = v exactly (the clip transform
            # zeroed the gradients of a skipped update).
            on = jnp.asarray(apply, jnp.bool_)
            w1 = jnp.where(on, jnp.float32(1.0 - b1), jnp.float32(0.0))
            w2 = jnp.where(on, jnp.float32(1.0 - b2), jnp.float32(0.0))
            decay2 = jnp.where(on, jnp.float32(b2), jnp.float32(1.0))
            mu = jax.tree.map(lambda m, g: m + w1 * (g - m), state.mu, grads)
            nu = jax.tree.map(lambda v, g: v * decay2 + w2 * (g * g), state.nu, grads)
            count = jnp.where(on, optax.safe_int32_increment(state.count), state.count)
        # t >= 1 after any applied update; the floor only keeps a skipped first update (count
        # still 0) from dividing 0 by 0, and its output is multiplied by 0 downstream.
        t = jnp.maximum(count, 1).astype(jnp.float32)
        bc1 = -jnp.expm1(t * log_b1)
        bc2_sqrt = jnp.sqrt(-jnp.expm1(t * log_b2))
        out = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / bc2_sqrt + eps), mu, nu)
        return out, TorchAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_schedule(schedule: optax.Schedule) -> optax.GradientTransformation:
    """``optax.scale_by_schedule`` (same state) that also honours ``apply`` (module docstring).

    Args:
      schedule: optax count -> step size; the update is multiplied by it.

    Returns:
      The transformation; a skipped update multiplies by 0 and leaves ``count`` unchanged.
    """

    def init_fn(params: PyTree) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: PyTree, state: optax.ScaleByScheduleState, params: PyTree = None, *,
                  apply: Any = None, **extra_args: Any):
        del params, extra_args
        step = jnp.asarray(schedule(state.count), jnp.float32)
        count = optax.safe_int32_increment(state.count)
        if apply is not None:
            step = jnp.where(apply, step, jnp.float32(0.0))
            count = jnp.where(apply, count, state.count)
        updates = jax.tree.map(lambda g: step.astype(g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def weight_decay_mask(params: PyTree, stacked_key: str = "layers") -> PyTree:
    """Megatron's parameter groups: True where weight decay applies.

    ``megatron/optimizer/__init__.py:get_param_groups`` puts parameters named ``*.bias`` or with
    ``len(shape) == 1`` in the no-decay group; every other parameter decays. Layers stacked under
    ``stacked_key`` carry a leading layer axis, so their per-layer rank is ``ndim - 1``: a norm
    scale ``[L, H]`` is a 1-D parameter per layer (no decay), a kernel ``[L, H, heads, head_dim]``
    is a matrix per layer (decay).

    Args:
      params: nested dict of arrays (or ``jax.ShapeDtypeStruct``).
      stacked_key: the dict key under which layers are stacked along axis 0.

    Returns:
      A tree of Python bools shaped like ``params``.
    """

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        names = [_key_name(e) for e in path]
        rank = len(jnp.shape(leaf)) - (1 if stacked_key in names else 0)
        return rank >= 2 and (not names or names[-1] != "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with Megatron's param groups and DeepSpeed's clipping, stepping ``schedule``.

    The update is ``-lr * (adam_direction + wd * mask * p)`` with ``lr = schedule(count)`` and the
    schedule's own ``count`` (see the module docstring). Runs in float32 inside jit.

    Args:
      cfg: betas, eps, weight decay and clipping.
      schedule: optax count -> LR, e.g. :func:`make_schedule`.

    Returns:
      ``optax.named_chain`` of ``clip``, ``adam``, ``weight_decay`` and ``lr``; its state is a dict
      with those keys (read it with :func:`adam_state`, :func:`schedule_count`,
      :func:`pre_clip_grad_norm`).
    """
    return optax.named_chain(
        ("clip", clip_by_deepspeed_global_norm(cfg.clip_grad)),
        ("adam", scale_by_torch_adam(cfg.beta1, cfg.beta2, cfg.eps)),
        ("weight_decay", optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask)),
        ("lr", scale_by_schedule(lambda count: -schedule(count))),
    )


def _entry(opt_state: Any, name: str) -> Any:
    if not isinstance(opt_state, dict) or name not in opt_state:
        raise ValueError(
            f"optimizer state has no {name!r} entry (keys: "
            f"{sorted(opt_state) if isinstance(opt_state, dict) else type(opt_state).__name__}); "
            "pass the state of a transformation built by agpt_jax.optim.make_optimizer")
    return opt_state[name]


def adam_state(opt_state: Any) -> tuple[jax.Array, PyTree, PyTree]:
    """The Adam step and moments of a :func:`make_optimizer` state.

    Returns:
      ``(count, mu, nu)``: int32 scalar updates applied (torch's ``step``), and the float32
      ``exp_avg`` / ``exp_avg_sq`` trees shaped like the params.
    """
    adam = _entry(opt_state, "adam")
    return adam.count, adam.mu, adam.nu


def _check_like(name: str, new: PyTree, old: PyTree) -> None:
    new_def, old_def = jax.tree.structure(new), jax.tree.structure(old)
    if new_def != old_def:
        raise ValueError(f"replace_adam_state: {name} has tree structure {new_def}, "
                         f"expected the params' structure {old_def}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"replace_adam_state: {name}{jax.tree_util.keystr(path)} has shape "
                             f"{jnp.shape(a)}, expected {jnp.shape(b)}")


def replace_adam_state(opt_state: Any, count: Any, mu: PyTree, nu: PyTree) -> Any:
    """A copy of ``opt_state`` with the Adam step and moments replaced (e.g. from a checkpoint).

    The schedule position is left as it is, so a CPT run can continue bias correction from the
    checkpoint's step while its LR schedule starts at 0 (Megatron ``--finetune``, spec §2.6).

    Args:
      opt_state: a :func:`make_optimizer` state.
      count: updates applied so far (torch's ``step``), a non-negative integer or int array.
      mu: first moments, shaped like the params; cast to float32.
      nu: second moments, shaped like the params; cast to float32.

    Returns:
      The new state.
    """
    adam = _entry(opt_state, "adam")
    _check_like("mu", mu, adam.mu)
    _check_like("nu", nu, adam.nu)
    if isinstance(count, (int, float, np.integer, np.floating)):
        if count < 0 or count != int(count) or count > _INT32_MAX:
            raise ValueError(f"replace_adam_state: count={count!r} must be an integer in [0, 2^31)")
    new = TorchAdamState(
        count=jnp.asarray(count).astype(jnp.int32).reshape(()),
        mu=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mu),
        nu=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nu),
    )
    return _with_entry(opt_state, "adam", new)


def _with_entry(opt_state: Any, name: str, value: Any) -> Any:
    """A shallow copy of a named-chain state with one entry replaced, of the same mapping type
    (optax's named_chain state is an OrderedDict; jit out_shardings built from a fresh state
    require the same type at jax 0.11)."""
    out = type(opt_state)(opt_state)
    out[name] = value
    return out


def schedule_count(opt_state: Any) -> jax.Array:
    """The optax count the LR schedule reads for the next update (int32 scalar)."""
    return _entry(opt_state, "lr").count


def replace_schedule_count(opt_state: Any, count: Any) -> Any:
    """A copy of ``opt_state`` whose next update uses ``schedule(count)``; Adam is untouched."""
    if isinstance(count, (int, np.integer)) and not 0 <= count <= _INT32_MAX:
        raise ValueError(f"replace_schedule_count: count={count!r} must be in [0, 2^31)")
    state = _entry(opt_state, "lr")
    return _with_entry(opt_state, "lr",
                       state._replace(count=jnp.asarray(count).astype(jnp.int32).reshape(())))


def pre_clip_grad_norm(opt_state: Any) -> jax.Array:
    """Global L2 norm (float32) of the gradients of the last update, before clipping."""
    return _entry(opt_state, "clip").grad_norm


def learning_rate(opt_state: Any, schedule: optax.Schedule) -> jax.Array:
    """The LR the next update of ``opt_state`` will use (float32 scalar)."""
    return schedule(schedule_count(opt_state))
