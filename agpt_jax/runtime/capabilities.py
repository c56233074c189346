"""What each platform can do: one :class:`Capabilities` per platform, the one table of them.

One job: turn a platform's name into what the rest of the code needs to know about it (which
attention implementation to use and its tile sizes, the peak FLOP/s for MFU, whether an
asynchronous save must copy first, the XLA flags, donation, host callbacks). Code outside
:mod:`agpt_jax.runtime` asks a :class:`Capabilities` and never compares platform names.

Two ways to get one:

- ``Runtime.capabilities`` (``agpt_jax.runtime.initialize()``): the running platform's, resolved
  once at start-up from jax's backend and the Intel plugin behind it (:func:`for_backend`);
- :func:`capabilities_for` (``runtime.capabilities_for("xpu")``): a named target's, without
  starting jax, for code that runs before or without :func:`~agpt_jax.runtime.initialize`
  (tests that call attention directly, benchmarks, planning an XPU job on a CPU machine).

It also maps jax's backend names to ours (:func:`platform_of_backend`, :func:`plugin_for_backend`).

Imports: agpt_jax.compat and agpt_jax.xpu only; it never starts a jax backend. It must not import
the other runtime modules, nor agpt_jax.loop, train, model, config or converters.
"""

from __future__ import annotations

import dataclasses

