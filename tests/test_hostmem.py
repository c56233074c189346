"""agpt_jax.hostmem's two allocator calls, each in a fresh process: resident memory (the kernel's
count, /proc/self/statm) after freeing blocks that glibc would otherwise keep."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from agpt_jax import hostmem

# Asked of Python, not of hostmem: on glibc the calls must work, not be skipped.
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the C library is not glibc")

MiB = 2**20

# Allocates `count` blocks of `size` bytes with the C allocator, writes every page, frees all but
# the last one (on the heap it lies above the others and pins the top, so that free() itself
# cannot trim what lies below it), then reports RSS before and after `call`.
_PROGRAM = textwrap.dedent("""
    import ctypes, json, os, sys
    from agpt_jax import hostmem
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    size, count, call, warm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if call == "fix_mmap_threshold":
        hostmem.fix_mmap_threshold()
    if warm:  # a large block freed: glibc raises its mmap threshold to its size (<= 32 MiB)
        libc.free(libc.malloc(warm))
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    before = rss()
    for b in blocks[:-1]:
        libc.free(b)
    freed = rss()
    if call == "release_free_heap":
        hostmem.release_free_heap()
    print(json.dumps({"before": before, "freed": freed, "after": rss()}))
""")


def _run(size: int, count: int, call: str, warm: int = 0) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(size), str(count), call, str(warm)],
                         capture_output=True, text=True, timeout=120,
                         env=hostmem.environment())
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_release_free_heap_returns_freed_heap_blocks():
    """64 KiB blocks come from the heap: freeing 160 MiB of them leaves it resident, and
    release_free_heap gives it back."""
    kept = _run(64 * 1024, 2560, "none")
    assert kept["before"] - kept["after"] < 40 * MiB, kept
    released = _run(64 * 1024, 2560, "release_free_heap")
    assert released["freed"] - released["after"] > 140 * MiB, released


def test_fix_mmap_threshold_returns_large_blocks_as_they_are_freed():
    """After one 16 MiB block is freed glibc serves 2 MiB blocks from the heap (it raises its
    threshold to the size of a freed mapped block up to 32 MiB), where freeing them leaves them
    resident; with the threshold fixed at 1 MiB each is its own mapping and goes back at once."""
    kept = _run(2 * MiB, 80, "none", warm=16 * MiB)
    assert kept["before"] - kept["freed"] < 40 * MiB, kept
    fixed = _run(2 * MiB, 80, "fix_mmap_threshold", warm=16 * MiB)
    assert fixed["before"] - fixed["freed"] > 140 * MiB, fixed
