"""Tests of agpt_jax.runtime: mesh construction, launcher detection, multi-process start-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from agpt_jax import runtime
from agpt_jax.runtime import MeshConfig, make_mesh, parse_mesh


# --------------------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (MeshConfig(data=8, fsdp=1, tensor=1), (8, 1, 1)),
        (MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(), (1, 8, 1)),
        (MeshConfig(data=2, fsdp=1, tensor=-1), (2, 1, 4)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    ],
)
def test_make_mesh_shapes_cover_every_device_once(cfg, shape):
    devices = jax.devices()
    assert len(devices) == 8, "conftest should give 8 simulated CPU devices"
    mesh = make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == shape
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    # tensor innermost: each tensor group is a run of neighbouring devices in jax's order.
    order = {d.id: i for i, d in enumerate(devices)}
    for group in mesh.devices.reshape(-1, shape[-1]):
        positions = [order[d.id] for d in group]
        assert positions == list(range(positions[0], positions[0] + len(positions)))


def test_make_mesh_on_a_subset_of_devices():
    devices = jax.devices()[:4]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices)
    assert mesh.devices.shape == (1, 2, 2)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


def test_make_mesh_shards_an_array_along_named_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    y = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    assert {s.data.shape for s in y.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(y), x)


def test_make_mesh_mismatch_names_sizes_count_and_fix():
    with pytest.raises(ValueError) as err:
        make_mesh(MeshConfig(data=2, fsdp=3, tensor=1))
    msg = str(err.value)
    assert "2 x 3 x 1 = 6" in msg and "8 devices" in msg
    # The suggested fix must itself work.
    fix = msg.split("--mesh=")[1].split()[0]
    assert make_mesh(parse_mesh(fix)).devices.size == 8


def test_make_mesh_fill_that_cannot_divide():
    with pytest.raises(ValueError, match=r"fsdp=-1 cannot fill 8 devices.*multiply to 3"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fsdp=12", MeshConfig(data=1, fsdp=12, tensor=1)),
        ("data=2,fsdp=4,tensor=1", MeshConfig(2, 4, 1)),
        (" tensor = 2 , data=-1 ,fsdp=1", MeshConfig(-1, 1, 2)),
        ("data=2", MeshConfig(data=2, fsdp=-1, tensor=1)),
        ("", MeshConfig()),
    ],
)
def test_parse_mesh(spec, expected):
    assert parse_mesh(spec) == expected
    assert parse_mesh(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("fsdp:4", "'fsdp:4' is not of the form axis=size"),
        ("pipeline=2", "unknown axis 'pipeline'"),
        ("fsdp=four", "size 'four' of axis 'fsdp' is not an integer"),
        ("fsdp=2,fsdp=4", "axis 'fsdp' is given twice"),
        ("data=0", "data=0 is invalid"),
        ("data=-2", "data=-2 is invalid"),
        ("data=-1,fsdp=-1", "more than one axis set to -1"),
    ],
)
def test_parse_mesh_errors_name_the_bad_part(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_mesh(spec)
    assert fragment in str(err.value)
    assert repr(spec) in str(err.value)


def test_mesh_config_rejects_non_integers():
    with pytest.raises(ValueError, match="tensor=2.0 is invalid"):
        MeshConfig(tensor=2.0)  # type: ignore[arg-type]
    assert runtime.MESH_AXES == ("data", "fsdp", "tensor")
