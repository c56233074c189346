"""The runtime itself: platform choice, multi-process start-up and the platform work-arounds.

One job: :func:`initialize` starts jax once per process and returns the :class:`Runtime` the rest
of the code asks about the platform. This is the one module that reads the backend, the device
platform or the Intel XPU plugin, sets flags that must precede the backend's start, and calls
``jax.distributed.initialize`` (DESIGN.md, "One place for platform"). It is also the only module
with ``jax._src`` imports: the work-arounds for the Intel plugin's ``sycl`` platform at jax 0.5.0
(spec/jax-stack.md section 3) live here and nowhere else.

The process's state is this module's global ``_runtime`` (None until :func:`initialize`
returns); ``agpt_jax.runtime._runtime`` reads and writes the same variable.

What the platform can do is a :class:`~agpt_jax.runtime.capabilities.Capabilities`, resolved here
once, before anything is jitted (``Runtime.capabilities``); the table of them is in
:mod:`agpt_jax.runtime.capabilities`.

Imports: jax, absl, agpt_jax.compat / hostmem / xpu, :mod:`agpt_jax.runtime.launch` and
:mod:`agpt_jax.runtime.capabilities`. It must not import :mod:`~agpt_jax.runtime.check` (which
imports it), nor agpt_jax.loop, train, model, config or converters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import MutableMapping

import jax
from absl import logging

from agpt_jax import compat, hostmem, xpu
# From the module itself, not the package (which imports this module).
from agpt_jax.runtime.capabilities import (
    Capabilities,
    capabilities_for,
    for_backend,
    platform_of_backend,
)
from agpt_jax.runtime.launch import DistributedConfig, _complete_distributed


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the rest of the code may know about the platform, fixed at start-up.

    Attributes:
        platform: ``"cpu" | "xpu" | "gpu" | "tpu"`` (``xpu`` is the Intel plugin's ``sycl``).
        process_index: this process's rank.
        process_count: number of processes.
        local_device_count: devices this process drives.
        device_count: devices across all processes.
        workarounds: what was applied at start-up, human readable.
        capabilities: what the platform can do (attention choice and tiles, peak FLOP/s, copy
            before an asynchronous save, XLA flags, donation, host callbacks): what code outside
            the runtime asks instead of comparing ``platform``.
        device_kind: the first local device's kind (e.g. ``"cpu"``, ``"Intel(R) Data Center GPU
            Max 1550"``), for peak-FLOP tables.
        jax_platform: jax's own name of the backend (``"cpu"``, ``"sycl"``, ``"cuda"``, ...).
    """

    platform: str
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    workarounds: tuple[str, ...]
    capabilities: Capabilities
    device_kind: str = ""
    jax_platform: str = ""

    @property
    def default_attention(self) -> str:
        """``capabilities.default_attention``: ``"pallas"`` on CUDA, ``"blockwise"`` on XPU,
        ``"xla"`` elsewhere."""
        return self.capabilities.default_attention

    @property
    def supports_donation(self) -> bool:
        """``capabilities.supports_donation``: ``donate_argnums`` really frees the buffers."""
        return self.capabilities.supports_donation

    @property
    def supports_host_callbacks(self) -> bool:
        """``capabilities.supports_host_callbacks``: host callbacks may be used inside jit."""
        return self.capabilities.supports_host_callbacks

    @property
    def is_main_process(self) -> bool:
        """True on process 0, the one that writes logs, metrics and summaries."""
        return self.process_index == 0

    def describe(self) -> str:
        """One line for the start-up log."""
        return (f"platform={self.platform} ({self.jax_platform}, {self.device_kind}) "
                f"process {self.process_index}/{self.process_count} "
                f"devices {self.local_device_count} local / {self.device_count} total "
                f"attention={self.default_attention} donation={self.supports_donation} "
                f"host_callbacks={self.supports_host_callbacks} "
                f"workarounds=[{'; '.join(self.workarounds)}]")


PLATFORMS: tuple[str, ...] = ("auto", "xpu", "cpu")

_runtime: Runtime | None = None


def _backends_started() -> bool:
    from jax._src import xla_bridge  # runtime/platform.py is the one place allowed jax._src
    return xla_bridge.backends_are_initialized()


