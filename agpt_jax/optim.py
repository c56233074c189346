"""AdamW with Megatron's parameter groups and DeepSpeed's clipping, and its state accessors.

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
    ``-schedule(count)`` with the schedule's own ``count``; the schedule is an optax schedule,
    e.g. :func:`agpt_jax.schedules.make_schedule` (Megatron's LR schedules live there).

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# DeepSpeed adds this to the norm before dividing by clip_grad (stage_1_and_2.py).
_DEEPSPEED_CLIP_EPS = 1e-6
_INT32_MAX = 2**31 - 1


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
