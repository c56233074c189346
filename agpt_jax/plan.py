"""Plan a run without hardware: compile the full train step from shapes and report memory and FLOPs.

    python -m agpt_jax.plan --model agpt_7b --mesh data=3,fsdp=4 --seq 4096 --micro_batch 1

The step is lowered and compiled for `prod(mesh)` simulated CPU devices from abstract shapes (no
weight is allocated), with the same shardings a real run uses. XLA's memory analysis of the compiled
executable gives the per-device bytes of arguments (params, optimizer state, batch), temporaries
(activations, gradients, workspace) and outputs. On another platform the figures differ by the
backend's own fusion and layout choices, but the state part is exact and the activations close.

A -1 size in `--mesh` (the default `fsdp=-1`) fills `--devices`; without `--devices` it resolves
on the fewest devices the other sizes allow (1 for the default), and the table says so. The
other flags: `--grad_acc_steps`, `--remat`, `--attention`, `--compute_dtype`, `--strategy`,
`--device_memory_gb` (the budget checked against, default 64) and `--json`.

`--target` names the platform whose capabilities shape the lowered step (the attention that
"auto" picks and the blockwise tiles, `agpt_jax.runtime.capabilities_for`): `cpu` (the default:
the simulated devices' own, as before) or `xpu` (what a run on Intel XPU traces: blockwise
attention with its 512 tiles). The step is compiled for CPU devices either way.

Exit codes: 0 the step fits --device_memory_gb; 1 it does not fit (the check asked for failed; the
table is still printed), or compiling the step failed; 2 bad input (a flag, --mesh, --model, a
--devices the mesh cannot cover), one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

from agpt_jax import cli, runtime

_MODEL = flags.DEFINE_string("model", "agpt_7b", "model preset (agpt_jax.model.PRESETS)")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "mesh sizes, e.g. data=3,fsdp=4,tensor=1")
_DEVICES = flags.DEFINE_integer("devices", None, "simulated devices (default: the mesh product)")
_SEQ = flags.DEFINE_integer("seq", None, "sequence length (default: the preset's)")
_MICRO = flags.DEFINE_integer("micro_batch", 1, "sequences per data-parallel device per micro-step")
_GRAD_ACC = flags.DEFINE_integer("grad_acc_steps", 1, "micro-steps per optimizer update")
_REMAT = flags.DEFINE_string("remat", None, "remat policy (default: the preset's)")
_ATTENTION = flags.DEFINE_string("attention", None, "attention implementation")
_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "compute dtype")
_STRATEGY = flags.DEFINE_enum("strategy", "fsdp", ["fsdp", "zero1"], "sharding strategy")
_BUDGET = flags.DEFINE_float("device_memory_gb", 64.0, "memory per device to check against (GB)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_TARGET = flags.DEFINE_enum("target", "cpu", [p for p in runtime.PLATFORMS if p != "auto"],
                            "platform whose attention choice and tiles the step is traced with")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the compiled step needs per device, and what it computes per step."""

    model: str
    mesh: dict[str, int]
    devices: int
    params: int
    seq_length: int
    global_batch_size: int
    grad_acc_steps: int
    remat: str
    attention: str
    compute_dtype: str
    strategy: str
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    per_device_bytes: int
    peak_bytes_estimate: int
    flops_per_step: float
    xla_flops_per_device: float
    compile_s: float
    device_memory_bytes: int
    fits: bool
    mesh_note: str = ""  # how a -1 mesh size was resolved without --devices


def _mesh_from_flags(devices: int | None) -> tuple[runtime.MeshConfig, int, str]:
    """The mesh of --mesh, the simulated device count, and a note on how a -1 size was resolved.

    Without --devices the count is the product of the sizes, a -1 size counting 1: the fewest
    devices the mesh allows.
    """
    cfg = runtime.parse_mesh(_MESH.value)
    if devices is not None:
        if devices < 1:
            raise ValueError(f"--devices={devices} must be at least 1")
        return cfg, devices, ""
    fewest = math.prod(size for size in cfg.sizes if size != -1)
    note = ""
    if -1 in cfg.sizes:
        axis = runtime.MESH_AXES[cfg.sizes.index(-1)]
        note = (f"{axis}=-1 resolved on {fewest} device{'s' if fewest > 1 else ''}: give "
                "--devices or a full --mesh for more")
    return cfg, fewest, note