def _start_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` with every value resolved and the heartbeat timeout set.

    ``cluster_detection_method="deactivate"``: jax's own detection would otherwise pin one device
    per process under Slurm / Open MPI. From jax 0.6 the public function takes
    ``heartbeat_timeout_seconds``; at jax 0.5.0 it does not expose the heartbeat settings, and
    (after checking that no backend started, done by the caller) only calls
    ``global_state.initialize``, which takes them as an interval and a count of missed beats.
    """
    local = list(cfg.local_device_ids) if cfg.local_device_ids is not None else None
    common = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id, local_device_ids=local,
                  cluster_detection_method="deactivate",
                  initialization_timeout=cfg.initialization_timeout_s)
    if compat.DISTRIBUTED_HEARTBEAT_IS_PUBLIC:
        jax.distributed.initialize(**common, heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
        return
    from jax._src import distributed as jax_distributed

    beat = cfg.heartbeat_timeout_s // 10
    jax_distributed.global_state.initialize(
        **common,
        service_heartbeat_interval_seconds=beat, service_max_missing_heartbeats=10,
        client_heartbeat_interval_seconds=beat, client_max_missing_heartbeats=10)


def _platform_version() -> str:
    """The default backend's ``platform_version`` (names the plugin behind a ``gpu`` backend)."""
    from jax._src import xla_bridge
    return str(getattr(xla_bridge.get_backend(), "platform_version", ""))


def _distributed_started() -> bool:
    from jax._src import distributed
    return distributed.global_state.client is not None


def _create_cpu_communicators() -> None:
    """Creates the CPU communicators of jax's multi-process helpers, all in one waited-for program.

    ``multihost_utils`` (and Orbax's barriers through it) reduce over the ``processes`` axis of a
    (processes, local devices) mesh and gather over all devices in ``jax.devices()`` order (that
    of every CPU mesh ``make_mesh`` builds). A call returns once device 0 is done, so two calls
    in a row can both be creating another device's communicator: at jax 0.5.0 that creates it
    twice (``compat.CPU_COMMUNICATORS_CAN_BE_CREATED_TWICE``). Made here, later calls find them.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    axes = ("processes", "local_devices")
    local = jax.local_device_count()
    mesh = Mesh(np.array(jax.devices()).reshape(jax.process_count(), local), axes)
    spec = PartitionSpec(*axes)
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, spec),
                                                  np.ones((1, local), np.int32))
    both = jax.jit(compat.shard_map(lambda x: (jax.lax.psum(x, axes[0]), jax.lax.psum(x, axes)),
                                    mesh, in_specs=spec, out_specs=(spec, spec), check=False))
    got = tuple(int(a.addressable_data(0)[0, 0]) for a in jax.block_until_ready(both(ones)))
    if got != (jax.process_count(), jax.device_count()):
        raise RuntimeError(f"the cpu collectives' start-up reduction gave {got}, expected "
                           f"({jax.process_count()}, {jax.device_count()})")


def _enable_sycl_donation(jax_platform: str = "sycl") -> str | None:
    """Lets jax donate buffers on the ``sycl`` platform (spec/jax-stack.md section 3, item 1).

    Stock jax 0.5.0 keeps an allow-list of platforms with donation in
    ``jax._src.interpreters.mlir._platforms_with_donation``; without ``"sycl"`` in it jax warns
    "Donation is not implemented for ['sycl']" and keeps both copies of params and optimizer
    state. Appending it before the first jit is what Intel's own test harness does.

    Returns:
        A description of what was done, or None if the list is absent (a newer jax).
    """
    try:
        from jax._src.interpreters import mlir
    except ImportError:
        return None
    allow_list = getattr(mlir, "_platforms_with_donation", None)
    if not isinstance(allow_list, list):
        return None
    if jax_platform not in allow_list:
        allow_list.append(jax_platform)
    return (f"buffer donation enabled on {jax_platform} (appended to jax "
            "mlir._platforms_with_donation)")


# XLA flags for the CPU client, added to XLA_FLAGS before jax's backends start (why, and why in
# single-process runs only: agpt_jax/runtime/capabilities.py). A CPU client exists next to every
# accelerator, and which platform "auto" starts is unknown before the start, so they are added
# whatever the platform.
CPU_XLA_FLAGS: tuple[str, ...] = capabilities_for("cpu").xla_flags


def apply_cpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends each of CPU_XLA_FLAGS to XLA_FLAGS unless a value for that flag is already there.

    Takes effect only before jax's backends start (XLA reads XLA_FLAGS once, when the first
    client is created).

    Args:
        environ: the environment to update.

    Returns:
        The flags added (empty when the user set them all).
    """
    current = environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=", 1)[0] for flag in current}
    added = [flag for flag in CPU_XLA_FLAGS if flag.split("=", 1)[0] not in names]
    if added:
        environ["XLA_FLAGS"] = " ".join(current + added)
    return added


def initialize(
    platform: str = "auto",
    distributed: DistributedConfig | None = None,
    *,
    num_cpu_devices: int | None = None,
    compilation_cache_dir: str | None = None,
) -> Runtime:
    """Starts jax on the chosen platform, joins the multi-process job if any, applies work-arounds.

    Call it first, before any other jax computation: the platform choice, the CPU device count,
    the CPU collectives and ``jax.distributed.initialize`` only take effect before jax's backends
    start. Idempotent: a second call with compatible arguments returns the same :class:`Runtime`.

    Args:
        platform: ``"auto"`` (jax's choice: the XPU plugin when it works, else CPU), ``"xpu"``
            (the Intel plugin, an error if it is missing or fails) or ``"cpu"``.
        distributed: how to join a multi-process job; fields left None (or the whole config)
            come from the launcher's environment (:func:`distributed_from_env`). A single process
            needs nothing.
        num_cpu_devices: on CPU, the number of simulated devices (``jax_num_cpu_devices``).
        compilation_cache_dir: a directory for jax's persistent compilation cache.

    Returns:
        The :class:`Runtime`.

    Raises:
        ValueError: bad arguments or launcher environment (message names the fix).
        RuntimeError: jax was already started in a way these arguments cannot change.
    """
    global _runtime
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {', '.join(PLATFORMS)}")
    if num_cpu_devices is not None and num_cpu_devices < 1:
        raise ValueError(f"num_cpu_devices={num_cpu_devices} must be at least 1")
    if _runtime is not None:
        return _check_compatible(_runtime, platform, distributed, num_cpu_devices)

    resolved = _complete_distributed(distributed, os.environ)
    started = _backends_started()
    cpu_flags: list[str] = []
    plugins = xpu.installed()
    if platform == "xpu" and not plugins:
        raise ValueError(f"platform='xpu' but {xpu.missing_message(compat.STACK)}\n"
                         "or use platform='cpu'")
    if started:
        if resolved is not None and not _distributed_started():
            raise RuntimeError(
                "jax already ran a computation in this process, so it can no longer join a "
                "multi-process job: call agpt_jax.runtime.initialize() before any other jax use")
        if num_cpu_devices is not None and num_cpu_devices != jax.local_device_count():
            raise RuntimeError(
                f"num_cpu_devices={num_cpu_devices} but jax already started with "
                f"{jax.local_device_count()} devices: call initialize() before any other jax use")
    else:
        if platform != "auto":
            # The backend name each plugin registers (agpt_jax/xpu.py). CPU stays available
            # next to it for host-side arrays; the first name is the default.
            jax.config.update("jax_platforms", ",".join([p.backend for p in plugins] + ["cpu"])
                              if platform == "xpu" else "cpu")
        if num_cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", num_cpu_devices)
        if resolved is None:
            cpu_flags = apply_cpu_xla_flags()
    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)

    workarounds: list[str] = []
    if cpu_flags:
        workarounds.append(f"XLA CPU flags added: {' '.join(cpu_flags)} (bf16 matmuls on oneDNN)")
    if resolved is not None and not _distributed_started():
        # Gloo must be chosen in code before the CPU client exists: at jax 0.5.0 the
        # JAX_CPU_COLLECTIVES_IMPLEMENTATION variable is ignored (spec/jax-stack.md section 4).
        # It only concerns the CPU client, so it is harmless on accelerators.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%d, process_id=%d)",
                     resolved.coordinator_address, resolved.num_processes, resolved.process_id)
        _start_distributed(resolved)

    try:
        jax_platform = jax.default_backend()
    except RuntimeError as err:
        hint = ""
        if platform == "xpu":
            hint = ("; the Intel plugin is installed but its native library did not load (see "
                    "'Jax plugin configuration error' above): load the oneAPI runtime it was built "
                    "for (on Aurora: module load frameworks or oneapi), or see docs/xpu.md")
        raise RuntimeError(f"jax could not start platform {platform!r}: {err}{hint}") from err
    # jax 0.11 may report the oneapi backend as "gpu" (an alias); the plugin decides, not the name.
    ours, plugin = platform_of_backend(jax_platform, _platform_version())
    if platform != "auto" and ours != platform:
        raise RuntimeError(
            f"platform={platform!r} was requested but jax runs on {jax_platform!r}; jax had "
            "already started, or the platform failed to start (see jax's log above)")

    supports_donation, supports_callbacks = True, True
    if plugin is not None:
        workarounds.append(f"Intel GPU plugin: {plugin.name} {xpu.version(plugin.name)} "
                           f"({plugin.stack}), backend {jax_platform}")
        if not plugin.donation_in_jax:
            donation = _enable_sycl_donation(jax_platform)
            supports_donation = donation is not None
            workarounds.append(donation or f"buffer donation unavailable on {jax_platform} "
                               "(jax's allow-list not found); donated buffers are copied")
        if not plugin.host_callbacks:
            # spec/jax-stack.md section 3, item 2: "EmitPythonCallback not supported on sycl".
            supports_callbacks = False
            workarounds.append("no host callbacks inside jit on sycl (jax.debug.print, "
                               "pure_callback, io_callback disabled)")
        # Item 3: jax 0.5.0 has no sycl -> gpu alias, so jax.devices("gpu") finds nothing there.
        workarounds.append(f"platform alias: {jax_platform} reported as 'xpu'; code asks "
                           "Runtime.platform, never jax.devices('gpu')")
    if jax_platform == "cpu" and jax.process_count() > 1:
        workarounds.append("cpu collectives: gloo (set in code; the environment variable is "
                           "ignored at jax 0.5.0)")
        if compat.CPU_COMMUNICATORS_CAN_BE_CREATED_TWICE:
            _create_cpu_communicators()
            workarounds.append("cpu collectives: multihost_utils' communicators created at "
                               "start-up (jax 0.5.0 can create one twice, racing)")

    local = jax.local_devices()
    _runtime = Runtime(
        platform=ours,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=len(local),
        device_count=jax.device_count(),
        workarounds=tuple(workarounds),
        capabilities=for_backend(ours, jax_platform, supports_donation=supports_donation,
                                 supports_host_callbacks=supports_callbacks),
        device_kind=local[0].device_kind,
        jax_platform=jax_platform,
    )
    for line in workarounds:
        logging.info("runtime work-around: %s", line)
    logging.info("runtime: %s", hostmem.status())
    logging.info("runtime: %s", _runtime.describe())
    return _runtime


def _check_compatible(
    rt: Runtime, platform: str, distributed: DistributedConfig | None, num_cpu_devices: int | None
) -> Runtime:
    """Returns ``rt`` if a repeated :func:`initialize` call asks for nothing different."""
    problems = []
    if platform not in ("auto", rt.platform):
        problems.append(f"platform={platform!r} (running: {rt.platform!r})")
    if num_cpu_devices is not None and num_cpu_devices != rt.local_device_count:
        problems.append(f"num_cpu_devices={num_cpu_devices} (running: {rt.local_device_count})")
    if distributed is not None:
        if distributed.num_processes is not None and distributed.num_processes != rt.process_count:
            problems.append(f"num_processes={distributed.num_processes} "
                            f"(running: {rt.process_count})")
        if distributed.process_id is not None and distributed.process_id != rt.process_index:
            problems.append(f"process_id={distributed.process_id} (running: {rt.process_index})")
    if problems:
        raise RuntimeError(
            "agpt_jax.runtime.initialize() was already called; it cannot change "
            + ", ".join(problems))
    return rt


def current_runtime() -> Runtime:
    """The :class:`Runtime` of this process.

    Raises:
        RuntimeError: :func:`initialize` has not been called.
    """
    if _runtime is None:
        raise RuntimeError("call agpt_jax.runtime.initialize() at start-up, before using jax")
    return _runtime
