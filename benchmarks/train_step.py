"""Train-step benchmark: agpt-jax's compiled step on `bench_125m` vs HF transformers + torch AdamW.

One step is one full iteration of `agpt_jax.train.build_trainer`'s step: forward, backward,
global gradient-norm clipping at 1.0 and AdamW (Megatron parameter groups) on `bench_125m` (12
layers, hidden 768, 12 heads, 4 kv heads, SwiGLU 2048, vocab 32000, seq 1024, micro-batch 2 =
2048 tokens). The baseline trains the same shapes with HF `LlamaForCausalLM` (untied, no bias, GQA
12/4, sdpa attention), `torch.optim.AdamW` with two parameter groups and `clip_grad_norm_(1.0)`, in
fp32 and under bf16 autocast, on the same machine in the same run.

The ceiling is measured in the same run too: the median GFLOP/s of jitted square matmuls (2048^3 and
4096^3) under the same XLA flags as each JAX variant, in the dtype of that variant's compute. MFU is
`flops_per_token x tokens/s / peak` with `GPTConfig.flops_per_token()` (6 x matmul weights + 12 x
layers x seq x hidden, spec/jax-stack.md §8). Torch's MFU is against torch's own matmul peak.

The first JAX variant is agpt-jax as a user runs it on CPU: bf16 compute, blockwise attention (what
"auto" picks at seq 1024), the XLA CPU flag `agpt_jax.runtime` sets, and the huge-page tunable the
scripts start with (`agpt_jax/hostmem.py`). Each further variant changes one of these.

Every variant runs in its own process (XLA flags and glibc tunables must be set before the process
starts, and peak RSS is then per variant, read from `wait4`'s rusage of the child). Medians over
`--steps` timed steps after `--warmup` untimed ones (the first includes compilation, reported
separately).

`--paired N` is the head-to-head for machines whose speed drifts: agpt-jax defaults, torch fp32,
torch bf16 autocast and the three matmul ceilings each stay up in their own process, and each of N
rounds takes one measurement from every process in turn. Ratios and MFU are computed within a
round, so a slow minute slows both sides of a ratio.

    python benchmarks/train_step.py                 # full table, about 10 minutes on 2 cores
    python benchmarks/train_step.py --quick         # smoke run: 1 warm-up and 2 timed steps
    python benchmarks/train_step.py --repeat 2      # each variant twice; prints the spread
    python benchmarks/train_step.py --only defaults,fp32    # a subset of the JAX variants
    python benchmarks/train_step.py --paired 12     # head-to-head: 12 rounds, ratios per round
    python benchmarks/train_step.py --paired 6 --dtypes bfloat16 \
        --stack 'jax 0.11.2=.venv-py312-jax011/bin/python'   # both stacks beside torch
    python benchmarks/train_step.py --profile DIR   # XLA dump + jax.profiler trace of the default
                                                    # variant, and a breakdown of where time goes

Over 400 lines on purpose: one benchmark whose three modes (the table, `--paired`, `--profile`)
share the variants, the child-process protocol and the matmul ceilings; split, each part would
reach into the others. It is run by hand and imported by nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Any

from absl import flags

from agpt_jax import cli, hostmem

PRESET = "bench_125m"
MICRO_BATCH = 2
THUNK_OFF = "--xla_cpu_use_thunk_runtime=false"
MATMUL_SIZES = (2048, 4096)
_RESULT = "RESULT "


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured configuration.

    Attributes:
        name: table label.
        kind: "jax" (agpt-jax train step), "torch" (HF + torch AdamW), "jax_peak" or "torch_peak"
            (square matmul ceilings).
        dtype: "float32" or "bfloat16": the JAX compute dtype, torch autocast dtype, or matmul
            dtype.
        thunk: XLA's CPU thunk runtime on (jax 0.5.0's default) or off (`THUNK_OFF`, which
            agpt_jax.runtime sets).
        attention: agpt_jax attention implementation ("xla" | "blockwise"; the preset's "auto"
            is "blockwise" at seq 1024 on CPU).
        huge_pages: start the process with glibc's huge-page tunable, as agpt-jax's scripts do
            (agpt_jax/hostmem.py), or with glibc's defaults.
        python: the interpreter of the variant's process ("" for this one): a virtual
            environment of the other stack (`--stack`), whose agpt-jax is this checkout.
        extra_flags: more XLA_FLAGS for this variant (`--stack-flags`).
    """

    name: str
    kind: str
    dtype: str = "bfloat16"
    thunk: bool = False
    attention: str = "blockwise"
    huge_pages: bool = True
    python: str = ""
    extra_flags: str = ""

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    def xla_flags(self, extra: str = "") -> str:
        parts = [] if self.thunk else [THUNK_OFF]
        parts += self.extra_flags.split()
        if extra:
            parts.append(extra)
        return " ".join(parts)


