"""Where the two supported stacks differ, decided once at import.

agpt-jax runs from one code base on two pinned stacks (README, "Two stacks"):

- Python 3.11 + jax 0.5.0 (flax 0.10, orbax-checkpoint 0.11): what intel-extension-for-openxla
  0.7.0 supports (``constraints.txt``);
- Python 3.12 + jax 0.11 (flax 0.12, orbax-checkpoint 0.12): what Intel's upstream
  jax-oneapi-plugin supports (``constraints-jax011.txt``).

Each name below is bound to the API the installed jax offers; the rest of the code imports it from
here and never tests a version. Private jax modules are touched only in :mod:`agpt_jax.runtime`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental.pallas import triton as _pallas_triton

#: jax's version as a tuple of ints.
JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

#: The stack that is running, for messages: "Python 3.11 + jax 0.5.0".
STACK: str = f"Python {sys.version_info.major}.{sys.version_info.minor} + jax {jax.__version__}"

#: XLA flags for the CPU client (agpt_jax.runtime.apply_cpu_xla_flags). At jax 0.5.0 the older
#: (non-thunk) CPU runtime puts bf16 matmuls on oneDNN, 3x faster on the reference machine
#: (BENCHMARKS.md). XLA of jax 0.11 has only the thunk runtime and ignores the flag with a
#: warning ("xla_cpu_use_thunk_runtime" is no longer supported), so nothing is added there.
CPU_XLA_FLAGS: tuple[str, ...] = (
    ("--xla_cpu_use_thunk_runtime=false",) if JAX_VERSION < (0, 6) else ())

# shard_map moved to the top level in jax 0.6 (jax.experimental.shard_map is deprecated from
# 0.8); its replication check was renamed check_rep -> check_vma.
if hasattr(jax, "shard_map"):
    def shard_map(f: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any,
                  check: bool = True) -> Callable:
        """``jax.shard_map(f, mesh=..., in_specs=..., out_specs=..., check_vma=check)``."""
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=check)
else:  # jax 0.5
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def shard_map(f: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any,
                  check: bool = True) -> Callable:
        """``jax.experimental.shard_map.shard_map(f, mesh, in_specs, out_specs, check_rep=check)``."""
        return _experimental_shard_map(f, mesh, in_specs, out_specs, check_rep=check)


# Pallas' Triton compiler parameters: TritonCompilerParams at jax 0.5, CompilerParams from 0.7.
TritonCompilerParams: type = getattr(_pallas_triton, "CompilerParams", None) or getattr(
    _pallas_triton, "TritonCompilerParams")

#: Whether ``jax.distributed.initialize`` takes ``heartbeat_timeout_seconds`` (jax >= 0.6); at
#: jax 0.5.0 the heartbeat is only reachable through jax's private ``global_state``.
DISTRIBUTED_HEARTBEAT_IS_PUBLIC: bool = (
    "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters)


#: Whether the CPU client can create one collective communicator twice. At jax 0.5.0 XLA creates
#: a communicator (a gloo context) lazily, outside its lock, on the first collective of a device
#: group (xla/backends/cpu/collectives/cpu_cliques.cc). A second program that reaches a
#: collective on the same group before the first creation has finished creates it again, and
#: registers the same gloo key once more: "Config key cpu:gloo/... already exists", or a hang. jax
#: 0.11.2's XLA creates each communicator once (absl::call_once). agpt_jax.runtime creates the
#: communicators at start-up where this is true.
CPU_COMMUNICATORS_CAN_BE_CREATED_TWICE: bool = JAX_VERSION < (0, 11)


def _version_tuple(distribution: str) -> tuple[int, ...]:
    import importlib.metadata

    return tuple(int(p) for p in importlib.metadata.version(distribution).split(".")[:3]
                 if p.isdigit())


#: Keys Orbax's PyTreeCheckpointHandler writes into an item's ``_METADATA`` beyond the tree
#: (agpt_jax.checkpoint's streaming writer writes the same file): orbax-checkpoint 0.12
#: records ``"use_ocdbt": true``, 0.11.23 does not.
ORBAX_ITEM_METADATA_EXTRA: dict[str, Any] = (
    {"use_ocdbt": True} if _version_tuple("orbax-checkpoint") >= (0, 12) else {})


def quiet_known_unraisables(default: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that drops two known, harmless reports and passes the rest on.

    Both come from orbax-checkpoint 0.12 on Python 3.12, after an error that the run has already
    reported in one line; Python would print each with a traceback:

    - a background checkpoint write that fails (a full disk) can leave a callback that posts to
      the write's asyncio loop after that loop closed: "RuntimeError: Event loop is closed";
    - a restore that fails on one array (a damaged step, which the run skips) abandons its other
      reads, and each read coroutine raises again while it is being closed: an exception caused
      by ``GeneratorExit`` in a coroutine (about 400 lines for the smoke model).

    Nothing can receive either any more. The hook drops exactly those (logged at debug level);
    every other report goes to ``default``.
    """
    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        abandoned = inspect.iscoroutine(unraisable.object) and isinstance(
            exc.__cause__ or exc.__context__, GeneratorExit)
        if closed_loop or abandoned:
            from absl import logging

            logging.debug("ignored %s (%s)", "a callback to a closed event loop" if closed_loop
                          else "an abandoned read's error", unraisable.object)
            return
        default(unraisable)
    return hook
