"""AdamW + Megatron param groups + DeepSpeed clipping against torch.optim.AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agpt_jax import optim
from agpt_jax import schedules
from torch_reference import torch

L, H, HEADS, HEAD_DIM, F, V = 2, 16, 4, 4, 24, 40
# Leaves that are norms (1-D per layer or at the top): Megatron's no-weight-decay group.
NORMS = {("layers", "attn_norm", "scale"), ("layers", "mlp_norm", "scale"), ("final_norm", "scale")}


def make_params(seed: int = 0) -> dict:
    """A small Llama-like param tree with layers stacked on axis 0, as the model stores them."""
    rng = np.random.default_rng(seed)
    n = lambda *s: (0.02 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {
        "embed": {"embedding": n(V, H)},
        "layers": {
            "attn_norm": {"scale": (1.0 + n(L, H)).astype(np.float32)},
            "attn": {"q": {"kernel": n(L, H, HEADS, HEAD_DIM)}, "o": {"kernel": n(L, HEADS, HEAD_DIM, H)}},
            "mlp_norm": {"scale": (1.0 + n(L, H)).astype(np.float32)},
            "mlp": {"wi": {"kernel": n(L, H, F)}, "wo": {"kernel": n(L, F, H)}},
        },
        "final_norm": {"scale": (1.0 + n(H)).astype(np.float32)},
        "lm_head": {"kernel": n(H, V)},
    }


def flat(tree: dict) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(k.key for k in path): x if isinstance(x, bool) else np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def torch_reference(params, grads_per_step, lrs, cfg: optim.OptimConfig, init_state=None):
    """torch.optim.AdamW with Megatron's two groups and DeepSpeed's clipping, written with torch ops.

    Returns per step: (params, exp_avg, exp_avg_sq, step, pre-clip norm, clip factor).
    """
    fp = flat(params)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in fp.items()}
    decay = [t for k, t in tensors.items() if k not in NORMS]
    no_decay = [t for k, t in tensors.items() if k in NORMS]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},  # wd_no_scale_lr
         {"params": no_decay, "weight_decay": 0.0}],  # no_wd_no_scale_lr
        lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    if init_state is not None:
        step, mu, nu = init_state
        for k, t in tensors.items():
            opt.state[t] = {"step": torch.tensor(float(step)),
                            "exp_avg": torch.tensor(mu[k]), "exp_avg_sq": torch.tensor(nu[k])}
    out = []
    for grads, lr in zip(grads_per_step, lrs):
        g = {k: torch.tensor(v) for k, v in flat(grads).items()}
        # DeepSpeed: total norm over all params, clip = (norm + 1e-6) / clip_grad, g *= 1 / clip.
        norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in g.values()))
        clip = (norm + 1e-6) / cfg.clip_grad if cfg.clip_grad > 0 else 1.0
        for k, t in tensors.items():
            t.grad = g[k] * (1.0 / clip) if clip > 1 else g[k].clone()
        for group in opt.param_groups:
            group["lr"] = float(lr)
        opt.step()
        out.append((
            {k: t.detach().numpy().copy() for k, t in tensors.items()},
            {k: opt.state[t]["exp_avg"].numpy().copy() for k, t in tensors.items()},
            {k: opt.state[t]["exp_avg_sq"].numpy().copy() for k, t in tensors.items()},
            int(opt.state[tensors[("lm_head", "kernel")]]["step"]),
            norm, clip))
    return out


def random_grads(n_steps: int, scale: float, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    params = make_params()
    return [jax.tree.map(lambda p: (scale * rng.standard_normal(p.shape)).astype(np.float32), params)
            for _ in range(n_steps)]


def run_jax(params, grads_per_step, tx, opt_state=None, apply=True):
    """Runs the updates as the train step does (`apply` passed, True) or without it (None)."""
    opt_state = tx.init(params) if opt_state is None else opt_state
    extra = {} if apply is None else {"apply": jnp.asarray(apply)}

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, updates), s

    out = []
    p = jax.tree.map(jnp.asarray, params)
    for g in grads_per_step:
        p, opt_state = step(p, opt_state, g)
        count, mu, nu = optim.adam_state(opt_state)
        out.append((flat(p), flat(mu), flat(nu), int(count), float(optim.pre_clip_grad_norm(opt_state))))
    return out, opt_state


def assert_close(jx: dict, ref: dict, what: str, rtol: float, atol: float) -> None:
    """Elementwise fp32 closeness; elements that cancel to near zero are judged on the tensor's scale."""
    assert jx.keys() == ref.keys()
    for k in ref:
        scale_atol = max(atol, rtol * float(np.max(np.abs(ref[k]))))
        np.testing.assert_allclose(jx[k], ref[k], rtol=rtol, atol=scale_atol, err_msg=f"{what} {k}")


