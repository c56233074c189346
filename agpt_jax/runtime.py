"""The runtime: platform choice, multi-process start-up, the device mesh and ``--check``.

This is the one module that reads the backend, the device platform or the Intel XPU plugin, sets
flags that must precede the backend's start, and calls ``jax.distributed.initialize``. Everything
else asks the :class:`Runtime` that :func:`initialize` returns (DESIGN.md, "One place for
platform"). It is also the only module with ``jax._src`` imports: the work-arounds for the Intel
plugin's ``sycl`` platform at jax 0.5.0 (spec/jax-stack.md section 3) live here and nowhere else.

Mesh axes are ``data`` (pure data parallelism: replicated params), ``fsdp`` (data parallelism with
params and optimizer state sharded) and ``tensor`` (tensor parallelism, innermost so that it stays
within a node).

Run ``python -m agpt_jax.runtime --check`` first on a new node: it prints versions, platform,
devices and work-arounds, runs an all-reduce across every device and exits 1 if anything fails.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from agpt_jax import compat, hostmem, xpu

#: Mesh axis names, outermost first. ``tensor`` is innermost: neighbouring devices (same node,
#: fastest links) carry the most communication-heavy axis.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes.

    Each size is a positive integer, or -1 on at most one axis for "all remaining devices".

    Attributes:
        data: replicas that each hold a full copy of the (fsdp-sharded) state.
        fsdp: devices over which params, gradients and optimizer state are sharded.
        tensor: devices over which each layer's matmuls are split (Megatron-style TP).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(
                    f"mesh axis {name}={size!r} is invalid: use a positive integer, or -1 for "
                    "'all remaining devices'"
                )
        if self.sizes.count(-1) > 1:
            raise ValueError(
                f"mesh {self} has more than one axis set to -1; at most one axis can fill the "
                "remaining devices, give the others explicit sizes"
            )

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Sizes in :data:`MESH_AXES` order, -1 kept as given."""
        return (self.data, self.fsdp, self.tensor)

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in zip(MESH_AXES, self.sizes))

    def resolve(self, device_count: int) -> tuple[int, int, int]:
        """Returns the concrete axis sizes for ``device_count`` devices.

        Args:
            device_count: the number of devices the mesh must cover exactly.

        Returns:
            ``(data, fsdp, tensor)`` with any -1 replaced, product equal to ``device_count``.

        Raises:
            ValueError: the sizes cannot cover ``device_count`` devices; the message gives the
                sizes, the device count and a fix.
        """
        fixed = math.prod(size for size in self.sizes if size != -1)
        if -1 in self.sizes:
            fill_axis = MESH_AXES[self.sizes.index(-1)]
            if device_count % fixed:
                raise ValueError(
                    f"mesh {self}: {fill_axis}=-1 cannot fill {device_count} devices because the "
                    f"other axes multiply to {fixed}, which does not divide {device_count}; "
                    f"choose sizes whose product divides {device_count}"
                )
            return tuple(device_count // fixed if s == -1 else s for s in self.sizes)  # type: ignore[return-value]
        if fixed != device_count:
            raise ValueError(
                f"mesh {self} covers {' x '.join(map(str, self.sizes))} = {fixed} devices, but "
                f"{device_count} devices are available; {_suggest_fix(self, device_count)}"
            )
        return self.sizes


def _suggest_fix(cfg: MeshConfig, device_count: int) -> str:
    """A human-readable fix for a mesh whose product does not match the device count."""
    for name in ("fsdp", "data", "tensor"):
        others = math.prod(s for n, s in zip(MESH_AXES, cfg.sizes) if n != name)
        if device_count % others == 0:
            fixed = dataclasses.replace(cfg, **{name: -1})
            return f"e.g. set {name}=-1 to fill the rest: --mesh={fixed}"
    return f"choose sizes whose product is {device_count}, e.g. --mesh=data=1,fsdp={device_count},tensor=1"


def parse_mesh(spec: str) -> MeshConfig:
    """Parses a mesh specification such as ``"fsdp=12"`` or ``"data=2,fsdp=4,tensor=1"``.

    Axes not named keep the :class:`MeshConfig` defaults (``data=1, fsdp=-1, tensor=1``); an empty
    string gives the defaults.

    Args:
        spec: comma-separated ``axis=size`` pairs; axes are ``data``, ``fsdp``, ``tensor``.

    Returns:
        The parsed, validated :class:`MeshConfig`.

    Raises:
        ValueError: naming the part of ``spec`` that is wrong and the accepted form.
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(
                f"mesh spec {spec!r}: part {part!r} is not of the form axis=size "
                f"(axes: {', '.join(MESH_AXES)}; e.g. 'data=2,fsdp=-1,tensor=1')"
            )
        if key not in MESH_AXES:
            raise ValueError(
                f"mesh spec {spec!r}: unknown axis {key!r} in {part!r}; axes are "
                f"{', '.join(MESH_AXES)}"
            )
        if key in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {key!r} is given twice")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ValueError(
                f"mesh spec {spec!r}: size {value!r} of axis {key!r} is not an integer "
                "(use a positive integer, or -1 for 'all remaining devices')"
            ) from None
    try:
        return MeshConfig(**sizes)
    except ValueError as err:
        raise ValueError(f"mesh spec {spec!r}: {err}") from None


def make_mesh(
    cfg: MeshConfig, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds the ``("data", "fsdp", "tensor")`` device mesh.

    Uses ``mesh_utils.create_device_mesh`` (topology-aware on TPU; on other platforms a reshape of
    the device list, which jax orders process by process, so ``tensor`` groups stay within a
    process when the tensor size divides the local device count). Falls back to a plain reshape
    when the topology-aware layout cannot be built.

    Args:
        cfg: the axis sizes; one may be -1.
        devices: the devices to lay out; defaults to ``jax.devices()`` (every process's devices).

    Returns:
        A ``jax.sharding.Mesh`` with axis names :data:`MESH_AXES`.

    Raises:
        ValueError: the sizes do not match the number of devices (message gives a fix).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # Topology-aware layout can fail for shapes that split physical axes; a reshape of the
        # ordered device list is always valid, only possibly slower.
        logging.warning("create_device_mesh(%s) failed (%s); using a reshape of the device list",
                        shape, err)
        grid = np.asarray(devices, dtype=object).reshape(shape)
    _warn_if_tensor_crosses_processes(grid)
    return jax.sharding.Mesh(grid, MESH_AXES)


def _warn_if_tensor_crosses_processes(grid: np.ndarray) -> None:
    """Logs a warning when a tensor-parallel group spans processes (slow inter-node links)."""
    groups = grid.reshape(-1, grid.shape[-1])
    if any(len({d.process_index for d in group}) > 1 for group in groups):
        logging.warning(
            "tensor axis of size %d spans several processes; tensor parallelism across nodes is "
            "slow, prefer a tensor size that divides the devices per process", grid.shape[-1])


# --------------------------------------------------------------------------- launcher detection


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process job (arguments of ``jax.distributed.initialize``).

    Fields left ``None`` are filled from the launcher's environment by :func:`initialize`.

    Attributes:
        coordinator_address: ``host:port`` of process 0's coordination service.
        num_processes: total number of processes in the job.
        process_id: this process's rank, ``0 <= process_id < num_processes``.
        local_device_ids: the local devices this process uses; ``None`` means all visible devices
            (on XPU, select tiles with ``ZE_AFFINITY_MASK`` instead).
        initialization_timeout_s: seconds to wait for every process to connect.
        heartbeat_timeout_s: seconds without a heartbeat after which the coordination service
            declares a process dead and every other process aborts with that error instead of
            waiting forever in a collective (jax's default: 10 missed heartbeats of 10 s).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def __post_init__(self) -> None:
        if self.coordinator_address is not None:
            _check_address(self.coordinator_address, "coordinator_address")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be at least 1")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"process_id={self.process_id} must be non-negative")
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes):
            raise ValueError(
                f"process_id={self.process_id} must be smaller than "
                f"num_processes={self.num_processes} (ranks count from 0)")
        if self.initialization_timeout_s <= 0:
            raise ValueError(
                f"initialization_timeout_s={self.initialization_timeout_s} must be positive")
        if self.heartbeat_timeout_s < 10:
            raise ValueError(f"heartbeat_timeout_s={self.heartbeat_timeout_s} must be at least "
                             "10 (10 heartbeats of at least 1 s)")

    @property
    def complete(self) -> bool:
        """Whether coordinator, process count and process id are all known."""
        return None not in (self.coordinator_address, self.num_processes, self.process_id)


def _check_address(address: str, source: str) -> None:
    """Raises ValueError unless ``address`` looks like ``host:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{source}={address!r} is not of the form host:port (e.g. 10.0.0.1:29500)")


@dataclasses.dataclass(frozen=True)
class _LauncherRanks:
    """Rank and world size as a launcher reported them."""

    launcher: str
    rank: int
    size: int
    rank_var: str
    size_var: str


# Launchers in order of precedence: the most specific first. Under Slurm or PBS an mpiexec inside
# the allocation sets its own variables next to the allocation's, and those describe this step.
# Each entry: (name, rank variables, size variables); the first variable present wins.
_LAUNCHERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # Cray PALS (Aurora's mpiexec) sets PALS_RANKID / PALS_LOCAL_RANKID and the PMI world size.
    ("PALS", ("PALS_RANKID",), ("PMI_SIZE", "PALS_SIZE")),
    # MPICH / Intel MPI / Cray PMI (Hydra and PMI-2 launchers).
    ("PMI", ("PMI_RANK",), ("PMI_SIZE",)),
    ("Open MPI", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",)),
    # srun: SLURM_STEP_NUM_TASKS describes this step; SLURM_NTASKS the allocation.
    ("Slurm", ("SLURM_PROCID",), ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")),
)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    """Reads an integer environment variable, with an error naming it."""
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _detect_launcher(environ: Mapping[str, str]) -> _LauncherRanks | None:
    """Returns the rank and size set by the first launcher found in ``environ``, else None."""
    for name, rank_vars, size_vars in _LAUNCHERS:
        rank_var = next((v for v in rank_vars if v in environ), None)
        if rank_var is None:
            continue
        size_var = next((v for v in size_vars if v in environ), None)
        if size_var is None:
            raise ValueError(
                f"{name} launcher detected ({rank_var} is set) but the number of processes is "
                f"not: none of {', '.join(size_vars)} is set; export one, or pass "
                "num_processes explicitly")
        ranks = _LauncherRanks(name, _int_var(environ, rank_var), _int_var(environ, size_var),
                               rank_var, size_var)
        if ranks.size < 1 or not 0 <= ranks.rank < ranks.size:
            raise ValueError(
                f"{name} launcher: {rank_var}={ranks.rank} is not a rank in [0, {size_var}="
                f"{ranks.size})")
        return ranks
    return None


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``"x[001-004,9],y"`` -> ``"x001"``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    # Each bracket group expands to a list of ranges; the first host takes the first value of each.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def _job_port(job_id: str) -> int:
    """A coordinator port every process of a job derives alike, in the range 61440-65535."""
    # The leading number: PBS ids look like "4242.aurora-pbs-0001", Slurm ids are plain numbers.
    digits = re.match(r"\d*", job_id.strip()).group(0)
    return 61440 + int(digits or "0") % 4096


def _coordinator_from_env(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """Derives ``host:port`` of the coordinator from the environment.

    Order: ``JAX_COORDINATOR_ADDRESS``; ``MASTER_ADDR`` + ``MASTER_PORT``; the first host of the
    Slurm step (``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``) or of ``PBS_NODEFILE``, with
    ``MASTER_PORT`` or a port derived from the job id.

    Returns:
        ``(address or None, explanation)``: where it came from, or what is missing.
    """
    if "JAX_COORDINATOR_ADDRESS" in environ:
        address = environ["JAX_COORDINATOR_ADDRESS"]
        _check_address(address, "JAX_COORDINATOR_ADDRESS")
        return address, "JAX_COORDINATOR_ADDRESS"
    if "MASTER_ADDR" in environ:
        if "MASTER_PORT" not in environ:
            return None, "MASTER_ADDR is set but MASTER_PORT is not; export MASTER_PORT (e.g. 29500)"
        address = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        _check_address(address, "MASTER_ADDR:MASTER_PORT")
        return address, "MASTER_ADDR:MASTER_PORT"
    host, source, job_id = None, "", ""
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if environ.get(var):
            host, source, job_id = _first_slurm_host(environ[var]), var, environ.get(
                "SLURM_JOB_ID", "")
            break
    else:
        if environ.get("PBS_NODEFILE"):
            try:
                with open(environ["PBS_NODEFILE"]) as f:
                    host = next((line.strip() for line in f if line.strip()), None)
            except OSError as err:
                return None, f"PBS_NODEFILE={environ['PBS_NODEFILE']!r} cannot be read ({err})"
            source, job_id = "PBS_NODEFILE", environ.get("PBS_JOBID", "")
    if host is None:
        return None, ("no coordinator: set JAX_COORDINATOR_ADDRESS=host:port, or MASTER_ADDR and "
                      "MASTER_PORT (e.g. MASTER_ADDR=$(head -1 $PBS_NODEFILE) MASTER_PORT=29500)")
    if "MASTER_PORT" in environ:
        port, port_source = environ["MASTER_PORT"], "MASTER_PORT"
    elif job_id:
        port, port_source = str(_job_port(job_id)), "job id"
    else:
        return None, f"coordinator host {host} from {source}, but no MASTER_PORT and no job id"
    address = f"{host}:{port}"
    _check_address(address, f"{source} + {port_source}")
    return address, f"first host of {source}, port from {port_source}"


def distributed_from_env(environ: Mapping[str, str] = os.environ) -> DistributedConfig | None:
    """Detects a multi-process launch from the launcher's environment variables.

    Launchers, most specific first: PALS (``PALS_RANKID`` with ``PMI_SIZE``), PMI / MPICH /
    Intel MPI (``PMI_RANK``, ``PMI_SIZE``), Open MPI (``OMPI_COMM_WORLD_RANK`` / ``_SIZE``),
    Slurm (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS``). The coordinator comes
    from ``JAX_COORDINATOR_ADDRESS``, ``MASTER_ADDR``/``MASTER_PORT``, or the first host of the
    Slurm node list or ``PBS_NODEFILE`` (port: ``MASTER_PORT`` or derived from the job id).

    Args:
        environ: the environment to read (pure: nothing else is consulted except the file named by
            ``PBS_NODEFILE``).

    Returns:
        The configuration, or None when no launcher is found or it started a single process.

    Raises:
        ValueError: a launcher started several processes but the coordinator (or the size) cannot
            be derived; the message says which variable to set.
    """
    ranks = _detect_launcher(environ)
    if ranks is None or ranks.size == 1:
        return None
    address, how = _coordinator_from_env(environ)
    if address is None:
        raise ValueError(
            f"{ranks.launcher} launcher detected ({ranks.rank_var}={ranks.rank}, "
            f"{ranks.size_var}={ranks.size}) but the coordinator address cannot be derived: {how}")
    logging.info("%s launcher: process %d of %d, coordinator %s (%s)",
                 ranks.launcher, ranks.rank, ranks.size, address, how)
    return DistributedConfig(coordinator_address=address, num_processes=ranks.size,
                             process_id=ranks.rank)


# Devices (ranks) per host when NGPU_PER_HOST is unset: the 12 tiles of an Aurora node.
DEFAULT_DEVICES_PER_HOST = 12


def target_world_size(environ: Mapping[str, str], explicit: int | None,
                      device_count: int) -> tuple[int, int | None, str]:
    """The world size (devices, = Megatron's ranks) of the job a dry run plans, and its source.

    A login node has one CPU device; the job it plans has the world size its launcher will see.
    Order: an explicit ``--world_size``; ``NGPUS``; ``NHOSTS`` x ``NGPU_PER_HOST``; the hosts of
    ``PBS_NODEFILE`` x ``NGPU_PER_HOST`` (ezpz's ``ezpz_setup_job``, which Megatron-DeepSpeed's
    ALCF launcher sources, counts them so); else this machine's devices.
    ``NGPU_PER_HOST`` defaults to 12 (an Aurora node).

    Returns:
        (world size, hosts or None when unknown, a sentence naming the source).

    Raises:
        ValueError: a malformed variable or an unreadable PBS_NODEFILE (names it and the fix).
    """
    def number(name: str) -> int | None:
        value = environ.get(name, "").strip()
        if not value:
            return None
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"environment variable {name}={value!r} is not a positive integer; "
                             "unset it or give a whole number")
        return int(value)

    per_host = number("NGPU_PER_HOST")
    per_host_text = (f"NGPU_PER_HOST={per_host}" if per_host else
                     f"{DEFAULT_DEVICES_PER_HOST} per host (NGPU_PER_HOST unset: an Aurora node)")
    per_host = per_host or DEFAULT_DEVICES_PER_HOST
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"--world_size={explicit} must be a positive integer")
        return explicit, None, f"--world_size={explicit}"
    if number("NGPUS"):
        return number("NGPUS"), None, f"NGPUS={number('NGPUS')}"
    hosts = number("NHOSTS")
    if hosts:
        return hosts * per_host, hosts, f"NHOSTS={hosts} x {per_host_text}"
    if environ.get("PBS_NODEFILE"):
        path = environ["PBS_NODEFILE"]
        try:
            with open(path) as f:
                hosts = len({line.strip() for line in f if line.strip()})
        except OSError as err:
            raise ValueError(f"PBS_NODEFILE={path!r} cannot be read ({err}); unset it or give "
                             "--world_size") from None
        if hosts:
            return hosts * per_host, hosts, f"PBS_NODEFILE ({hosts} hosts) x {per_host_text}"
    return device_count, None, (f"the {device_count} device(s) of this machine (set NGPUS, NHOSTS "
                                "or PBS_NODEFILE, or give --world_size, to plan another job)")


def _complete_distributed(
    explicit: DistributedConfig | None, environ: Mapping[str, str]
) -> DistributedConfig | None:
    """Fills the fields an explicit config leaves unset from the launcher's environment.

    Returns:
        A complete config, or None for a single-process run.

    Raises:
        ValueError: naming the field that is still unknown and how to set it.
    """
    if explicit is None:
        return distributed_from_env(environ)
    cfg = explicit
    if not cfg.complete:
        needs_ranks = cfg.num_processes is None or cfg.process_id is None
        ranks = _detect_launcher(environ) if needs_ranks else None
        updates: dict[str, object] = {}
        if cfg.num_processes is None and ranks is not None:
            updates["num_processes"] = ranks.size
        if cfg.process_id is None and ranks is not None:
            updates["process_id"] = ranks.rank
        if cfg.coordinator_address is None:
            address, how = _coordinator_from_env(environ)
            if address is None and (cfg.num_processes or updates.get("num_processes", 1)) > 1:
                raise ValueError(f"distributed start-up: coordinator_address is not given and {how}")
            updates["coordinator_address"] = address
        cfg = dataclasses.replace(cfg, **updates)  # type: ignore[arg-type]
    if cfg.num_processes in (None, 1):
        if cfg.num_processes is None and cfg.coordinator_address is not None:
            raise ValueError(
                "distributed start-up: coordinator_address is given but num_processes is not and "
                "no launcher (PALS, PMI, Open MPI, Slurm) was detected; pass num_processes and "
                "process_id")
        return None
    if cfg.process_id is None:
        raise ValueError(
            f"distributed start-up: num_processes={cfg.num_processes} but process_id is not given "
            "and no launcher (PALS, PMI, Open MPI, Slurm) was detected; pass process_id")
    return cfg


# --------------------------------------------------------------------------- the runtime


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
        default_attention: the attention implementation to use by default: ``"pallas"`` on CUDA,
            ``"blockwise"`` on XPU, ``"xla"`` elsewhere.
        supports_donation: whether ``donate_argnums`` really frees the donated buffers.
        supports_host_callbacks: whether ``jax.debug.print`` / ``pure_callback`` / ``io_callback``
            may be used inside jit.
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
    default_attention: str
    supports_donation: bool
    supports_host_callbacks: bool
    device_kind: str = ""
    jax_platform: str = ""

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

# jax's backend names -> ours. Intel's plugins register "sycl" (the extension) and "oneapi" (the
# upstream plugin); agpt_jax/xpu.py has what each wheel registers.
_PLATFORM_NAMES = {"cpu": "cpu", "sycl": "xpu", "oneapi": "xpu", "cuda": "gpu", "rocm": "gpu",
                   "gpu": "gpu", "tpu": "tpu"}

_runtime: Runtime | None = None


def _backends_started() -> bool:
    from jax._src import xla_bridge  # runtime.py is the one place allowed jax._src
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


# XLA flags for the CPU client, added to XLA_FLAGS before jax's backends start unless the user
# already set the same flag. At jax 0.5.0 the default "thunk" runtime runs bf16 matmuls through
# Eigen at 172 GFLOP/s on the 2-core reference machine; the previous runtime rewrites them to
# oneDNN calls at 563 GFLOP/s, and bench_125m's bf16 train step runs twice as fast
# (benchmarks/train_step.py, BENCHMARKS.md). The flags only concern the CPU client, so they are
# harmless next to an accelerator. Single-process runs only: under that runtime a failed gloo
# collective is a fatal check in XLA (cpu_runtime.cc aborts the process) where the default runtime
# raises an error the driver reports, so multi-process CPU jobs keep the default runtime.
# From jax 0.6 XLA no longer has that runtime (jax 0.11 logs '"xla_cpu_use_thunk_runtime" is no
# longer supported'), so compat.CPU_XLA_FLAGS is empty there.
CPU_XLA_FLAGS: tuple[str, ...] = compat.CPU_XLA_FLAGS


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


def _default_attention(platform: str, jax_platform: str) -> str:
    """Pallas flash attention needs Triton on CUDA; XPU has no Pallas lowering at jax 0.5.0."""
    if platform == "gpu" and jax_platform == "cuda":
        return "pallas"
    if platform == "xpu":
        return "blockwise"
    return "xla"


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
    plugin = xpu.for_jax_platform(jax_platform, _platform_version())
    # jax 0.11 may report the oneapi backend as "gpu" (an alias); the plugin decides, not the name.
    ours = "xpu" if plugin is not None else _PLATFORM_NAMES.get(jax_platform, jax_platform)
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

    local = jax.local_devices()
    _runtime = Runtime(
        platform=ours,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=len(local),
        device_count=jax.device_count(),
        workarounds=tuple(workarounds),
        default_attention=_default_attention(ours, jax_platform),
        supports_donation=supports_donation,
        supports_host_callbacks=supports_callbacks,
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


# --------------------------------------------------------------------------- environment check


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


def check_report(rt: Runtime) -> dict[str, object]:
    """The ``--check`` report as a JSON-serialisable dict (``"ok"``: every check passed)."""
    checks = run_checks(rt)
    plugins = xpu.installed()
    return {
        "stack": compat.STACK,
        "xpu_plugins": [f"{p.name} {xpu.version(p.name)} ({p.stack})" for p in plugins],
        "xpu_install": None if plugins else xpu.missing_message(compat.STACK),
        "versions": package_versions(),
        "runtime": dataclasses.asdict(rt),
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


# Exit codes of the command lines: 1 a failure while running (a failed check), 2 bad input.
EXIT_FAILED, EXIT_USAGE = 1, 2


def parse_flags_exit_usage(argv: Sequence[str]) -> list[str]:
    """absl flag parsing for ``app.run(..., flags_parser=parse_flags_exit_usage)``.

    A bad flag (unknown, or an illegal value) prints one line and exits EXIT_USAGE (2), as
    argparse does; absl's own parser exits 1, which the command lines keep for failures.
    """
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as err:
        print(f"error: {' '.join(str(err).split())}; see --helpfull for the flags",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)


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


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_bool("check", False, "Run the environment check.")
    flags.DEFINE_bool("json", False, "Print the report as one JSON object per process.")
    flags.DEFINE_enum("platform", "auto", list(PLATFORMS), "Platform to start.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's rank (multi-process).")
    flags.DEFINE_integer("cpu_devices", None, "Number of simulated CPU devices.")
    app.run(lambda argv: sys.exit(_main(argv)), flags_parser=parse_flags_exit_usage)