from agpt_jax import compat, xpu


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the code may rely on for one platform (frozen; hashable).

    Attributes:
        platform: ``"cpu" | "gpu" | "xpu" | "tpu"`` (``Runtime.platform``); for messages only:
            nothing outside the runtime compares it.
        accelerator: the devices are accelerators, not the host's CPU (benchmarks print rates
            in tera units there).
        default_attention: the implementation reported as the platform's default
            (``Runtime.default_attention``, ``--check``): ``"pallas"`` on CUDA, ``"blockwise"``
            on XPU, ``"xla"`` elsewhere.
        auto_attention: what ``impl="auto"`` picks for sequences shorter than ``long_sequence``.
        auto_attention_long: what ``impl="auto"`` picks from ``long_sequence`` on.
        long_sequence: the length from which ``auto_attention_long`` applies (0: always).
        auto_attention_reason: why, when the choice does not depend on the length ("" when it
            does: the log line then names the length and the threshold).
        blockwise_block: the largest tile (query and key positions) of the blockwise attention.
        blockwise_split_single_block: cut a sequence that fits one blockwise tile into two.
        pallas_interpret: the Pallas kernels run in interpret mode (True everywhere but where
            Triton compiles them).
        peak_tflops_per_device: peak dense bf16 TFLOP/s of one jax device, the MFU denominator
            (0: unknown, the MFU is reported as 0 unless configured).
        copy_before_async_save: an asynchronous checkpoint must copy the arrays on device first
            (``RunCheckpointer(copy_before_async_save=...)``).
        copy_restored_before_donating: copy the arrays Orbax restores into buffers of the run's
            own, one at a time, before donating them into the TrainState (agpt_jax.start). On
            the CPU client a resume that donated the restored arrays directly ended in NaN losses
            and a segfault (once, in the full test suite under load); copies that nothing else
            holds are safe to donate, and the one-leaf-at-a-time copy keeps the peak near one
            state.
        xla_flags: flags for ``XLA_FLAGS`` that this platform's client wants before jax's
            backends start (``apply_cpu_xla_flags`` adds the CPU client's).
        supports_donation: ``donate_argnums`` really frees the donated buffers.
        supports_host_callbacks: ``jax.debug.print`` / ``pure_callback`` / ``io_callback`` may be
            used inside jit.
    """

    platform: str
    accelerator: bool
    default_attention: str
    auto_attention: str
    auto_attention_long: str
    long_sequence: int
    auto_attention_reason: str
    blockwise_block: int
    blockwise_split_single_block: bool
    pallas_interpret: bool
    peak_tflops_per_device: float
    copy_before_async_save: bool
    copy_restored_before_donating: bool
    xla_flags: tuple[str, ...]
    supports_donation: bool
    supports_host_callbacks: bool


#: The platforms :func:`capabilities_for` knows (``Runtime.platform`` takes one of these).
TARGET_PLATFORMS: tuple[str, ...] = ("cpu", "gpu", "xpu", "tpu")

# Attention "auto": from these sequence lengths on, avoid the materialised [seq, seq] scores: 256
# on CPU, 1024 on TPU. Measured on CPU with benchmarks/attention.py (8 / 2 heads, head_dim 128,
# fp32, fwd + bwd, BENCHMARKS.md): blockwise takes 1.17x xla's time at 128, 0.68x at 256, 0.44x at
# 512, 0.21x at 1024 and 0.23x at 2048, with 0.94x to 0.076x of its temporary memory.
CPU_LONG_SEQUENCE = 256
LONG_SEQUENCE = 1024

# Largest blockwise tile: 512 on accelerators, where fewer, larger tiles mean fewer kernel
# launches; 256 on CPU, where a [batch, kv_heads, 256 * group, 256] fp32 score tile stays in the
# caches. Measured at bench_125m's attention shape (batch 2, seq 1024, 12/4 heads, head_dim 64,
# bf16, forward + backward, 2 cores, thunk runtime off): 122 ms with 256, 173 ms with 128 and with
# 512. On CPU a sequence is always cut into at least two blocks: with a single block XLA's CPU
# runtime fuses the online-softmax update into the P V matmul as a oneDNN broadcast post-op that
# runs about 80x slower (0.85 s instead of 11 ms forward + backward at seq 256, 8 / 2 heads,
# head_dim 128).
DEFAULT_BLOCK = 512
CPU_BLOCK = 256

# Peak dense bf16 TFLOP/s per jax device, the MFU denominator.
# XPU: Intel Data Center GPU Max 1550, 832 TFLOP/s bf16 per GPU from its matrix engines (1024 XMX x
# 512 bf16 FLOP per clock x 1.6 GHz, Intel's published figure), 2 stacks per GPU -> 416 per stack,
# and each stack ("tile") is one jax device. ALCF's Aurora node performance overview reports a
# measured bf16 GEMM rate well below this peak (about 273 TFLOP/s). The same figure is stated in
# benchmarks/data_pipeline.py. CPU (and the platforms without an entry: gpu, tpu) has no
# meaningful table value: configure `peak_tflops_per_device` to get an MFU there (it is reported
# as 0 otherwise).
XPU_PEAK_TFLOPS = 416.0

# XLA flags for the CPU client (compat.CPU_XLA_FLAGS), added to XLA_FLAGS before jax's backends
# start unless the user already set the same flag. At jax 0.5.0 the default "thunk" runtime runs
# bf16 matmuls through Eigen at 172 GFLOP/s on the 2-core reference machine; the previous runtime
# rewrites them to oneDNN calls at 563 GFLOP/s, and bench_125m's bf16 train step runs twice as
# fast (benchmarks/train_step.py, BENCHMARKS.md). The flags only concern the CPU client, so they
# are harmless next to an accelerator (the runtime adds them whatever the platform). Single-process
# runs only: under that runtime a failed gloo collective is a fatal check in XLA (cpu_runtime.cc
# aborts the process) where the default runtime raises an error the driver reports, so
# multi-process CPU jobs keep the default runtime. From jax 0.6 XLA no longer has that runtime
# (jax 0.11 logs '"xla_cpu_use_thunk_runtime" is no longer supported'), so the tuple is empty there.
#
# Copy before an asynchronous save, on CPU only: there Orbax's "copy" of a device array to the host
# is a view of the same memory, and the train step donates the state's buffers, so without a copy
# the step being written is overwritten in place by later iterations (agpt_jax/checkpoint.py; found
# by the kill -9 fault test: a resumed run diverged).
#
# Donation and host callbacks: the defaults are what stock jax does. On XPU, the extension's
# ``sycl`` platform (jax 0.5.0) donates only after the runtime's allow-list work-around and lowers
# no host callbacks (spec/jax-stack.md section 3); capabilities_for("xpu") assumes that stack (the
# stricter one) and the runtime resolves the plugin that actually runs (:func:`for_backend`).
_ACCELERATOR = Capabilities(
    platform="", accelerator=True, default_attention="xla", auto_attention="xla",
    auto_attention_long="blockwise", long_sequence=LONG_SEQUENCE, auto_attention_reason="",
    blockwise_block=DEFAULT_BLOCK, blockwise_split_single_block=False, pallas_interpret=True,
    peak_tflops_per_device=0.0, copy_before_async_save=False, copy_restored_before_donating=False,
    xla_flags=(),
    supports_donation=True, supports_host_callbacks=True)

_TABLE: dict[str, Capabilities] = {
    "cpu": dataclasses.replace(
        _ACCELERATOR, platform="cpu", accelerator=False, long_sequence=CPU_LONG_SEQUENCE,
        blockwise_block=CPU_BLOCK, blockwise_split_single_block=True,
        copy_before_async_save=True, copy_restored_before_donating=True,
        xla_flags=compat.CPU_XLA_FLAGS),
    "gpu": dataclasses.replace(
        _ACCELERATOR, platform="gpu", default_attention="pallas", auto_attention="pallas",
        auto_attention_long="pallas", long_sequence=0,
        auto_attention_reason="CUDA GPU: the Pallas flash kernel compiles with Triton",
        pallas_interpret=False),
    "xpu": dataclasses.replace(
        _ACCELERATOR, platform="xpu", default_attention="blockwise", auto_attention="blockwise",
        auto_attention_long="blockwise", long_sequence=0,
        auto_attention_reason=("XPU: Pallas has no lowering for the sycl platform at jax 0.5.0; "
                               "blockwise is the memory-efficient path"),
        peak_tflops_per_device=XPU_PEAK_TFLOPS, supports_host_callbacks=False),
    "tpu": dataclasses.replace(_ACCELERATOR, platform="tpu"),
}
assert tuple(_TABLE) == TARGET_PLATFORMS


def capabilities_for(platform: str | Capabilities) -> Capabilities:
    """The capabilities of a named target platform, without starting jax.

    Args:
        platform: ``"cpu" | "gpu" | "xpu" | "tpu"``, or a :class:`Capabilities` (returned as is,
            so that functions can take either).

    Returns:
        The table's :class:`Capabilities` (for ``"xpu"``: the stricter jax 0.5.0 extension's;
        ``Runtime.capabilities`` has the running plugin's).

    Raises:
        ValueError: an unknown name (jax's backend names such as ``"cuda"`` or ``"sycl"`` are not
            ours: see :func:`platform_of_backend`).
    """
    if isinstance(platform, Capabilities):
        return platform
    try:
        return _TABLE[platform]
    except (KeyError, TypeError):
        raise ValueError(f"unknown platform {platform!r}; expected one of "
                         f"{TARGET_PLATFORMS}") from None


# jax's backend names -> ours. Intel's plugins register "sycl" (the extension) and "oneapi" (the
# upstream plugin); agpt_jax/xpu.py has what each wheel registers.
_PLATFORM_NAMES = {"cpu": "cpu", "sycl": "xpu", "oneapi": "xpu", "cuda": "gpu", "rocm": "gpu",
                   "gpu": "gpu", "tpu": "tpu"}


def plugin_for_backend(jax_platform: str, platform_version: str = "") -> xpu.XpuPlugin | None:
    """The Intel plugin behind a backend jax reports, or None for a backend that is not Intel's.

    Args:
        jax_platform: ``jax.default_backend()`` / ``device.platform``.
        platform_version: the client's ``platform_version``; jax 0.11 names a ``gpu`` backend of
            the oneapi plugin there (jax/_src/array.py reads ``"oneapi" in platform_version``).
    """
    if jax_platform == "oneapi" or (jax_platform == "gpu" and "oneapi" in platform_version.lower()):
        return xpu.ONEAPI
    if jax_platform == "sycl":  # the extension's name, and the upstream plugin's platform_name
        found = xpu.installed()
        return xpu.ONEAPI if xpu.ONEAPI in found and xpu.EXTENSION not in found else xpu.EXTENSION
    return None


def platform_of_backend(jax_platform: str, platform_version: str = ""
                        ) -> tuple[str, xpu.XpuPlugin | None]:
    """Our platform name for jax's backend, and the Intel plugin behind it (or None).

    jax 0.11 may report the oneapi backend as ``"gpu"`` (an alias): the plugin decides, not the
    name. A backend we do not know keeps jax's name.
    """
    plugin = plugin_for_backend(jax_platform, platform_version)
    ours = "xpu" if plugin is not None else _PLATFORM_NAMES.get(jax_platform, jax_platform)
    return ours, plugin


def for_backend(platform: str, jax_platform: str, *, supports_donation: bool,
                supports_host_callbacks: bool) -> Capabilities:
    """The running platform's capabilities (what ``initialize`` stores in ``Runtime``).

    Args:
        platform: ours (:func:`platform_of_backend`); one outside the table gets an
            accelerator's generic capabilities (plain attention, blockwise from LONG_SEQUENCE).
        jax_platform: jax's backend name: the Pallas default needs Triton, i.e. CUDA.
        supports_donation: whether donation works (after the runtime's work-arounds).
        supports_host_callbacks: whether the backend lowers host callbacks (the plugin's).
    """
    base = _TABLE.get(platform) or dataclasses.replace(_ACCELERATOR, platform=platform)
    changes: dict[str, object] = {"supports_donation": supports_donation,
                                  "supports_host_callbacks": supports_host_callbacks}
    if platform == "gpu" and jax_platform != "cuda":
        changes["default_attention"] = "xla"  # Pallas flash attention needs Triton on CUDA
    return dataclasses.replace(base, **changes)