@pytest.mark.parametrize("cfg", [
    optim.OptimConfig(),  # AuroraGPT: betas (0.9, 0.95), eps 1e-5, wd 0.1, clip 1.0
    optim.OptimConfig(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, clip_grad=0.3),
], ids=["auroragpt", "other"])
@pytest.mark.torch
def test_matches_torch_adamw_with_deepspeed_clipping_over_steps(cfg):
    """Params, moments, step and pre-clip norm match torch over 6 steps, clipping active, LR moving."""
    sched_cfg = schedules.ScheduleConfig(style="cosine", max_lr=3e-3, min_lr=3e-4,
                                         train_iters=8, warmup_iters=2, init_lr=1e-3)
    schedule = schedules.make_schedule(sched_cfg)
    params, grads = make_params(), random_grads(6, scale=0.5)
    lrs = schedules.lr_at_iterations(sched_cfg, np.arange(6))
    assert len(set(np.round(lrs, 12))) == 6, "the LR must change every step"
    ref = torch_reference(params, grads, lrs, cfg)
    got, _ = run_jax(params, grads, optim.make_optimizer(cfg, schedule))
    for i, ((p, mu, nu, count, norm), (tp, tmu, tnu, tstep, tnorm, clip)) in enumerate(zip(got, ref)):
        assert clip > 1.5, f"step {i}: clipping must be active (clip factor {clip})"
        assert count == tstep == i + 1
        np.testing.assert_allclose(norm, tnorm, rtol=1e-6)
        assert_close(mu, tmu, f"step {i} exp_avg", rtol=2e-6, atol=1e-9)
        assert_close(nu, tnu, f"step {i} exp_avg_sq", rtol=2e-6, atol=1e-12)
        assert_close(p, tp, f"step {i} param", rtol=1e-6, atol=1e-8)
    # The update really moved the params (a test that compares two no-ops cannot fail).
    moved = max(np.max(np.abs(got[-1][0][k] - v)) for k, v in flat(params).items())
    assert moved > 1e-3


@pytest.mark.torch
def test_no_clipping_below_threshold_and_clip_zero_disables():
    """Small grads pass unclipped; clip_grad=0 leaves large grads unclipped, like DeepSpeed."""
    params = make_params()
    lrs = np.full(3, 1e-3)
    schedule = optax.constant_schedule(1e-3)
    for cfg, scale in ((optim.OptimConfig(), 1e-3), (optim.OptimConfig(clip_grad=0.0), 0.5)):
        grads = random_grads(3, scale=scale, seed=7)
        ref = torch_reference(params, grads, lrs, cfg)
        got, _ = run_jax(params, grads, optim.make_optimizer(cfg, schedule))
        for (p, mu, _, _, norm), (tp, tmu, _, _, tnorm, clip) in zip(got, ref):
            assert clip == 1.0 or clip < 1.0
            np.testing.assert_allclose(norm, tnorm, rtol=1e-6)
            assert_close(mu, tmu, "exp_avg", rtol=2e-6, atol=1e-12)
            assert_close(p, tp, "param", rtol=1e-6, atol=1e-8)
    # Without clipping the first moment is (1 - beta1) * g exactly as given.
    g0 = flat(random_grads(1, scale=0.5, seed=7)[0])
    np.testing.assert_allclose(got[0][1][("lm_head", "kernel")], 0.1 * g0[("lm_head", "kernel")],
                               rtol=1e-6)


