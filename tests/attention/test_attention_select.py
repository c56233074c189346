"""The entry point: implementation choice per platform's capabilities, platform default, input
errors, memory, tile sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from agpt_jax import attention as attention_lib
from agpt_jax import runtime
from agpt_jax.attention import blockwise

CPU_LONG_SEQUENCE = runtime.capabilities_for("cpu").long_sequence
LONG_SEQUENCE = runtime.capabilities_for("tpu").long_sequence


@pytest.fixture(autouse=True)
def fresh_choice_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Each test starts with no choice logged and no default platform; returns the log calls."""
    calls: list[tuple] = []
    monkeypatch.setattr(attention_lib, "_logged_choices", set())
    monkeypatch.setattr(attention_lib, "_default_capabilities", None)
    monkeypatch.setattr(attention_lib.logging, "info", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize("platform, seq_len, expected", [
    ("gpu", 128, "pallas"),
    ("gpu", 4096, "pallas"),
    ("xpu", 128, "blockwise"),
    ("xpu", 4096, "blockwise"),
    ("cpu", 128, "xla"),
    ("cpu", CPU_LONG_SEQUENCE - 1, "xla"),
    ("cpu", CPU_LONG_SEQUENCE, "blockwise"),
    ("cpu", 4096, "blockwise"),
    ("tpu", 512, "xla"),
    ("tpu", LONG_SEQUENCE, "blockwise"),
    ("tpu", 8192, "blockwise"),
])
def test_auto_choice(platform: str, seq_len: int, expected: str) -> None:
    assert (CPU_LONG_SEQUENCE, LONG_SEQUENCE) == (256, 1024)  # the measured thresholds
    assert attention_lib.select("auto", platform, seq_len) == expected
    # A name and its capabilities choose alike.
    caps = runtime.capabilities_for(platform)
    assert attention_lib.select("auto", caps, seq_len) == expected


@pytest.mark.parametrize("impl", attention_lib.IMPLEMENTATIONS)
@pytest.mark.parametrize("platform", runtime.TARGET_PLATFORMS)
def test_explicit_choice_is_kept(impl: str, platform: str) -> None:
    assert attention_lib.select(impl, platform, 4096) == impl


def test_auto_choice_is_logged_once_with_its_reason(fresh_choice_log: list[tuple]) -> None:
    for _ in range(3):
        attention_lib.select("auto", "xpu", 4096)
    assert len(fresh_choice_log) == 1
    message = fresh_choice_log[0][0] % fresh_choice_log[0][1:]
    assert "blockwise" in message and "sycl" in message
    attention_lib.select("auto", "cpu", 128)
    assert len(fresh_choice_log) == 2


def test_unknown_names_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="flash.*choose one of"):
        attention_lib.select("flash", "cpu", 128)
    with pytest.raises(ValueError, match="'cuda'.*expected one of"):
        attention_lib.select("auto", "cuda", 128)
    with pytest.raises(ValueError, match="expected one of"):
        attention_lib.set_default_platform("sycl")


