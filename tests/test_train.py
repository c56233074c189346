"""The compiled train step: sharded runs equal the unsharded run, accumulation, skipping, AOT."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agpt_jax import model as model_lib
from agpt_jax import optim
from agpt_jax import runtime
from agpt_jax import schedules
from agpt_jax import train

CFG = model_lib.get_preset("tiny").replace(remat="full")
GBS = 16
OPTIM = optim.OptimConfig(clip_grad=1.0)
SCHEDULE = schedules.make_schedule(schedules.ScheduleConfig(
    style="cosine", max_lr=3e-3, min_lr=3e-4, train_iters=10, warmup_iters=2,
    global_batch_size=GBS))


def _batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = rng.integers(0, CFG.vocab_size, size=(GBS, CFG.seq_length + 1)).astype(np.int32)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:]})
    return out


def _run(mesh_cfg: runtime.MeshConfig, steps: int = 3, grad_acc_steps: int = 2,
         strategy: str = "fsdp", devices=None):
    mesh = runtime.make_mesh(mesh_cfg, devices=devices)
    trainer = train.build_trainer(CFG, OPTIM, SCHEDULE, train.StepConfig(GBS, grad_acc_steps), mesh,
                                  strategy=strategy)
    state = trainer.init(jax.random.PRNGKey(0))
    losses = []
    for b in _batches(steps):
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()}
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params), metrics


@pytest.fixture(scope="module")
def single_device_run():
    return _run(runtime.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_cfg,strategy", [
    (runtime.MeshConfig(data=8, fsdp=1, tensor=1), "fsdp"),
    (runtime.MeshConfig(data=2, fsdp=4, tensor=1), "fsdp"),
    (runtime.MeshConfig(data=2, fsdp=2, tensor=2), "fsdp"),
    (runtime.MeshConfig(data=1, fsdp=8, tensor=1), "zero1"),
])
def test_sharded_steps_equal_single_device(single_device_run, mesh_cfg, strategy):
    ref_losses, ref_params, _ = single_device_run
    losses, params, _ = _run(mesh_cfg, strategy=strategy)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_params_are_actually_sharded():
    mesh = runtime.make_mesh(runtime.MeshConfig(data=2, fsdp=2, tensor=2))
    trainer = train.build_trainer(CFG, OPTIM, SCHEDULE, train.StepConfig(GBS, 1), mesh)
    state = trainer.init(jax.random.PRNGKey(0))
    q = state.params["layers"]["attn"]["q"]  # [L, H, heads, D]: embed over fsdp, heads over tensor
    assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
    assert q.addressable_shards[0].data.shape == (CFG.num_layers, CFG.hidden_size // 2,
                                                  CFG.num_heads // 2, CFG.head_dim)
    mu = optim.adam_state(state.opt_state)[1]["layers"]["attn"]["q"]
    assert mu.sharding == q.sharding


def test_gradient_accumulation_does_not_change_the_update(single_device_run):
    ref_losses, ref_params, _ = single_device_run
    losses, params, _ = _run(runtime.MeshConfig(data=1, fsdp=1, tensor=1), grad_acc_steps=4,
                             devices=jax.devices()[:1])
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_metrics_follow_the_schedule_and_loss_falls():
    mesh = runtime.make_mesh(runtime.MeshConfig(data=1, fsdp=8, tensor=1))
    trainer = train.build_trainer(CFG, OPTIM, SCHEDULE, train.StepConfig(GBS, 1), mesh)
    state = trainer.init(jax.random.PRNGKey(1))
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in _batches(1, seed=3)[0].items()}
    lrs, losses = [], []
    for _ in range(8):
        state, m = trainer.step(state, batch)
        lrs.append(float(m["lr"]))
        losses.append(float(m["loss"]))
        assert m["sequence_loss"].shape == (GBS,)
        np.testing.assert_allclose(float(jnp.mean(m["sequence_loss"])), losses[-1], rtol=1e-6)
    expected = schedules.lr_at_iterations(schedules.ScheduleConfig(
        style="cosine", max_lr=3e-3, min_lr=3e-4, train_iters=10, warmup_iters=2,
        global_batch_size=GBS), np.arange(0, 8))  # LR after k completed iterations
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[0] == 0.0  # Megatron: iteration 1 of a warmup runs at init_lr
    assert losses[-1] < losses[1] - 0.5  # memorising one batch
    assert int(state.step) == 8


def test_non_finite_loss_skips_the_update():
    mesh = runtime.make_mesh(runtime.MeshConfig(data=1, fsdp=8, tensor=1))
    trainer = train.build_trainer(CFG, OPTIM, SCHEDULE, train.StepConfig(GBS, 1), mesh,
                                  donate=False)
    state = trainer.init(jax.random.PRNGKey(0))
    bad = state.replace(params={**state.params, "final_norm": {
        "scale": state.params["final_norm"]["scale"].at[0].set(jnp.nan)}})
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in _batches(1)[0].items()}
    new, m = trainer.step(bad, batch)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                    jax.tree.leaves((bad.params, bad.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new.step) == 1


def test_train_step_lowers_ahead_of_time_from_shapes():
    mesh = runtime.make_mesh(runtime.MeshConfig(data=2, fsdp=4, tensor=1))
    trainer = train.build_trainer(CFG.replace(compute_dtype="bfloat16"), OPTIM, SCHEDULE,
                                  train.StepConfig(GBS, 2), mesh)
    compiled = trainer.step.lower(
        trainer.abstract_state,
        train.abstract_batch(GBS, CFG.seq_length, trainer.batch_sharding)).compile()
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 0


def _collective_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(op, result dims) of every all-gather / all-reduce / reduce-scatter / all-to-all."""
    found = re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^ ]* "
                       r"(all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", hlo_text)
    return [(op, tuple(int(d) for d in dims.split(",") if d)) for dims, op in found]


def test_fsdp_step_gathers_weights_not_activations():
    """FSDP moves weights (gathered before use, gradients reduced), never activations.

    An activation has a [tokens] or [batch, seq] axis; no collective of the compiled step may
    carry one. This failed while the activation sharding constraints were no-ops on CPU: XLA then
    gathered every device's activations and all-reduced fp32 [tokens, ffn] partial products.
    """
    # seq 48: no weight of the tiny model has a dim of 48 or 16 x 48.
    cfg = CFG.replace(compute_dtype="bfloat16", remat="none", seq_length=48)
    mesh = runtime.make_mesh(runtime.MeshConfig(data=2, fsdp=4, tensor=1))
    trainer = train.build_trainer(cfg, OPTIM, SCHEDULE, train.StepConfig(GBS, 1), mesh)
    hlo = trainer.step.lower(
        trainer.abstract_state,
        train.abstract_batch(GBS, cfg.seq_length, trainer.batch_sharding)).compile().as_text()
    collectives = _collective_shapes(hlo)
    weight_dims = {cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size}
    assert any(op == "all-gather" and weight_dims & set(dims) for op, dims in collectives), (
        "FSDP should gather weights", collectives)
    activation_dims = {cfg.seq_length, GBS * cfg.seq_length}
    moved = [(op, dims) for op, dims in collectives if activation_dims & set(dims)]
    assert not moved, moved


def test_batch_arithmetic_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by grad_acc_steps"):
        train.StepConfig(10, 4)
    mesh = runtime.make_mesh(runtime.MeshConfig(data=1, fsdp=8, tensor=1))
    with pytest.raises(ValueError, match="cannot be split over 8 data-parallel devices"):
        train.build_trainer(CFG, OPTIM, SCHEDULE, train.StepConfig(8, 2), mesh)
