"""The environment check, ``python -m agpt_jax.runtime --check``.

One job: on a new node, print versions, platform, devices and work-arounds, run an all-reduce
across every device (and, on XPU, probe XLA's fused attention), and exit 1 if anything fails
(:func:`run_checks`, :func:`check_report`, :func:`format_report`, :func:`_main`). The exit
codes and the flag parser are the command lines' shared ones (:mod:`agpt_jax.cli`). The flags of
``--check`` are defined in ``agpt_jax/runtime/__main__.py``, so that importing this module
defines none.

Imports: jax, numpy, absl, agpt_jax.cli / compat / xpu and the other runtime modules
(:mod:`~agpt_jax.runtime.mesh`, :mod:`~agpt_jax.runtime.launch`,
:mod:`~agpt_jax.runtime.platform`). It must not import agpt_jax.loop, train, model, config or
converters.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from agpt_jax import compat, xpu
from agpt_jax.cli import EXIT_FAILED, EXIT_USAGE
from agpt_jax.runtime.launch import DistributedConfig
from agpt_jax.runtime.mesh import MESH_AXES, MeshConfig, make_mesh
from agpt_jax.runtime.platform import Runtime, initialize

@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One line of the ``--check`` report."""

    name: str
    ok: bool
    detail: str


_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
              *(d for p in xpu.PLUGINS for d in p.distributions))


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (``"not installed"`` for an absent package)."""
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_all_reduce(devices: Sequence[jax.Device] | None = None) -> CheckResult:
    """Sums one row per device across every device, two ways, and checks the totals.

    Device ``i`` (in mesh order) holds a ``[1, 128]`` float32 row of ``i + 1``; a ``shard_map``
    ``psum`` over all mesh axes must give every device ``n (n + 1) / 2``, and a jitted global
    ``jnp.sum`` (an all-reduce that XLA inserts) must give ``128 n (n + 1) / 2``.

    Args:
        devices: devices to reduce over; defaults to every device of every process.
    """
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    n = mesh.devices.size
    spec = PartitionSpec(MESH_AXES)
    rows = np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], 128, axis=1)
    x = jax.make_array_from_callback(rows.shape, NamedSharding(mesh, spec), lambda idx: rows[idx])
    psum = jax.jit(compat.shard_map(partial(jax.lax.psum, axis_name=MESH_AXES), mesh=mesh,
                                    in_specs=spec, out_specs=spec))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    start = time.perf_counter()
    reduced, summed = psum(x), total(x)
    jax.block_until_ready((reduced, summed))
    seconds = time.perf_counter() - start
    expected = n * (n + 1) / 2  # every integer here is exact in float32
    got = {float(v) for shard in reduced.addressable_shards for v in np.asarray(shard.data).flat}
    got_sum = float(np.asarray(summed.addressable_shards[0].data))
    ok = got == {expected} and got_sum == 128 * expected
    return CheckResult(
        "all-reduce", ok,
        f"psum over {n} devices {'==' if got == {expected} else '!='} {expected:g} "
        f"(got {sorted(got)}), global sum {got_sum:g} (expected {128 * expected:g}), "
        f"{seconds * 1e3:.0f} ms with compilation")


def attention_probe_hlo(seq_len: int = 512, heads: int = 8, head_dim: int = 64) -> str:
    """Compiles a plain causal softmax(QK^T / sqrt(d)) V in bf16 and returns the optimised HLO.

    Shapes ``q, k, v: [1, seq_len, heads, head_dim]`` bf16. Written with jnp only, so that any
    fused kernel in the result is XLA's own rewrite (spec/jax-stack.md section 2).
    """
    def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(q.dtype).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)

    shape = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.bfloat16)
    return jax.jit(attention).lower(shape, shape, shape).compile().as_text()


def fused_attention_targets(hlo_text: str) -> list[str]:
    """Custom-call targets in ``hlo_text`` that are fused attention kernels (contain "fmha")."""
    targets = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
    return sorted({t for t in targets if "fmha" in t.lower()})


def check_fused_attention(rt: Runtime) -> CheckResult:
    """On XPU: whether XLA rewrote a small causal attention into the plugin's fused kernel.

    Informational: the check passes when the probe compiles; "not fused" only means the
    blockwise attention (the XPU default) is the fast path.
    """
    if rt.platform != "xpu":
        return CheckResult("fused attention", True, "not applicable (only checked on xpu)")
    try:
        fused = fused_attention_targets(attention_probe_hlo())
    except Exception as err:  # a compile failure on a new node is exactly what --check reports
        return CheckResult("fused attention", False, f"probe failed to compile: {err}")
    return CheckResult(
        "fused attention", True,
        f"rewritten to {', '.join(fused)}" if fused else
        "not rewritten (no fmha custom call); blockwise attention is the fast path")


def run_checks(rt: Runtime) -> list[CheckResult]:
    """Runs every check of ``--check`` (collective ones on every process)."""
    expected_total = rt.local_device_count * rt.process_count
    results = [CheckResult(
        "devices", rt.device_count == expected_total and rt.local_device_count > 0,
        f"{rt.local_device_count} per process x {rt.process_count} processes = "
        f"{rt.device_count} total")]
    try:
        results.append(check_all_reduce())
    except Exception as err:  # report, do not crash: the user needs to see every other line
        results.append(CheckResult("all-reduce", False, f"failed: {type(err).__name__}: {err}"))
    results.append(check_fused_attention(rt))
    return results


# The Runtime's entries of the report, in this order: its fields and the capabilities it has always
# reported (the whole Capabilities stays out, so the report is what it was).
_REPORTED_RUNTIME = ("platform", "process_index", "process_count", "local_device_count",
                     "device_count", "workarounds", "default_attention", "supports_donation",
                     "supports_host_callbacks", "device_kind", "jax_platform")


def check_report(rt: Runtime) -> dict[str, object]:
    """The ``--check`` report as a JSON-serialisable dict (``"ok"``: every check passed)."""
    checks = run_checks(rt)
    plugins = xpu.installed()
    return {
        "stack": compat.STACK,
        "xpu_plugins": [f"{p.name} {xpu.version(p.name)} ({p.stack})" for p in plugins],
        "xpu_install": None if plugins else xpu.missing_message(compat.STACK),
        "versions": package_versions(),
        "runtime": {name: getattr(rt, name) for name in _REPORTED_RUNTIME},
        "local_devices": [str(d) for d in jax.local_devices()],
        "checks": [dataclasses.asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def format_report(report: Mapping[str, object]) -> str:
    """Human-readable text of :func:`check_report`'s result."""
    rt = report["runtime"]
    assert isinstance(rt, dict)
    prefix = f"[process {rt['process_index']}/{rt['process_count']}] "
    plugins = report["xpu_plugins"]
    if plugins and rt["platform"] != "xpu":
        plugins = [f"{plugins[0]} installed, but jax runs on {rt['jax_platform']}: the plugin did "
                   "not start (its error is in the log above; without an Intel GPU and the oneAPI "
                   "runtime that is expected)"]
    lines = [f"stack: {report['stack']}",
             "Intel GPU plugin: " + (", ".join(plugins) if plugins  # type: ignore[arg-type]
                                     else str(report["xpu_install"]).replace("\n", " | ")),
             "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),  # type: ignore[union-attr]
             f"platform: {rt['platform']} (jax backend {rt['jax_platform']}, {rt['device_kind']})",
             f"devices: {rt['local_device_count']} in this process, {rt['device_count']} total",
             f"local devices: {', '.join(report['local_devices'])}",  # type: ignore[arg-type]
             f"default attention: {rt['default_attention']}",
             "work-arounds: " + ("; ".join(rt["workarounds"]) or "none")]
    for check in report["checks"]:  # type: ignore[union-attr]
        lines.append(f"check {check['name']}: {'PASS' if check['ok'] else 'FAIL'}: "
                     f"{check['detail']}")
    lines.append("result: " + ("every check passed" if report["ok"] else "SOME CHECKS FAILED"))
    return "\n".join(prefix + line for line in lines)


