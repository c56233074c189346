"""Every implementation under the transformations the model uses: jit, grad, lax.scan over layers
with remat, and a sharded 8-device mesh (batch over data x fsdp, heads over tensor)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agpt_jax import attention as attention_lib

# fp32 everywhere; the implementations reorder sums (see test_attention_numerics.py).
RTOL = 5e-5


def relative_error(actual: jax.Array, expected: jax.Array) -> float:
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def layer_stack_loss(params: dict[str, jax.Array], x: jax.Array, impl: str) -> jax.Array:
    """A scanned, rematerialised stack of attention layers: x [b, s, embed] -> scalar.

    params: wq [layers, embed, heads, d], wk / wv [layers, embed, kv_heads, d],
    wo [layers, heads, d, embed], fp32.
    """

    @jax.checkpoint
    def layer(h: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        q = jnp.einsum("bse,ehd->bshd", h, p["wq"])
        k = jnp.einsum("bse,ehd->bshd", h, p["wk"])
        v = jnp.einsum("bse,ehd->bshd", h, p["wv"])
        out = attention_lib.attention(q, k, v, causal=True, impl=impl, platform="cpu")
        return h + jnp.einsum("bshd,hde->bse", out, p["wo"]), None

    h, _ = jax.lax.scan(layer, x, params)
    return jnp.mean(jnp.square(h))


def make_params(layers: int, embed: int, heads: int, kv_heads: int, head_dim: int
                ) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    scale = embed ** -0.5
    return {
        "wq": jax.random.normal(keys[0], (layers, embed, heads, head_dim)) * scale,
        "wk": jax.random.normal(keys[1], (layers, embed, kv_heads, head_dim)) * scale,
        "wv": jax.random.normal(keys[2], (layers, embed, kv_heads, head_dim)) * scale,
        "wo": jax.random.normal(keys[3], (layers, heads, head_dim, embed)) * scale,
    }


@functools.cache
def xla_loss_and_grads() -> tuple[float, dict[str, np.ndarray]]:
    params, x = _stack_inputs()
    loss, grads = jax.jit(jax.value_and_grad(layer_stack_loss), static_argnums=2)(params, x, "xla")
    return float(loss), jax.tree.map(np.asarray, grads)


def _stack_inputs() -> tuple[dict[str, jax.Array], jax.Array]:
    # seq 40: neither implementation's tile divides it, so padding is inside the scan too.
    params = make_params(layers=2, embed=32, heads=4, kv_heads=2, head_dim=16)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 32))
    return params, x


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_scan_remat_grad_matches_xla(impl: str) -> None:
    params, x = _stack_inputs()
    loss, grads = jax.jit(jax.value_and_grad(layer_stack_loss), static_argnums=2)(params, x, impl)
    ref_loss, ref_grads = xla_loss_and_grads()
    assert abs(float(loss) - ref_loss) <= RTOL * abs(ref_loss)
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) <= RTOL, name


def make_mesh() -> Mesh:
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    return Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("impl", attention_lib.IMPLEMENTATIONS)
def test_jit_on_a_sharded_mesh(impl: str) -> None:
    """Batch over (data, fsdp), heads and kv heads over tensor; out and grads keep the sharding
    and equal the unsharded reference."""
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    mesh = make_mesh()
    spec = P(("data", "fsdp"), None, "tensor", None)
    sharding = NamedSharding(mesh, spec)
    b, s, h, kvh, d = 4, 48, 8, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(keys[0], (b, s, h, d))
    k = jax.random.normal(keys[1], (b, s, kvh, d))
    v = jax.random.normal(keys[2], (b, s, kvh, d))
    dout = jax.random.normal(keys[3], (b, s, h, d))

    def value_and_grads(q, k, v, dout, impl_name):
        def fn(q, k, v):
            out = attention_lib.attention(q, k, v, impl=impl_name, platform="cpu")
            return jax.lax.with_sharding_constraint(out, sharding)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))

    sharded = jax.jit(functools.partial(value_and_grads, impl_name=impl),
                      in_shardings=(sharding,) * 4, out_shardings=(sharding,) * 4)
    with mesh:
        results = sharded(*(jax.device_put(x, sharding) for x in (q, k, v, dout)))
    expected = jax.jit(functools.partial(value_and_grads, impl_name="xla"))(q, k, v, dout)
    for name, actual, ref in zip(("out", "dq", "dk", "dv"), results, expected):
        assert actual.sharding.is_equivalent_to(sharding, actual.ndim), name
        assert relative_error(actual, ref) <= RTOL, name
