"""Plan a run without hardware: compile the full train step from shapes and report memory and FLOPs.

    python -m agpt_jax.plan --model agpt_7b --mesh data=3,fsdp=4 --seq 4096 --micro-batch 1

The step is lowered and compiled for `prod(mesh)` simulated CPU devices from abstract shapes (no
weight is allocated), with the same shardings a real run uses. XLA's memory analysis of the compiled
executable gives the per-device bytes of arguments (params, optimizer state, batch), temporaries
(activations, gradients, workspace) and outputs. On another platform the figures differ by the
backend's own fusion and layout choices, but the state part is exact and the activations close.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

from agpt_jax import runtime

_MODEL = flags.DEFINE_string("model", "agpt_7b", "model preset (agpt_jax.model.PRESETS)")
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "mesh sizes, e.g. data=3,fsdp=4,tensor=1")
_DEVICES = flags.DEFINE_integer("devices", None, "simulated devices (default: the mesh product)")
_SEQ = flags.DEFINE_integer("seq", None, "sequence length (default: the preset's)")
_MICRO = flags.DEFINE_integer("micro_batch", 1, "sequences per data-parallel device per micro-step")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "micro-steps per optimizer update")
_REMAT = flags.DEFINE_string("remat", None, "remat policy (default: the preset's)")
_ATTENTION = flags.DEFINE_string("attention", None, "attention implementation")
_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "compute dtype")
_STRATEGY = flags.DEFINE_enum("strategy", "fsdp", ["fsdp", "zero1"], "sharding strategy")
_BUDGET = flags.DEFINE_float("device_memory_gb", 64.0, "memory per device to check against (GB)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the compiled step needs per device, and what it computes per step."""

    model: str
    mesh: dict[str, int]
    devices: int
    params: int
    seq_length: int
    global_batch_size: int
    grad_accum_steps: int
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


def _mesh_from_flags(devices: int | None) -> runtime.MeshConfig:
    cfg = runtime.parse_mesh(_MESH.value)
    if devices is None:
        if -1 in cfg.sizes:
            raise ValueError(f"--mesh={_MESH.value} has a -1 size; give every size or --devices")
    return cfg


def make_plan(model_name: str, mesh_cfg: runtime.MeshConfig, *, seq: int | None,
              micro_batch: int, grad_accum: int, remat: str | None, attention: str | None,
              compute_dtype: str, strategy: str, device_memory_gb: float) -> Plan:
    """Compile the train step for the current devices and read XLA's memory and cost analysis."""
    from agpt_jax import model as model_lib
    from agpt_jax import optim, train

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
    gbs = micro_batch * dp * grad_accum
    schedule = optim.make_schedule(optim.ScheduleConfig(train_iters=1000, global_batch_size=gbs))
    trainer = train.build_trainer(cfg, optim.OptimConfig(), schedule,
                                  train.StepConfig(gbs, grad_accum), mesh, strategy=strategy)
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
        grad_accum_steps=grad_accum, remat=cfg.remat, attention=cfg.attention,
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
        f"mesh               {mesh} ({p.devices} devices, strategy {p.strategy})",
        f"global batch       {p.global_batch_size} sequences ({p.grad_accum_steps} micro-steps)",
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
    del argv
    try:
        mesh_cfg = _mesh_from_flags(_DEVICES.value)
        devices = _DEVICES.value or mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
        runtime.initialize("cpu", num_cpu_devices=devices)
        plan = make_plan(_MODEL.value, mesh_cfg, seq=_SEQ.value, micro_batch=_MICRO.value,
                         grad_accum=_ACCUM.value, remat=_REMAT.value, attention=_ATTENTION.value,
                         compute_dtype=_DTYPE.value, strategy=_STRATEGY.value,
                         device_memory_gb=_BUDGET.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _JSON.value:
        print(json.dumps(dataclasses.asdict(plan)))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)))