DEFAULT = Variant("jax bf16 (agpt-jax defaults)", "jax")


def jax_variants(quick: bool) -> list[Variant]:
    """agpt-jax as a user runs it on CPU (bf16, blockwise attention, the runtime's XLA flags,
    huge pages), then one change at a time (remat none, the bench_125m preset's own setting)."""
    out = [DEFAULT,
           dataclasses.replace(DEFAULT, name="jax bf16, glibc malloc defaults", huge_pages=False),
           dataclasses.replace(DEFAULT, name="jax bf16, xla attention", attention="xla"),
           dataclasses.replace(DEFAULT, name="jax bf16, thunk runtime", thunk=True),
           dataclasses.replace(DEFAULT, name="jax fp32", dtype="float32")]
    return out[:1] if quick else out


# The baselines run with the same huge-page tunable (torch's CPU allocator is glibc malloc too);
# one row shows torch with glibc's defaults.
TORCH_VARIANTS = [Variant("torch fp32", "torch", "float32"),
                  Variant("torch bf16 autocast", "torch", "bfloat16"),
                  Variant("torch fp32, glibc malloc defaults", "torch", "float32",
                          huge_pages=False)]


# --------------------------------------------------------------------------------------------------
# Children: each runs in a fresh process and prints one RESULT line of JSON.
# --------------------------------------------------------------------------------------------------