@pytest.mark.torch
def test_cpt_load_continues_bias_correction_while_schedule_restarts():
    """A converted checkpoint's step/moments load into Adam; the LR schedule still starts at 0.

    Megatron --universal-checkpoint --finetune (spec §2.6): torch's state['step'] = 95600 and its
    moments are loaded, the scheduler is fresh. The next update must equal torch's with that state.
    """
    cfg = optim.OptimConfig()
    sched_cfg = schedules.ScheduleConfig(style="cosine", max_lr=2e-4, train_iters=10,
                                         warmup_iters=2, init_lr=5e-5)
    schedule = schedules.make_schedule(sched_cfg)
    params = make_params()
    tx = optim.make_optimizer(cfg, schedule)
    rng = np.random.default_rng(3)
    mu = jax.tree.map(lambda p: (1e-3 * rng.standard_normal(p.shape)).astype(np.float32), params)
    nu = jax.tree.map(lambda p: (1e-6 * rng.random(p.shape)).astype(np.float32), params)
    state = tx.init(params)
    state = optim.replace_schedule_count(state, 5)  # pretend a run was mid-schedule ...
    state = optim.replace_adam_state(state, 95600, mu, nu)
    assert int(optim.schedule_count(state)) == 5  # ... replace_adam_state leaves it alone
    state = optim.replace_schedule_count(state, 0)  # CPT: the schedule restarts
    np.testing.assert_allclose(float(optim.learning_rate(state, schedule)), 5e-5, rtol=1e-6)
    grads = random_grads(3, scale=0.5, seed=11)
    lrs = schedules.lr_at_iterations(sched_cfg, np.arange(3))
    ref = torch_reference(params, grads, lrs, cfg, init_state=(95600, flat(mu), flat(nu)))
    got, state = run_jax(params, grads, tx, state)
    assert int(optim.schedule_count(state)) == 3
    for (p, m, v, count, _), (tp, tm, tv, tstep, _, _) in zip(got, ref):
        assert count == tstep
        assert_close(m, tm, "exp_avg", rtol=2e-6, atol=1e-10)
        assert_close(v, tv, "exp_avg_sq", rtol=2e-6, atol=1e-13)
        assert_close(p, tp, "param", rtol=1e-6, atol=1e-8)
    assert got[0][3] == 95601


def test_weight_decay_mask_uses_per_layer_rank():
    """Megatron's rule on stacked layers: norms (1-D per layer) no decay, every matrix decays."""
    params = make_params()
    mask = flat(optim.weight_decay_mask(params))
    assert {k for k, v in mask.items() if not v} == NORMS
    assert all(isinstance(v, bool) for v in mask.values())
    # Works on abstract params (eval_shape), and a bias is never decayed, whatever its rank.
    abstract = jax.eval_shape(lambda: params)
    assert flat(optim.weight_decay_mask(abstract)) == mask
    odd = {"layers": {"proj": {"bias": np.zeros((L, H)), "kernel": np.zeros((L, H, H))},
                      "vec": np.zeros((L, H, 1))},
           "top_bias": {"bias": np.zeros((H, H))}, "vec": np.zeros((H,))}
    m = flat(optim.weight_decay_mask(odd))
    assert m == {("layers", "proj", "bias"): False, ("layers", "proj", "kernel"): True,
                 ("layers", "vec"): True, ("top_bias", "bias"): False, ("vec",): False}


def test_decay_applies_only_to_the_mask():
    """With zero gradients the only change is p * (1 - lr * wd) on matrices; norms stay put."""
    params = make_params()
    tx = optim.make_optimizer(optim.OptimConfig(weight_decay=0.1), optax.constant_schedule(0.5))
    zeros = jax.tree.map(np.zeros_like, params)
    (p, *_), = run_jax(params, [zeros], tx)[0]
    for k, v in flat(params).items():
        expected = v if k in NORMS else v * (1 - 0.5 * 0.1)
        np.testing.assert_allclose(p[k], expected, rtol=1e-6, err_msg=str(k))


