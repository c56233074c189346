"""Host memory: back XLA's large CPU allocations with transparent huge pages.

XLA's CPU runtime allocates each step's temporaries as one block (2.3 GB for the bench_125m train
step) and frees it when the step ends. glibc serves a block that large with a fresh `mmap` and
returns it with `munmap`, so every step page-faults its whole working set again in 4 KiB pages:
560,000 minor faults and 1.5 s of system time per bench_125m step on 2 cores.

glibc 2.35 and later can advise the kernel to use transparent huge pages for such blocks (the
`glibc.malloc.hugetlb=1` tunable): the faults drop to about 1,500 per step, the system time
halves, and the 2 MiB pages also shorten the compute. Measured on bench_125m (bf16, 2 cores):
9.5 s -> 7.7 s per step, resident memory unchanged (4.07 GB). Keeping the freed memory inside
glibc instead (mallopt with one arena, no mmap and no trimming) removes the faults too but lets
the heap fragment: resident memory grew from 4.0 to 10.7 GB over 24 steps, so it is not used.

glibc reads its tunables once, when the process starts. So:

- `reexec_with_huge_pages()`, called first under the command-line scripts' `__main__` guard (never
  on import: it replaces the process), re-executes the same command (same PID, arguments and
  environment) with the tunable added to GLIBC_TUNABLES when it is not already there;
- `environment()` returns an environment with the tunable added, for child processes and test
  workers.

Nothing is done when AGPT_JAX_MALLOC=system, off Linux, or when the kernel has transparent huge
pages disabled. An older glibc ignores the unknown tunable.

Two calls for code that allocates and frees large host arrays: `release_free_heap()` hands the
memory glibc holds in free heap chunks back to the kernel (malloc_trim, once: a checkpoint restore
calls it after each group of leaves), and `fix_mmap_threshold()` makes glibc return every large
block as it is freed (for the whole process: the converters' command lines).
This module imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping

ENV_VAR = "AGPT_JAX_MALLOC"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

# GLIBC_TUNABLES as this process started with it: what glibc actually read.
_AT_START = os.environ.get("GLIBC_TUNABLES", "")


def _tunables(value: str) -> list[str]:
    return [item for item in value.split(":") if item]


def _has_tunable(value: str) -> bool:
    name = TUNABLE.split("=", 1)[0]
    return any(item.split("=", 1)[0] == name for item in _tunables(value))


def _thp_available() -> bool:
    """Whether the kernel honours huge-page advice ("always" or "madvise" selected)."""
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether huge pages should be requested for a process started with `environ`."""
    return (environ.get(ENV_VAR, "") != "system" and sys.platform.startswith("linux")
            and _thp_available())


def environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of `environ` with the huge-page tunable in GLIBC_TUNABLES (when `wanted`).

    A value the user gave for the same tunable is kept.
    """
    env = dict(environ)
    if wanted(env) and not _has_tunable(env.get("GLIBC_TUNABLES", "")):
        env["GLIBC_TUNABLES"] = ":".join(_tunables(env.get("GLIBC_TUNABLES", "")) + [TUNABLE])
    return env


def reexec_with_huge_pages() -> None:
    """Re-executes this command with the tunable set, unless it is set or not `wanted`.

    Call it first in a program's `__main__` block, before any real work: the process is replaced
    (same PID), so nothing done before the call survives it. Never call it on import. Returns
    only when no re-execution is needed.
    """
    if not wanted() or _has_tunable(_AT_START):
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = sys.executable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, environment())


def status() -> str:
    """One line for the start-up log: whether this process runs with the tunable."""
    if _has_tunable(_AT_START):
        return f"host malloc: transparent huge pages for large blocks (GLIBC_TUNABLES {TUNABLE})"
    if os.environ.get(ENV_VAR, "") == "system":
        return f"host malloc: glibc defaults ({ENV_VAR}=system)"
    if not wanted():
        return "host malloc: glibc defaults (no transparent huge pages on this system)"
    return ("host malloc: glibc defaults (call agpt_jax.hostmem.reexec_with_huge_pages() first "
            f"or start with GLIBC_TUNABLES={TUNABLE})")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # AttributeError where the C library is not glibc
    except (OSError, AttributeError):
        return None
    return libc


def release_free_heap() -> None:
    """Returns the free memory inside glibc's heaps (every thread's arena) to the kernel.

    glibc keeps freed blocks below its mmap threshold, and by default that threshold rises to the
    size of the largest block freed, so after a few large frees tens of MiB sit in free chunks
    that are still resident. Only later allocations that fit them reuse them, and a sequence of
    differently sized allocations (a restore: one host buffer per leaf, then a device buffer per
    leaf) adds up instead. malloc_trim(0) gives those pages back (madvise) without changing the
    allocator's policy for the rest of the run. About 13 ms a call with a 1.4 GiB state
    resident (2 cores). Does nothing where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Makes glibc serve every block of `nbytes` and more with its own mmap, so that freeing it
    gives it back to the kernel at once (a fixed M_MMAP_THRESHOLD; by default glibc raises the
    threshold to the size of each large block it frees, after which blocks of tens of MiB come
    from the heap and stay resident when freed). For processes that allocate and free one large
    array after another and do little else (the converters: a 0.3B conversion from ZeRO DP = 64
    shards measured 1.49 instead of 1.18 GB of peak RSS without it). Not for training: it costs
    2-7% of step throughput on the CPU client (BENCHMARKS.md, "Resume"), and it lasts for the
    process. Does nothing where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