def _median_gflops(fn, flops: float, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def _reps(n: int, quick: bool) -> int:
    return (3 if quick else 10) if n >= 4096 else (5 if quick else 20)


def _jax_peak_meter(v: Variant, quick: bool):
    """Jitted square matmuls in v.dtype under this process's XLA flags, compiled and warm.

    Returns:
        a function measuring {size: median GFLOP/s} once more on each call.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(v.dtype)
    f = jax.jit(lambda x, y: x @ y)
    operands = {}
    for n in MATMUL_SIZES:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
        f(a, b).block_until_ready()
        operands[n] = (a, b)

    def measure() -> dict[str, float]:
        return {str(n): _median_gflops(lambda: f(a, b).block_until_ready(), 2.0 * n**3,
                                       _reps(n, quick)) for n, (a, b) in operands.items()}

    return measure


def _torch_peak_meter(v: Variant, quick: bool):
    """`_jax_peak_meter` for torch matmuls in v.dtype on 2 threads."""
    import torch

    torch.set_num_threads(2)
    dtype = getattr(torch, v.dtype)
    operands = {}
    for n in MATMUL_SIZES:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        operands[n] = (a, b)

    def measure() -> dict[str, float]:
        return {str(n): _median_gflops(lambda: a @ b, 2.0 * n**3, _reps(n, quick))
                for n, (a, b) in operands.items()}

    return measure


def child_jax_peak(v: Variant, quick: bool) -> dict[str, Any]:
    """Median GFLOP/s of jitted square matmuls in v.dtype under this process's XLA flags."""
    out = _jax_peak_meter(v, quick)()
    return {"gflops": out, "peak": max(out.values())}


def child_torch_peak(v: Variant, quick: bool) -> dict[str, Any]:
    """Median GFLOP/s of torch square matmuls in v.dtype on 2 threads."""
    out = _torch_peak_meter(v, quick)()
    return {"gflops": out, "peak": max(out.values())}


def _jax_setup(v: Variant):
    """Builds the real agpt-jax trainer for bench_125m on one CPU device.

    Returns:
        (model config, CompiledTrainer, batch of int32 [2, 1024] tokens and labels).
    """
    import jax
    import numpy as np

    from agpt_jax import model as model_lib
    from agpt_jax import optim, runtime, schedules, train

    cfg = model_lib.get_preset(PRESET).replace(compute_dtype=v.dtype, remat="none",
                                               attention=v.attention)
    mesh = runtime.make_mesh(runtime.MeshConfig(data=1, fsdp=1, tensor=1),
                             devices=jax.devices()[:1])
    schedule_cfg = schedules.ScheduleConfig(style="constant", max_lr=3e-4, min_lr=3e-4,
                                            train_iters=1000, global_batch_size=MICRO_BATCH)
    trainer = train.build_trainer(cfg, optim.OptimConfig(clip_grad=1.0),
                                  schedules.make_schedule(schedule_cfg),
                                  train.StepConfig(global_batch_size=MICRO_BATCH), mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (MICRO_BATCH, cfg.seq_length + 1), dtype=np.int32)
    batch = {"tokens": jax.device_put(tokens[:, :-1], trainer.batch_sharding),
             "labels": jax.device_put(tokens[:, 1:], trainer.batch_sharding)}
    return cfg, trainer, batch


def _time_steps(step, state, batch, warmup: int, steps: int):
    """Runs warmup + steps iterations; returns (state, first_s, [timed seconds], losses)."""
    import jax

    box = [state]

    def one() -> tuple[float, float]:
        t = time.perf_counter()
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready((box[0], metrics))
        return time.perf_counter() - t, float(metrics["loss"])

    first, times, losses = _run_steps(one, warmup, steps)
    return box[0], first, times, losses


def _jax_stepper(v: Variant):
    """The agpt-jax train step as a closure: each call runs one step on the same batch.

    Returns:
        (model config, step function returning (seconds, loss)).
    """
    import jax

    cfg, trainer, batch = _jax_setup(v)
    state = trainer.init(jax.random.PRNGKey(0))
    jax.block_until_ready(state)

    def step() -> tuple[float, float]:
        nonlocal state
        t = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - t, float(metrics["loss"])

    return cfg, step


def _run_steps(step, warmup: int, steps: int) -> tuple[float, list[float], list[float]]:
    """Runs warmup + steps calls of a stepper; returns (first_s, [timed seconds], losses)."""
    times, losses, first = [], [], 0.0
    for i in range(warmup + steps):
        dt, loss = step()
        losses.append(loss)
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return first, times, losses


def child_jax(v: Variant, warmup: int, steps: int) -> dict[str, Any]:
    """tokens/s of the agpt-jax train step."""
    cfg, step = _jax_stepper(v)
    first, times, losses = _run_steps(step, warmup, steps)
    return {"first_s": first, "step_s": times, "tokens_per_step": MICRO_BATCH * cfg.seq_length,
            "flops_per_token": cfg.flops_per_token(), "losses": losses}


def _torch_stepper(v: Variant):
    """HF LlamaForCausalLM + torch AdamW (two groups) + clip_grad_norm_(1.0) as a closure.

    Returns:
        (model config, step function returning (seconds, loss)).
    """
    import torch
    import torch.nn.functional as F
    import transformers

    from agpt_jax import model as model_lib

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = model_lib.get_preset(PRESET)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, initializer_range=cfg.init_std, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
    model = transformers.LlamaForCausalLM(hf_cfg).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, cfg.seq_length + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    autocast = v.dtype == "bfloat16"

    def step() -> tuple[float, float]:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        return time.perf_counter() - t, value

    return cfg, step


def child_torch(v: Variant, warmup: int, steps: int) -> dict[str, Any]:
    """tokens/s of HF LlamaForCausalLM + torch AdamW (two groups) + clip_grad_norm_(1.0)."""
    import torch
    import transformers

    cfg, step = _torch_stepper(v)
    first, times, losses = _run_steps(step, warmup, steps)
    return {"first_s": first, "step_s": times, "tokens_per_step": MICRO_BATCH * cfg.seq_length,
            "flops_per_token": cfg.flops_per_token(), "losses": losses,
            "torch": torch.__version__, "transformers": transformers.__version__}


# --------------------------------------------------------------------------------------------------
# Profiling of one JAX variant.
# --------------------------------------------------------------------------------------------------


def _trace_op_times(trace_dir: str) -> dict[str, float]:
    """Sums the durations (ms) of non-Python events in a jax.profiler trace, by event name.

    The trace holds one event per XLA op (named as in the HLO dump, e.g. `fusion.3`,
    `custom-call.12` for a oneDNN matmul): the thunk runtime records them always, the other one
    with `--xla_cpu_enable_xprof_traceme=true` (which the profile mode sets).
    """
    import glob
    import gzip

    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    totals: dict[str, float] = {}
    for path in files:
        with gzip.open(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for e in events:
            if e.get("ph") == "X" and "dur" in e and not str(e.get("name", "$")).startswith("$"):
                totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"] / 1e3
    return totals


def child_profile(v: Variant, out_dir: str, steps: int) -> dict[str, Any]:
    """Traces `steps` train steps and times the step's parts, each jitted on its own.

    Parts: forward + backward (value_and_grad of the loss); the optimizer (clip + AdamW + apply on
    ready gradients); the attention core alone (12 layers, forward + backward); the matmuls alone
    (every projection and the LM head of one step, forward + backward, as plain dots).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from agpt_jax import attention as attention_lib
    from agpt_jax import model as model_lib
    from agpt_jax import optim, runtime

    cfg, trainer, batch = _jax_setup(v)
    state = trainer.init(jax.random.PRNGKey(0))
    state, first, times, _ = _time_steps(trainer.step, state, batch, 1, steps)
    trace_dir = os.path.join(out_dir, "trace")
    with jax.profiler.trace(trace_dir):
        state, _, traced, _ = _time_steps(trainer.step, state, batch, 0, 2)
    result: dict[str, Any] = {"step_s": times, "traced_step_s": traced}
    ops = _trace_op_times(trace_dir)
    result["trace_top"] = sorted(ops.items(), key=lambda kv: -kv[1])[:25]

    def timed(fn, *args, reps: int = steps) -> float:
        out = fn(*args)
        jax.block_until_ready(out)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    model = model_lib.GPT(cfg)
    params = state.params

    def loss_fn(p, tok, lab):
        logits = model.apply({"params": p}, tok)
        return jnp.mean(model_lib.cross_entropy(logits, lab))

    with trainer.mesh:
        fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
        fwd = jax.jit(loss_fn)
        result["forward_s"] = timed(fwd, params, batch["tokens"], batch["labels"])
        result["forward_backward_s"] = timed(fwd_bwd, params, batch["tokens"], batch["labels"])
        _, grads = fwd_bwd(params, batch["tokens"], batch["labels"])

    tx = optim.make_optimizer(optim.OptimConfig(clip_grad=1.0), optax.constant_schedule(3e-4))

    def opt_step(p, g, s):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    result["optimizer_s"] = timed(jax.jit(opt_step), params, grads, tx.init(params))

    dtype = cfg.dtype
    b, s, d = MICRO_BATCH, cfg.seq_length, cfg.head_dim
    key = jax.random.PRNGKey(3)
    q = jax.random.normal(key, (b, s, cfg.num_heads, d), dtype)
    k = jax.random.normal(key, (b, s, cfg.num_kv_heads, d), dtype)

    def attn_loss(q, k, vv):
        out = attention_lib.attention(q, k, vv, causal=True, impl=cfg.attention,
                                      platform=runtime.capabilities_for("cpu"))
        return jnp.sum(out.astype(jnp.float32))

    attn = jax.jit(jax.value_and_grad(attn_loss, argnums=(0, 1, 2)))
    result["attention_fwd_bwd_s"] = cfg.num_layers * timed(attn, q, k, k)

    # Every weight matmul of one step as plain dots: forward x @ W, backward dX = dY @ W^T and
    # dW = X^T @ dY (the 6 x matmul-weights part of flops_per_token).
    t = b * s
    h, f, v_pad = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    shapes = [(h, cfg.num_heads * d), (h, 2 * cfg.num_kv_heads * d), (cfg.num_heads * d, h),
              (h, 2 * f), (f, h)]

    def dots(x_list, w_list, dy_list):
        acc = []
        for x, w, dy in zip(x_list, w_list, dy_list):
            acc += [x @ w, dy @ w.T, x.T @ dy]
        return acc

    def make(shape_list):
        xs = [jnp.ones((t, i), dtype) for i, _ in shape_list]
        ws = [jnp.ones((i, o), dtype) for i, o in shape_list]
        dys = [jnp.ones((t, o), dtype) for _, o in shape_list]
        return xs, ws, dys

    layer_dots = jax.jit(dots)
    result["layer_matmuls_s"] = cfg.num_layers * timed(layer_dots, *make(shapes))
    result["head_matmuls_s"] = timed(jax.jit(dots), *make([(h, v_pad)]))
    flops_layers = cfg.num_layers * sum(6 * t * i * o for i, o in shapes)
    result["matmul_flops"] = flops_layers + 6 * t * h * v_pad
    result["attention_flops"] = 12.0 * cfg.num_layers * s * h * t
    result["flops_per_token"] = cfg.flops_per_token()
    result["tokens_per_step"] = t
    return result


# --------------------------------------------------------------------------------------------------
# Parent: spawn the children, collect, print.
# --------------------------------------------------------------------------------------------------


def _child_env(v: Variant, extra_flags: str = "") -> dict[str, str]:
    """The environment a variant's process starts with: its XLA flags and malloc tunable."""
    if v.huge_pages:
        env = hostmem.environment(os.environ)
    else:
        env = dict(os.environ, **{hostmem.ENV_VAR: "system"})
        kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and t.split("=", 1)[0] != hostmem.TUNABLE.split("=", 1)[0]]
        env["GLIBC_TUNABLES"] = ":".join(kept)
    env["XLA_FLAGS"] = v.xla_flags(extra_flags)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_child(v: Variant, args: types.SimpleNamespace, extra_flags: str = "",
              profile_dir: str | None = None) -> dict[str, Any]:
    """Runs one variant in a fresh process; adds its peak RSS (GiB) from wait4's rusage."""
    env = _child_env(v, extra_flags)
    cmd = [v.interpreter, os.path.abspath(__file__), "--child", json.dumps(dataclasses.asdict(v)),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.quick:
        cmd.append("--quick")
    if profile_dir:
        cmd += ["--profile", profile_dir]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"variant {v.name!r} failed (exit {proc.returncode}); its output:\n{out}")
    result = json.loads(lines[-1][len(_RESULT):])
    result["rss_gib"] = usage.ru_maxrss / 2**20
    result["wall_s"] = time.perf_counter() - t
    return result


def _tokens_per_s(r: dict[str, Any]) -> float:
    return r["tokens_per_step"] / statistics.median(r["step_s"])


def _peak_key(v: Variant) -> tuple[str, str, bool]:
    return ("torch" if v.kind == "torch" else "jax", v.dtype, v.thunk)


def measure(args: types.SimpleNamespace) -> None:
    variants = jax_variants(args.quick)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        variants = [v for v in variants if any(w in v.name for w in wanted)]
        if not variants:
            raise ValueError(f"--only {args.only!r} matches no variant; choose among "
                             f"{[v.name for v in jax_variants(False)]}")
    variants += TORCH_VARIANTS
    peak_variants = {}
    for v in variants:
        key = _peak_key(v)
        if key not in peak_variants:
            kind = "torch_peak" if key[0] == "torch" else "jax_peak"
            runtime = "" if key[0] == "torch" else (" thunk" if key[2] else " no-thunk")
            peak_variants[key] = Variant(f"{key[0]} matmul {key[1]}{runtime}", kind, key[1],
                                         key[2])
    peaks: dict[tuple[str, str, bool], list[float]] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for key, pv in peak_variants.items():
            r = run_child(pv, args)
            peaks.setdefault(key, []).append(r["peak"])
            print(f"[{rep}] {pv.name:32s} " + "  ".join(f"{n}^3 {g:7.1f}" for n, g in
                                                           r["gflops"].items()) + " GFLOP/s",
                  flush=True)
        for v in variants:
            r = run_child(v, args)
            results.setdefault(v.name, []).append(r)
            print(f"[{rep}] {v.name:32s} {_tokens_per_s(r):7.1f} tokens/s  first step "
                  f"{r['first_s']:6.1f} s  rss {r['rss_gib']:.2f} GiB  loss {r['losses'][-1]:.3f}",
                  flush=True)

    def tps(name: str) -> float:
        return statistics.median(_tokens_per_s(r) for r in results[name])

    torch_fp32, torch_bf16 = tps("torch fp32"), tps("torch bf16 autocast")
    print()
    print(f"bench_125m train step, micro-batch {MICRO_BATCH} x seq 1024, {args.steps} timed steps "
          f"(median) after {args.warmup} warm-up, {args.repeat} repeat(s), "
          f"{os.cpu_count()} CPU threads")
    print()
    print("matmul ceilings (median GFLOP/s, best of the sizes "
          f"{' and '.join(f'{n}^3' for n in MATMUL_SIZES)}):")
    for key, pv in peak_variants.items():
        vals = peaks[key]
        spread = (max(vals) - min(vals)) / statistics.median(vals) * 100
        print(f"  {pv.name:32s} {statistics.median(vals):8.1f}   spread {spread:4.1f}%")
    print()
    header = (f"| {'variant':30s} | tokens/s | spread | GFLOP/s |   MFU | x torch fp32 | "
              f"x torch bf16 | first step s | peak RSS GiB |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for v in variants:
        rs = results[v.name]
        t = tps(v.name)
        vals = [_tokens_per_s(r) for r in rs]
        spread = (max(vals) - min(vals)) / statistics.median(vals) * 100
        gflops = t * rs[0]["flops_per_token"] / 1e9
        mfu = gflops / statistics.median(peaks[_peak_key(v)]) * 100
        print(f"| {v.name:30s} | {t:8.1f} | {spread:5.1f}% | {gflops:7.1f} | {mfu:4.1f}% | "
              f"{t / torch_fp32:11.2f}x | {t / torch_bf16:11.2f}x | "
              f"{statistics.median(r['first_s'] for r in rs):12.1f} | "
              f"{max(r['rss_gib'] for r in rs):12.2f} |")
    print()
    print("MFU: JAX variants against the JAX matmul peak of the same dtype and XLA runtime flags; "
          "torch against torch's own matmul peak of its autocast dtype.")


# --------------------------------------------------------------------------------------------------
# Paired mode: long-lived processes, one measurement each per round, ratios within a round.
# --------------------------------------------------------------------------------------------------

TORCH_FP32, TORCH_BF16 = TORCH_VARIANTS[0], TORCH_VARIANTS[1]


def worker(v: Variant, args: types.SimpleNamespace) -> None:
    """A paired-mode process: sets v up, warms it up, then answers each `measure` line on stdin
    with one RESULT line (the median seconds of `--turn-steps` back-to-back steps after one
    untimed step, and the last loss; or the matmul GFLOP/s), until stdin closes."""
    if v.kind in ("jax", "torch"):
        _, step = (_jax_stepper if v.kind == "jax" else _torch_stepper)(v)

        def measure() -> dict[str, Any]:
            # The first step after the process sat idle for a round is slower for XLA (5.8-5.9 s
            # against 4.6-5.6 s back-to-back in one check; torch showed no such effect), and a
            # training run never idles between steps: it is run but not timed.
            step()
            timed = [step() for _ in range(args.turn_steps)]
            return {"s": statistics.median(t for t, _ in timed), "loss": timed[-1][1]}
    else:
        meter = (_jax_peak_meter if v.kind == "jax_peak" else _torch_peak_meter)(v, args.quick)

        def measure() -> dict[str, Any]:
            gflops = meter()
            return {"gflops": gflops, "peak": max(gflops.values())}
    for _ in range(args.warmup):
        measure()
    print(_RESULT + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        print(_RESULT + json.dumps(measure()), flush=True)


class _Worker:
    """The parent's handle on one paired-mode process."""

    def __init__(self, v: Variant, args: types.SimpleNamespace):
        self.v = v
        cmd = [v.interpreter, os.path.abspath(__file__), "--worker",
               json.dumps(dataclasses.asdict(v)), "--warmup", str(args.warmup),
               "--turn-steps", str(args.turn_steps)]
        if args.quick:
            cmd.append("--quick")
        self.proc = subprocess.Popen(cmd, env=_child_env(v), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(_RESULT):
                return json.loads(line[len(_RESULT):])
        raise RuntimeError(f"paired-mode process for {self.v.name!r} exited (code "
                           f"{self.proc.wait()}) without a result; its errors are above")

    def measure(self) -> dict[str, Any]:
        self.proc.stdin.write("measure\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> float:
        """Ends the process; returns its peak RSS in GiB."""
        self.proc.stdin.close()
        _, _, usage = os.wait4(self.proc.pid, 0)
        return usage.ru_maxrss / 2**20


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _stacks(args: types.SimpleNamespace) -> list[tuple[str, str]]:
    """(label, interpreter) of every JAX stack to measure: this one, then each --stack."""
    import jax  # pylint: disable=import-outside-toplevel

    out = [(f"jax {jax.__version__}", "")]
    for spec in args.stack:
        label, sep, python = spec.partition("=")
        if not sep or not os.path.isfile(python):
            raise ValueError(f"--stack {spec!r}: expected LABEL=PYTHON with an existing "
                             "interpreter, e.g. 'jax 0.11.2=.venv-py312/bin/python'")
        out.append((label, python))
    return out


def _paired_variants(args: types.SimpleNamespace) -> tuple[list[Variant], dict[str, str]]:
    """The train-step variants of each stack in --dtypes, the torch baselines, the ceilings;
    and for each train variant the ceiling its MFU is taken against."""
    variants: list[Variant] = []
    ceilings: list[Variant] = []
    ceiling_of: dict[str, str] = {}
    stacks = _stacks(args)
    for label, python in stacks:
        # What agpt-jax's runtime sets on that stack: the non-thunk runtime where XLA has it
        # (jax 0.5.0); XLA of jax 0.11 has only the thunk runtime and ignores the flag.
        thunk = _stack_has_only_thunk(python)
        for dtype in args.dtypes.split(","):
            tag = f" [{label}]" if len(stacks) > 1 else ""
            name = ("jax bf16 (agpt-jax defaults)" if dtype == "bfloat16" else "jax fp32") + tag
            peak = f"jax matmul {dtype}{tag}"
            variants.append(dataclasses.replace(DEFAULT, name=name, dtype=dtype, thunk=thunk,
                                                python=python))
            for extra in (args.stack_flags if python else []):  # only the --stack stacks
                variants.append(dataclasses.replace(variants[-1], name=f"{name} {extra}",
                                                    extra_flags=extra))
                ceiling_of[variants[-1].name] = peak
            if peak not in ceiling_of.values():
                ceilings.append(Variant(peak, "jax_peak", dtype, thunk=thunk, python=python))
            ceiling_of[name] = peak
    torch_peaks = {"float32": Variant("torch matmul float32", "torch_peak", "float32"),
                   "bfloat16": Variant("torch matmul bfloat16", "torch_peak", "bfloat16")}
    for v in (TORCH_FP32, TORCH_BF16):
        ceiling_of[v.name] = torch_peaks[v.dtype].name
    return variants + [TORCH_FP32, TORCH_BF16] + ceilings + list(torch_peaks.values()), ceiling_of


def _stack_has_only_thunk(python: str) -> bool:
    """Whether agpt-jax's runtime adds no XLA CPU flag on the stack of `python`."""
    code = "from agpt_jax import compat; print(not compat.CPU_XLA_FLAGS)"
    out = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return out.stdout.strip().splitlines()[-1] == "True"


def paired(args: types.SimpleNamespace) -> None:
    """Head-to-head: agpt-jax on each stack, torch fp32, torch bf16 autocast and the matmul
    ceilings, each in its own long-lived process. Every round measures each once (one train step,
    or one ceiling), in an order that rotates per round, and the ratios and MFU are taken within a
    round: drifts of the machine's speed that last longer than a round cancel out."""
    variants, ceiling_of = _paired_variants(args)
    workers = [_Worker(v, args) for v in variants]
    try:
        for w in workers:
            w.read()  # ready: set up, compiled and warmed up
        rounds: list[dict[str, dict[str, Any]]] = []
        for r in range(args.paired):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            rounds.append({w.v.name: w.measure() for w in order})
            got = rounds[-1]
            print(f"[{r}] " + "  ".join(
                f"{name}: " + (f"{m['s']:.2f} s" if "s" in m else f"{m['peak']:.0f} GFLOP/s")
                for name, m in got.items()), flush=True)
    finally:
        rss = {w.v.name: w.close() for w in workers}
    tokens = MICRO_BATCH * 1024
    from agpt_jax import model as model_lib  # pylint: disable=import-outside-toplevel
    flops = model_lib.get_preset(PRESET).flops_per_token() * tokens
    print()
    print(f"bench_125m train step, micro-batch {MICRO_BATCH} x seq 1024, {args.paired} paired "
          f"rounds after {args.warmup} warm-up step(s); per round and variant, the median of "
          f"{args.turn_steps} back-to-back steps after an untimed one; {os.cpu_count()} CPU "
          "threads; median (min-max) over the rounds of each round's own figure")
    print()
    print(f"| {'variant':40s} | step s | tokens/s | MFU (this round's ceiling) | "
          f"x torch fp32 | x torch bf16 | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        if v.kind not in ("jax", "torch"):
            continue
        steps = [rd[v.name]["s"] for rd in rounds]
        peak = ceiling_of[v.name]
        mfu = [flops / rd[v.name]["s"] / 1e9 / rd[peak]["peak"] * 100 for rd in rounds]
        x32 = [rd[TORCH_FP32.name]["s"] / rd[v.name]["s"] for rd in rounds]
        x16 = [rd[TORCH_BF16.name]["s"] / rd[v.name]["s"] for rd in rounds]
        print(f"| {v.name:40s} | {_summary(steps)} | {tokens / statistics.median(steps):8.1f} | "
              f"{statistics.median(mfu):.1f} ({min(mfu):.1f}-{max(mfu):.1f})% | {_summary(x32)}x | {_summary(x16)}x | {rss[v.name]:.2f} |")
    print()
    for v in variants:
        if v.kind.endswith("_peak"):
            print(f"ceiling {v.name}: {_summary([rd[v.name]['peak'] for rd in rounds])} GFLOP/s")


def profile(args: types.SimpleNamespace) -> None:
    """Profiles the variant named by --variant (default: bf16, no thunk runtime, blockwise)."""
    by_name = {v.name: v for v in jax_variants(False)}
    if args.variant not in by_name:
        raise ValueError(f"--variant {args.variant!r}: choose one of {sorted(by_name)}")
    v = by_name[args.variant]
    out_dir = os.path.abspath(args.profile)
    os.makedirs(out_dir, exist_ok=True)
    dump = os.path.join(out_dir, "xla_dump")
    dump_flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_cpu_enable_xprof_traceme=true"
    peak = run_child(Variant("peak", "jax_peak", v.dtype, v.thunk), args)["peak"]
    r = run_child(v, args, extra_flags=dump_flags, profile_dir=out_dir)
    step = statistics.median(r["step_s"])
    print(f"profile of {v.name!r} (XLA dump in {dump}, trace in {out_dir}/trace)")
    print(f"  matmul peak {peak:.1f} GFLOP/s; step {step:.3f} s "
          f"({r['tokens_per_step'] / step:.1f} tokens/s); traced steps "
          + ", ".join(f"{x:.3f}" for x in r["traced_step_s"]))
    ideal = r["flops_per_token"] * r["tokens_per_step"] / peak / 1e9
    rows = [
        ("whole step", step, r["flops_per_token"] * r["tokens_per_step"]),
        ("forward only", r["forward_s"], None),
        ("forward + backward", r["forward_backward_s"], None),
        ("optimizer (clip + AdamW + apply)", r["optimizer_s"], None),
        ("weight matmuls alone (x12 layers)", r["layer_matmuls_s"], None),
        ("LM-head matmuls alone", r["head_matmuls_s"], None),
        ("attention core fwd+bwd (x12 layers)", r["attention_fwd_bwd_s"], r["attention_flops"]),
    ]
    print(f"  {'part':40s} {'seconds':>8s} {'of step':>8s} {'GFLOP/s':>8s}")
    for name, secs, flops in rows:
        rate = f"{flops / secs / 1e9:8.1f}" if flops else " " * 8
        print(f"  {name:40s} {secs:8.3f} {secs / step * 100:7.1f}% {rate}")
    mm = r["layer_matmuls_s"] + r["head_matmuls_s"]
    print(f"  weight matmuls together: {r['matmul_flops'] / mm / 1e9:.1f} GFLOP/s "
          f"({r['matmul_flops'] / 1e9:.1f} GFLOP)")
    print(f"  step at the matmul peak would take {ideal:.3f} s")
    print("  top trace events (ms, summed over 2 traced steps):")
    for name, ms in r["trace_top"]:
        print(f"    {ms:10.1f}  {name[:100]}")


def main(argv: list[str] | None = None) -> None:
    fv = flags.FlagValues()
    flags.DEFINE_bool("quick", False, "smoke run: fewer steps and variants", flag_values=fv)
    flags.DEFINE_integer("steps", None, "timed steps per variant (default 5)", flag_values=fv)
    flags.DEFINE_integer("warmup", None, "untimed steps (default 2)", flag_values=fv)
    flags.DEFINE_integer("repeat", 1, "run every variant this many times", flag_values=fv)
    flags.DEFINE_string("only", None, "comma-separated substrings: measure only the JAX variants "
                        "whose name contains one (the torch baselines always run)", flag_values=fv)
    flags.DEFINE_string("profile", None, "profile one JAX variant into this folder",
                        flag_values=fv)
    flags.DEFINE_string("variant", DEFAULT.name, "variant to profile", flag_values=fv)
    flags.DEFINE_integer("paired", 0, "ROUNDS: head-to-head of agpt-jax defaults, torch fp32 and "
                         "torch bf16 in long-lived processes: ROUNDS rounds of one step each, "
                         "ratios per round", flag_values=fv)
    flags.DEFINE_integer("turn-steps", 2, "paired mode: timed back-to-back steps per variant and "
                         "round (after one untimed step)", flag_values=fv)
    flags.DEFINE_multi_string("stack", [], "LABEL=PYTHON: paired mode: also measure agpt-jax "
                              "under this interpreter (a virtual environment of the other stack "
                              "with this checkout installed), e.g. --stack "
                              "'jax 0.11.2=.venv-py312-jax011/bin/python'", flag_values=fv)
    flags.DEFINE_multi_string("stack-flags", [], "XLA_FLAGS: paired mode: also measure each "
                              "--stack stack's train step with these extra XLA flags "
                              "(benchmarks/xla_cpu_flags.py finds candidates)", flag_values=fv)
    flags.DEFINE_string("dtypes", "bfloat16", "paired mode: comma-separated JAX compute dtypes "
                        "to measure per stack (bfloat16, float32)", flag_values=fv)
    flags.DEFINE_string("child", None, "internal: measure this variant (JSON) in this process",
                        flag_values=fv)
    flags.DEFINE_string("worker", None, "internal: serve this variant (JSON) in paired mode",
                        flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps < 1 or args.warmup < 1 or args.repeat < 1 or args.turn_steps < 1:
        raise ValueError("--steps, --warmup, --repeat and --turn-steps must be >= 1 (the first "
                         "step compiles)")

    if args.worker is not None:
        worker(Variant(**json.loads(args.worker)), args)
        return
    if args.child is not None:
        v = Variant(**json.loads(args.child))
        if args.profile:
            result = child_profile(v, args.profile, args.steps)
        elif v.kind == "jax":
            result = child_jax(v, args.warmup, args.steps)
        elif v.kind == "torch":
            result = child_torch(v, args.warmup, args.steps)
        elif v.kind == "jax_peak":
            result = child_jax_peak(v, args.quick)
        else:
            result = child_torch_peak(v, args.quick)
        print(_RESULT + json.dumps(result), flush=True)
        return
    if args.profile:
        profile(args)
    elif args.paired:
        paired(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
