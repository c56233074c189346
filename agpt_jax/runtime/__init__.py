"""The runtime: platform choice, multi-process start-up, the device mesh and ``--check``.

The one package that reads the backend, the device platform or the Intel XPU plugin, sets flags
that must precede the backend's start, and calls ``jax.distributed.initialize``. Everything else
asks the :class:`Runtime` that :func:`initialize` returns (DESIGN.md, "One place for platform"),
and what a platform can do is its :class:`Capabilities` (``Runtime.capabilities``, or
:func:`capabilities_for` for a named target without starting jax): no module outside this package
compares platform names. It is also the only package with ``jax._src`` imports (all in
:mod:`agpt_jax.runtime.platform`): the work-arounds for the Intel plugin's ``sycl`` platform at
jax 0.5.0 (spec/jax-stack.md section 3) live there and nowhere else.

Modules, one job each (a module imports only those above it in this list):

- :mod:`agpt_jax.runtime.mesh`: the ``data`` / ``fsdp`` / ``tensor`` mesh (:class:`MeshConfig`,
  :func:`parse_mesh`, :func:`make_mesh`);
- :mod:`agpt_jax.runtime.launch`: launcher detection (:class:`DistributedConfig`,
  :func:`distributed_from_env`, :func:`target_world_size`);
- :mod:`agpt_jax.runtime.capabilities`: the platform table (:class:`Capabilities`,
  :func:`capabilities_for`, :data:`TARGET_PLATFORMS`) and jax's backend names
  (:func:`platform_of_backend`, :func:`plugin_for_backend`);
- :mod:`agpt_jax.runtime.platform`: :class:`Runtime`, :func:`initialize` and the platform
  work-arounds (:func:`apply_cpu_xla_flags`, ...);
- :mod:`agpt_jax.runtime.check`: the environment check.

This module re-exports their names, so ``from agpt_jax import runtime; runtime.initialize()``
and ``from agpt_jax.runtime import MeshConfig`` keep working. ``runtime._runtime`` (None until
:func:`initialize` returns) is the live state of :mod:`agpt_jax.runtime.platform`, read and
written through this module (see :class:`_RuntimePackage`). To monkeypatch a function for the
code that calls it, patch the module that holds it (e.g. ``agpt_jax.runtime.platform``).

Run ``python -m agpt_jax.runtime --check`` first on a new node: it prints versions, platform,
devices and work-arounds, runs an all-reduce across every device and exits 1 if anything fails.

Nothing in this package imports agpt_jax.loop, train, model, config or converters.
"""

from __future__ import annotations

import sys
import types

from agpt_jax.runtime import platform as _platform
from agpt_jax.runtime.capabilities import (
    TARGET_PLATFORMS,
    Capabilities,
    capabilities_for,
    platform_of_backend,
    plugin_for_backend,
)
from agpt_jax.runtime.check import (
    CheckResult,
    attention_probe_hlo,
    check_all_reduce,
    check_fused_attention,
    check_report,
    format_report,
    fused_attention_targets,
    package_versions,
    run_checks,
)
from agpt_jax.runtime.launch import (
    DEFAULT_DEVICES_PER_HOST,
    DistributedConfig,
    _complete_distributed,  # noqa: F401  (private; tests/test_runtime.py calls it)
    distributed_from_env,
    target_world_size,
)
from agpt_jax.runtime.mesh import MESH_AXES, MeshConfig, make_mesh, parse_mesh
from agpt_jax.runtime.platform import (
    CPU_XLA_FLAGS,
    PLATFORMS,
    Runtime,
    _enable_sycl_donation,  # noqa: F401  (private; tests/test_runtime.py calls it)
    apply_cpu_xla_flags,
    current_runtime,
    initialize,
)

__all__ = [
    "CPU_XLA_FLAGS", "DEFAULT_DEVICES_PER_HOST", "MESH_AXES",
    "PLATFORMS", "TARGET_PLATFORMS", "Capabilities", "CheckResult", "DistributedConfig",
    "MeshConfig", "Runtime", "apply_cpu_xla_flags", "attention_probe_hlo", "capabilities_for",
    "check_all_reduce", "check_fused_attention", "check_report", "current_runtime",
    "distributed_from_env", "format_report", "fused_attention_targets", "initialize", "make_mesh",
    "package_versions", "parse_mesh", "platform_of_backend",
    "plugin_for_backend", "run_checks", "target_world_size",
]


class _RuntimePackage(types.ModuleType):
    """The type of this module: ``_runtime`` is a property over ``platform._runtime``.

    The state lives in one place, :mod:`agpt_jax.runtime.platform`, which :func:`initialize`
    sets. A plain re-export would copy its value (None) once, at import; a module ``__getattr__``
    (PEP 562) would serve reads but let an assignment (``monkeypatch.setattr(runtime,
    "_runtime", ...)``) shadow the state unseen by ``initialize``. A property on the module's type
    serves both: reads see the live runtime, writes reach ``platform._runtime``.
    """

    @property
    def _runtime(self) -> Runtime | None:
        return _platform._runtime

    @_runtime.setter
    def _runtime(self, value: Runtime | None) -> None:
        _platform._runtime = value


sys.modules[__name__].__class__ = _RuntimePackage