def test_update_is_float32_and_has_no_host_callbacks():
    params = make_params()
    schedule = schedules.make_schedule(schedules.ScheduleConfig(train_iters=100,
                                                                warmup_fraction=0.1))
    tx = optim.make_optimizer(optim.OptimConfig(), schedule)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), random_grads(1, 0.5)[0])
    jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(grads, state, params))
    assert "callback" not in jaxpr
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(optim.adam_state(new_state)[1:]))
    assert optim.pre_clip_grad_norm(new_state).dtype == jnp.float32


def test_global_norm_is_float32_over_all_leaves():
    tree = {"a": jnp.full((3,), 2.0, jnp.bfloat16), "b": {"c": jnp.full((2, 2), 1.5, jnp.float32)}}
    norm = optim.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), math.sqrt(3 * 4.0 + 4 * 2.25), rtol=1e-7)


def test_bad_input_errors_name_the_field():
    with pytest.raises(ValueError, match="beta2"):
        optim.OptimConfig(beta2=1.0)
    with pytest.raises(ValueError, match="clip_grad"):
        optim.OptimConfig(clip_grad=-1.0)
    with pytest.raises(ValueError, match="eps"):
        optim.OptimConfig(eps=0.0)
    params = make_params()
    tx = optim.make_optimizer(optim.OptimConfig(), optax.constant_schedule(1e-3))
    state = tx.init(params)
    mu = flat(params)
    bad = jax.tree.map(np.zeros_like, params)
    bad["lm_head"]["kernel"] = np.zeros((V, H), np.float32)
    with pytest.raises(ValueError, match=r"mu\['lm_head'\]\['kernel'\] has shape"):
        optim.replace_adam_state(state, 1, bad, params)
    with pytest.raises(ValueError, match="tree structure"):
        optim.replace_adam_state(state, 1, mu, params)
    with pytest.raises(ValueError, match="count"):
        optim.replace_adam_state(state, -1, params, params)
    with pytest.raises(ValueError, match="make_optimizer"):
        optim.adam_state(optax.adam(1e-3).init(params))


def test_skipped_update_leaves_state_bit_identical_and_apply_true_changes_nothing():
    """apply=False is an exact no-op even on non-finite grads, also as the very first update;
    apply=True is the plain update (to fp32 rounding: XLA may contract the two forms differently)."""
    cfg = optim.OptimConfig()
    schedule = schedules.make_schedule(schedules.ScheduleConfig(
        style="constant", max_lr=1e-2, min_lr=1e-2, train_iters=10, global_batch_size=1))
    tx = optim.make_optimizer(cfg, schedule)
    params = jax.tree.map(jnp.asarray, make_params())
    grads = random_grads(3, scale=0.5)
    bad = jax.tree.map(lambda g: g.copy(), grads[0])
    bad["lm_head"]["kernel"][0, 0] = np.nan
    bad["embed"]["embedding"][1, 2] = np.inf

    @jax.jit
    def step(p, s, g, ok):
        updates, s = tx.update(g, s, p, apply=ok)
        return optax.apply_updates(p, updates), s, optim.global_norm(updates)

    @jax.jit
    def step_plain(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    def same(a, b):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def close(a, b):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)

    state = tx.init(params)
    # Skipped first update (count 0): nothing moves, no NaN from 0 / 0 bias correction.
    p1, s1, norm = step(params, state, bad, jnp.asarray(False))
    same((p1, s1), (params, state))
    assert float(norm) == 0.0
    # An applied update is the plain one.
    p2, s2, _ = step(p1, s1, grads[1], jnp.asarray(True))
    q2, r2 = step_plain(params, state, grads[1])
    close((p2, s2), (q2, r2))
    assert np.max(np.abs(np.asarray(p2["lm_head"]["kernel"] - params["lm_head"]["kernel"]))) > 1e-3
    assert int(optim.adam_state(s2)[0]) == 1 and int(optim.schedule_count(s2)) == 1
    # A skip mid-run: params, moments, counts and the stored pre-clip norm stay as they were.
    p3, s3, norm = step(p2, s2, bad, jnp.asarray(False))
    same((p3, s3), (p2, s2))
    assert float(norm) == 0.0
    # ... and the run continues as if the skipped step never happened.
    close(step(p3, s3, grads[2], jnp.asarray(True))[:2], step_plain(q2, r2, grads[2]))