def _main(argv: Sequence[str]) -> int:
    """``python -m agpt_jax.runtime --check [--json]``: prints the report.

    Returns:
        0 every check passed; 1 a check failed, or the platform did not start (--platform=xpu
        without an installed plugin is a failed check of this machine); 2 bad input (arguments,
        flag values, the launcher's environment), one line naming it.
    """
    from absl import flags

    flag = flags.FLAGS

    def usage(message: str) -> int:
        print(json.dumps({"ok": False, "error": message}) if flag.json else f"error: {message}",
              file=sys.stdout if flag.json else sys.stderr)
        return EXIT_USAGE

    if len(argv) > 1:
        return usage(f"unexpected arguments: {' '.join(argv[1:])}; pass flags only")
    if not flag.check:
        return usage("nothing to do: pass --check (and --json for a machine-readable report)")
    if flag.cpu_devices is not None and flag.cpu_devices < 1:
        return usage(f"--cpu_devices={flag.cpu_devices} must be at least 1")
    distributed = None
    if flag.coordinator_address or flag.num_processes or flag.process_id is not None:
        try:
            distributed = DistributedConfig(flag.coordinator_address, flag.num_processes,
                                            flag.process_id)
        except ValueError as err:
            return usage(f"--coordinator_address/--num_processes/--process_id: {err}")
    try:
        rt = initialize(flag.platform, distributed, num_cpu_devices=flag.cpu_devices)
    except (ValueError, RuntimeError) as err:
        unavailable = flag.platform == "xpu" and not xpu.installed()
        if isinstance(err, ValueError) and not unavailable:
            return usage(" ".join(str(err).split()))
        print(json.dumps({"ok": False, "error": str(err)}) if flag.json
              else f"runtime initialisation FAILED: {err}")
        return EXIT_FAILED
    report = check_report(rt)
    print(json.dumps(report) if flag.json else format_report(report), flush=True)
    return 0 if report["ok"] else EXIT_FAILED
