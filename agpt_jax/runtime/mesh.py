"""The device mesh: its axes, their sizes (``--mesh``) and the ``jax.sharding.Mesh`` of them.

One job: turn a mesh specification such as ``"data=2,fsdp=-1,tensor=1"`` into a validated
:class:`MeshConfig` and lay the devices out as a mesh.

Mesh axes are ``data`` (pure data parallelism: replicated params), ``fsdp`` (data parallelism with
params and optimizer state sharded) and ``tensor`` (tensor parallelism, innermost so that it stays
within a node).

Imports: jax, numpy and absl only. It must not import the other runtime modules
(:mod:`~agpt_jax.runtime.platform`, :mod:`~agpt_jax.runtime.check`), nor agpt_jax.loop, train,
model, config or converters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils

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
