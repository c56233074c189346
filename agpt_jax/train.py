"""Train state, the compiled train and eval steps, and their placement on a mesh.

`train_step(state, batch) -> (state, metrics)` is pure: the model, the optax transformation and the
mesh rules are bound before `jax.jit`, every switch is resolved in Python, and metrics stay on device
(no host callbacks, which the sycl platform rejects). One step is one Megatron iteration: the global
batch is split into micro-batches that `lax.scan` runs in order, accumulating fp32 gradients, then one
optimizer update (clip, AdamW, LR) is applied; a non-finite loss or gradient norm skips the update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agpt_jax import model as model_lib
from agpt_jax import optim
from agpt_jax import sharding as sh

PyTree = Any
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes.

    Attributes:
        step: int32 scalar, optimizer updates attempted in this run (Megatron's iteration counter;
            skipped non-finite updates count, as Megatron's skipped iterations do).
        params: fp32 params tree (see agpt_jax.model).
        opt_state: the optax state of `optim.make_optimizer` (Adam moments and count, schedule count,
            clipping statistics).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Batch arithmetic of one iteration.

    Attributes:
        global_batch_size: sequences per optimizer update (Megatron's --global-batch-size).
        grad_acc_steps: micro-batches per update; each micro-batch holds
            global_batch_size // grad_acc_steps sequences spread over every data-parallel rank.
    """

    global_batch_size: int
    grad_acc_steps: int = 1

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.grad_acc_steps < 1:
            raise ValueError(f"global_batch_size={self.global_batch_size} and grad_acc_steps="
                             f"{self.grad_acc_steps} must be positive")
        if self.global_batch_size % self.grad_acc_steps:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                             f"grad_acc_steps={self.grad_acc_steps}")

    @property
    def micro_batch_rows(self) -> int:
        return self.global_batch_size // self.grad_acc_steps