def _inputs(seq: int = 32, heads: int = 4, kv_heads: int = 2, head_dim: int = 16
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = jnp.ones((1, seq, heads, head_dim), jnp.float32)
    k = jnp.ones((1, seq, kv_heads, head_dim), jnp.float32)
    return q, k, k


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Replaces every implementation by a recorder of (name, keyword arguments)."""
    calls: list[tuple[str, dict]] = []
    for name in attention_lib.IMPLEMENTATIONS:
        module = getattr(attention_lib, name)

        def fake(q, k, v, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return q

        monkeypatch.setattr(module, "attention", fake)
    return calls


def test_platform_default_drives_auto_and_pallas_interpret(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    calls = _record_calls(monkeypatch)
    q, k, v = _inputs()
    attention_lib.set_default_platform("xpu")
    attention_lib.attention(q, k, v, impl="auto")
    attention_lib.attention(q, k, v, impl="pallas")
    attention_lib.attention(q, k, v, impl="auto", platform="gpu")
    attention_lib.attention(q, k, v, impl="auto", platform="cpu")
    assert calls == [("blockwise", {"causal": True, "platform": runtime.capabilities_for("xpu")}),
                     ("pallas", {"causal": True, "interpret": True}),
                     ("pallas", {"causal": True, "interpret": False}),
                     ("xla", {"causal": True})]


def test_platform_falls_back_to_the_runtime() -> None:
    """Without a default, the runtime (idempotent initialize) names the platform: cpu here."""
    assert attention_lib.default_platform() == "cpu"
    assert attention_lib.default_capabilities() is runtime.initialize().capabilities


def test_platform_default_block_restores_the_previous_default(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """plan.py traces an XPU job's model on CPU inside `platform_default("xpu")`."""
    calls = _record_calls(monkeypatch)
    q, k, v = _inputs()
    attention_lib.set_default_platform("cpu")
    with attention_lib.platform_default("xpu"):
        assert attention_lib.default_platform() == "xpu"
        attention_lib.attention(q, k, v, impl="auto")
    assert attention_lib.default_platform() == "cpu"
    with attention_lib.platform_default(None):  # None keeps the default
        assert attention_lib.default_platform() == "cpu"
    with pytest.raises(ZeroDivisionError), attention_lib.platform_default("xpu"):
        1 / 0
    assert attention_lib.default_platform() == "cpu"
    assert calls == [("blockwise", {"causal": True, "platform": runtime.capabilities_for("xpu")})]


def test_xla_needs_no_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """impl="xla" never asks for the platform, so it never starts the runtime."""
    def no_runtime(*args, **kwargs):
        raise AssertionError("the runtime was asked")

    monkeypatch.setattr(runtime, "initialize", no_runtime)
    q, k, v = _inputs()
    assert attention_lib.attention(q, k, v, impl="xla").shape == q.shape
    with pytest.raises(AssertionError, match="runtime was asked"):
        attention_lib.attention(q, k, v, impl="blockwise")


@pytest.mark.parametrize("platform, seq_len, block", [
    # The largest tile is the platform's: 256 on CPU, 512 elsewhere; rounded up to 8.
    ("xpu", 4096, 512), ("gpu", 4096, 512), ("tpu", 4096, 512), ("cpu", 4096, 256),
    ("xpu", 100, 104), ("xpu", 512, 512),
    # On CPU a sequence that would be one tile is cut into two (a oneDNN post-op 80x slower).
    ("cpu", 256, 128), ("cpu", 100, 56), ("cpu", 8, 8), ("cpu", 300, 256),
])
def test_blockwise_tiles_follow_the_capabilities(platform: str, seq_len: int, block: int) -> None:
    expected = blockwise.BlockSizes(block, block)
    assert blockwise.default_block_sizes(seq_len, platform) == expected
    assert blockwise.default_block_sizes(seq_len, runtime.capabilities_for(platform)) == expected


@pytest.mark.parametrize("impl", attention_lib.IMPLEMENTATIONS)
def test_bad_shapes_raise_clear_errors(impl: str) -> None:
    q, k, v = _inputs()
    call = lambda q, k, v: attention_lib.attention(q, k, v, impl=impl, platform="cpu")
    with pytest.raises(ValueError, match=r"multiple of kv_heads \(3\)"):
        call(q, jnp.ones((1, 32, 3, 16)), jnp.ones((1, 32, 3, 16)))
    with pytest.raises(ValueError, match="rank-4"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        call(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="batch and head_dim"):
        call(q, k[..., :8], v[..., :8])
    if impl != "xla":
        with pytest.raises(ValueError, match="equal query and key lengths"):
            call(q, k[:, :16], v[:, :16])


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_memory_is_linear_in_seq_not_quadratic(impl: str) -> None:
    """XLA's own accounting (memory_analysis temp bytes) of a compiled forward + backward at
    seq 2048: the plain reference holds several [heads, seq, seq] fp32 score matrices, the
    memory-efficient kernels less than half of one."""
    b, s, h, kvh, d = 1, 2048, 4, 2, 64
    q = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, s, kvh, d), jnp.float32)
    score_bytes = b * h * s * s * 4

    def temp_bytes(name: str) -> int:
        def loss(q, k, v):
            return jnp.sum(attention_lib.attention(q, k, v, impl=name, platform="cpu") ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") >= score_bytes
    assert temp_bytes(impl) < score_bytes // 2