def make_plan(model_name: str, mesh_cfg: runtime.MeshConfig, *, seq: int | None,
              micro_batch: int, grad_acc_steps: int, remat: str | None, attention: str | None,
              compute_dtype: str, strategy: str, device_memory_gb: float,
              target: str | runtime.Capabilities | None = None) -> Plan:
    """Compile the train step for the current devices and read XLA's memory and cost analysis.

    Args:
        target: the platform (a name or its Capabilities) whose attention choice and tiles the
            step is traced with; None: the running runtime's.
    """
    from agpt_jax import attention as attention_lib
    from agpt_jax import model as model_lib
    from agpt_jax import optim, schedules, train

    cfg = model_lib.get_preset(model_name)
    changes = {"compute_dtype": compute_dtype}
    if seq:
        changes["seq_length"] = seq
    if remat:
        changes["remat"] = remat
    if attention:
        changes["attention"] = attention
    cfg = cfg.replace(**changes)
    mesh = runtime.make_mesh(mesh_cfg)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    gbs = micro_batch * dp * grad_acc_steps
    schedule = schedules.make_schedule(
        schedules.ScheduleConfig(train_iters=1000, global_batch_size=gbs))
    with attention_lib.platform_default(target):  # what the model's attention calls trace with
        trainer = train.build_trainer(cfg, optim.OptimConfig(), schedule,
                                      train.StepConfig(gbs, grad_acc_steps), mesh,
                                      strategy=strategy)
        start = time.perf_counter()
        compiled = trainer.step.lower(
            trainer.abstract_state,
            train.abstract_batch(gbs, cfg.seq_length, trainer.batch_sharding)).compile()
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    per_device = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    peak = per_device - mem.alias_size_in_bytes
    budget = int(device_memory_gb * 1e9)
    return Plan(
        model=model_name, mesh=dict(mesh.shape), devices=mesh.devices.size,
        params=cfg.num_params(), seq_length=cfg.seq_length, global_batch_size=gbs,
        grad_acc_steps=grad_acc_steps, remat=cfg.remat, attention=cfg.attention,
        compute_dtype=cfg.compute_dtype, strategy=strategy,
        argument_bytes=int(mem.argument_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        per_device_bytes=int(per_device), peak_bytes_estimate=int(peak),
        flops_per_step=cfg.flops_per_token() * cfg.seq_length * gbs,
        xla_flops_per_device=float((cost or {}).get("flops", 0.0)),
        compile_s=compile_s, device_memory_bytes=budget, fits=peak <= budget)


def format_plan(p: Plan) -> str:
    gb = lambda b: f"{b / 1e9:8.2f} GB"
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    rows = [
        f"model              {p.model} ({p.params / 1e9:.2f}B params, seq {p.seq_length}, "
        f"{p.compute_dtype}, remat {p.remat}, attention {p.attention})",
        f"mesh               {mesh} ({p.devices} device{'s' if p.devices > 1 else ''}, "
        f"strategy {p.strategy}{'; ' + p.mesh_note if p.mesh_note else ''})",
        f"global batch       {p.global_batch_size} sequences ({p.grad_acc_steps} micro-steps)",
        f"arguments          {gb(p.argument_bytes)} per device (params, optimizer state, batch)",
        f"temporaries        {gb(p.temp_bytes)} per device (activations, gradients, workspace)",
        f"outputs            {gb(p.output_bytes)} per device ({gb(p.alias_bytes).strip()} aliased "
        "to donated arguments)",
        f"total              {gb(p.per_device_bytes)} per device (arguments + temporaries + outputs)",
        f"peak estimate      {gb(p.peak_bytes_estimate)} per device (total - aliased) vs "
        f"{p.device_memory_bytes / 1e9:.0f} GB: {'fits' if p.fits else 'DOES NOT FIT'}",
        f"model FLOPs        {p.flops_per_step:.4g} per step "
        f"({p.flops_per_step / p.devices:.4g} per device; XLA counts {p.xla_flops_per_device:.4g})",
        f"compile time       {p.compile_s:.1f} s",
    ]
    return "\n".join(rows)


def main(argv: Sequence[str]) -> int:
    """Print the plan; returns the exit code (the module docstring's)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}; pass flags only",
              file=sys.stderr)
        return cli.EXIT_USAGE
    try:
        mesh_cfg, devices, note = _mesh_from_flags(_DEVICES.value)
        runtime.initialize("cpu", num_cpu_devices=devices)
        plan = make_plan(_MODEL.value, mesh_cfg, seq=_SEQ.value, micro_batch=_MICRO.value,
                         grad_acc_steps=_GRAD_ACC.value, remat=_REMAT.value,
                         attention=_ATTENTION.value,
                         compute_dtype=_DTYPE.value, strategy=_STRATEGY.value,
                         device_memory_gb=_BUDGET.value, target=_TARGET.value)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return cli.EXIT_USAGE
    except RuntimeError as e:  # XLA could not compile the step (e.g. out of host memory)
        text = str(e).strip().splitlines()
        print(f"error: compiling the step failed: {text[0] if text else type(e).__name__}",
              file=sys.stderr)
        return cli.EXIT_FAILED
    plan = dataclasses.replace(plan, mesh_note=note)
    if _JSON.value:
        print(json.dumps(dataclasses.asdict(plan)))
    else:
        print(format_plan(plan))
    # Not fitting the budget is the check the user asked for failing: 1, after the full table.
    return 0 if plan.fits else cli.EXIT_FAILED


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags_exit_usage)
