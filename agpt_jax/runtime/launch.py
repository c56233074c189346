"""Launcher detection: how this process joins a multi-process job, and the world size of a job.

One job: read the launcher's environment (Cray PALS, PMI / MPICH / Intel MPI, Open MPI, Slurm,
PBS) into a :class:`DistributedConfig` for ``jax.distributed.initialize``, and the world size a
dry run plans (:func:`target_world_size`). Everything here is pure: it reads the mapping it is
given (and the file ``PBS_NODEFILE`` names) and starts nothing; :mod:`agpt_jax.runtime.platform`
acts on the result.

Imports: the standard library and absl only. It must not import the other runtime modules
(:mod:`~agpt_jax.runtime.platform`, :mod:`~agpt_jax.runtime.check`), nor jax, agpt_jax.loop,
train, model, config or converters.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from absl import logging

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