def _split_micro_batches(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B // n, ...] where micro-batch m holds rows m, n + m, 2n + m, ...

    Interleaving (instead of contiguous chunks) keeps each device's rows on that device: with the
    batch sharded over data x fsdp on axis 0, device d owns a contiguous row range, and after this
    reshape it still owns the same rows of every micro-batch, so no data moves. The loss and its
    gradient depend only on which sequences form the global batch, not on how they are grouped.
    """
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)


def _merge_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of `_split_micro_batches`: [n, B // n, ...] -> [B, ...] in the original row order."""
    n, r = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(n * r, *x.shape[2:])


def _sequence_losses(model: model_lib.GPT, params: PyTree, tokens: jax.Array,
                     labels: jax.Array) -> jax.Array:
    """Mean token cross-entropy of every sequence, [rows] fp32 (Megatron's loss mask is all ones)."""
    logits = model.apply({"params": params}, tokens)
    return jnp.mean(model_lib.cross_entropy(logits, labels), axis=-1)


def train_step(state: TrainState, batch: Batch, *, model: model_lib.GPT,
               tx: optax.GradientTransformation, schedule: optax.Schedule, step_cfg: StepConfig,
               mesh: Mesh, rules: sh.Rules,
               grad_sharding: PyTree | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration: micro-batch gradient accumulation, clipping, AdamW, LR from the schedule.

    Args:
        state: the current TrainState.
        batch: "tokens" and "labels", int32 [global_batch, seq].
        model, tx, schedule, step_cfg, mesh, rules: bound with functools.partial before jit.
        grad_sharding: shardings of the fp32 gradient accumulator (the params' shardings), so
            gradients stay sharded like the params instead of whatever XLA would infer.

    Returns:
        The next state and on-device metrics: loss (mean over the global batch), grad_norm (global
        L2 norm before clipping), lr (the LR this update used), update_norm (0 when the update
        was skipped), param_norm,
        skipped (1 when the update was not applied because loss or grad norm was not finite),
        sequence_loss ([global_batch] fp32, for per-corpus losses on the host).
    """
    n = step_cfg.grad_acc_steps
    with mesh, nn.logical_axis_rules(rules):
        micro_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
        tokens = jax.lax.with_sharding_constraint(_split_micro_batches(batch["tokens"], n),
                                                  micro_sharding)
        labels = jax.lax.with_sharding_constraint(_split_micro_batches(batch["labels"], n),
                                                  micro_sharding)

        # The model casts every parameter to the compute dtype where it uses it; casting once here
        # is the same arithmetic (the cast's gradient is the cotangent cast back), lets FSDP
        # gather compute-dtype shards, and keeps the fp32 params out of the loops below: a
        # donated buffer read inside a loop and rewritten by the optimizer is copied by XLA
        # first (1.5 GB of copies per bench_125m step before this and the skip below).
        compute_params = jax.tree.map(lambda p: p.astype(model.config.dtype), state.params)

        def micro_step(grad_sum, xs):
            tok, lab = xs

            def loss_fn(p):
                per_seq = _sequence_losses(model, p, tok, lab)
                return jnp.mean(per_seq), per_seq

            (loss, per_seq), grads = jax.value_and_grad(loss_fn, has_aux=True)(compute_params)
            grad_sum = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum,
                                              grads))
            return grad_sum, (loss, per_seq)

        def constrain(tree):
            if grad_sharding is None:
                return tree
            return jax.lax.with_sharding_constraint(tree, grad_sharding)

        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
        grad_sum, (losses, per_seq) = jax.lax.scan(micro_step, zeros, (tokens, labels))
        # Megatron averages the micro-batch losses (spec §2.4); equal sizes make it the batch mean.
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        loss = jnp.mean(losses)

        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        # The skip is arithmetic (`apply`, see agpt_jax.optim): a lax.cond runs the optimizer on
        # one thread on XLA's CPU runtime, and a select of new against old state makes XLA copy
        # all 33 donated state arrays before the step. This form still costs a copy of the fp32
        # params (update_norm's pass and the in-place update both read them, unordered).
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params, apply=finite)
        new_params = optax.apply_updates(state.params, updates)
        update_norm = optim.global_norm(updates)
        next_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": optim.learning_rate(state.opt_state, schedule),
            "update_norm": update_norm,
            "param_norm": optim.global_norm(next_state.params),
            "skipped": jnp.logical_not(finite).astype(jnp.int32),
            "sequence_loss": _merge_micro_batches(per_seq),
        }
    return next_state, metrics


def eval_step(params: PyTree, batch: Batch, *, model: model_lib.GPT, mesh: Mesh,
              rules: sh.Rules) -> dict[str, jax.Array]:
    """Loss only: {"loss": scalar, "sequence_loss": [batch]} in fp32."""
    with mesh, nn.logical_axis_rules(rules):
        per_seq = _sequence_losses(model, params, batch["tokens"], batch["labels"])
    return {"loss": jnp.mean(per_seq), "sequence_loss": per_seq}


@dataclasses.dataclass(frozen=True)
class CompiledTrainer:
    """The jitted functions and the shardings they were compiled for.

    Attributes:
        init: rng -> TrainState, created directly in its sharded layout.
        assemble: (params, adam, schedule count, step) -> TrainState from restored arrays, where
            adam is (count, mu, nu) or None for fresh moments; params and moments are donated,
            so the state is not allocated a second time (the optimizer's own init is traced and
            its unused zeros are dropped by XLA).
        step: (TrainState, batch) -> (TrainState, metrics); the state argument is donated.
        evaluate: (params, batch) -> metrics.
        state_shardings: TrainState of NamedShardings.
        abstract_state: TrainState of ShapeDtypeStructs carrying those shardings.
        batch_sharding: NamedSharding of [global_batch, seq] arrays.
        mesh: the mesh.
    """

    init: Callable[[jax.Array], TrainState]
    assemble: Callable[..., TrainState]
    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[PyTree, Batch], dict[str, jax.Array]]
    state_shardings: TrainState
    abstract_state: TrainState
    batch_sharding: NamedSharding
    mesh: Mesh


def build_trainer(model_cfg: model_lib.GPTConfig, optim_cfg: optim.OptimConfig,
                  schedule: optax.Schedule, step_cfg: StepConfig, mesh: Mesh,
                  strategy: str = "fsdp", donate: bool = True) -> CompiledTrainer:
    """Bind model, optimizer and mesh; derive every sharding from the logical rules; jit.

    Args:
        model_cfg: the model.
        optim_cfg: AdamW and clipping.
        schedule: LR schedule (optax count -> LR), see schedules.make_schedule.
        step_cfg: global batch and gradient accumulation.
        mesh: a (data, fsdp, tensor) mesh.
        strategy: "fsdp" or "zero1" (see agpt_jax.sharding).
        donate: donate the state buffers to the step (the runtime enables donation on sycl).
    """
    plan = sh.ShardingPlan.build(mesh, strategy)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if step_cfg.micro_batch_rows % dp:
        raise ValueError(
            f"a micro-batch of {step_cfg.micro_batch_rows} sequences (global batch "
            f"{step_cfg.global_batch_size} / {step_cfg.grad_acc_steps} accumulation steps) cannot "
            f"be split over {dp} data-parallel devices (data x fsdp); make global_batch_size a "
            f"multiple of micro_batch x grad_acc_steps x {dp}")
    model = model_lib.GPT(model_cfg)
    tx = optim.make_optimizer(optim_cfg, schedule)

    boxed = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.PRNGKey(0)))
    specs = sh.logical_specs(boxed)
    abstract_params = nn.unbox(boxed)
    param_sharding = sh.param_shardings(abstract_params, specs, mesh, plan.param_rules)
    moment_sharding = sh.param_shardings(abstract_params, specs, mesh, plan.optimizer_rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sharding = sh.state_shardings(abstract_opt, abstract_params, moment_sharding, mesh)
    replicated = sh.replicated(mesh)
    state_shardings = TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                   opt_state=abstract_opt),
        state_shardings)

    def init(rng: jax.Array) -> TrainState:
        params = nn.unbox(model_lib.init_params(model_cfg, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def assemble(params, adam, sched_count, step) -> TrainState:
        opt = tx.init(params)
        if adam is not None:
            opt = optim.replace_adam_state(opt, *adam)
        opt = optim.replace_schedule_count(opt, sched_count)
        return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt)

    batch_sharding = sh.batch_sharding(mesh)
    batch_shardings = {"tokens": batch_sharding, "labels": batch_sharding}
    metric_shardings = {k: replicated for k in ("loss", "grad_norm", "lr", "update_norm",
                                                "param_norm", "skipped")}
    metric_shardings["sequence_loss"] = sh.batch_sharding(mesh, 1)
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, step_cfg=step_cfg,
                          mesh=mesh, rules=plan.param_rules, grad_sharding=moment_sharding),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, metric_shardings),
        donate_argnums=(0,) if donate else ())
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, mesh=mesh, rules=plan.param_rules),
        in_shardings=(param_sharding, batch_shardings),
        out_shardings={"loss": replicated, "sequence_loss": sh.batch_sharding(mesh, 1)})
    return CompiledTrainer(
        init=jax.jit(init, out_shardings=state_shardings),
        assemble=jax.jit(assemble, out_shardings=state_shardings,
                         donate_argnums=(0, 1) if donate else ()),
        step=step, evaluate=evaluate, state_shardings=state_shardings,
        abstract_state=abstract_state, batch_sharding=batch_sharding, mesh=mesh)


def abstract_batch(global_batch_size: int, seq_length: int,
                   sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch, for ahead-of-time lowering."""
    a = jax.ShapeDtypeStruct((global_batch_size, seq_length), jnp.int32, sharding=sharding)
    return {"tokens": a, "labels": a}
