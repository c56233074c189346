"""Checkpoint converters at agpt-jax's border: DeepSpeed universal <-> Orbax, DeepSpeed ZeRO-1 ->
Orbax, Orbax -> HF Llama.

None of it needs torch: `.pt` files are read and written by `converters.pt_archive`, HF weights by
safetensors' numpy API. Only `orbax_to_hf` imports transformers (for config.json and the tokenizer),
inside its functions.

Command lines:
    python -m converters.universal_to_orbax --load SRC --save DST [--no-optimizer-state]
    python -m converters.zero_to_orbax --load SRC --save DST [--no-optimizer-state]
    python -m converters.orbax_to_universal --load SRC --save DST
    python -m converters.orbax_to_hf --load SRC --save DST [--tokenizer PATH]

Exit codes (every converter): 0 converted; 2 bad input (a missing or malformed --load, an existing
--save, a bad flag); 1 the conversion failed while writing (disk full, quota, I/O error) or was
interrupted. Nothing is left at --save unless the exit code is 0.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import sys
from typing import Callable

from absl import logging

from agpt_jax import hostmem
from agpt_jax.cli import EXIT_FAILED, EXIT_USAGE


# tensorstore's message for a failed file write (disk full, quota, size limit).
_WRITE_FAILED = re.compile(r"Error writing|Failed to write")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


class ConversionError(ValueError):
    """A conversion cannot proceed: bad input or an existing destination."""


class WriteFailedError(ConversionError):
    """Writing the converted checkpoint failed (disk full, quota, I/O error): not the input's fault."""


def temporary_path(dst: str) -> str:
    """Where a conversion writes before the final rename: `DST.tmp-<host>-<pid>`."""
    return f"{_temporary_prefix(dst)}{os.getpid()}"


def _temporary_prefix(dst: str) -> str:
    # The host is in the name so that a conversion on a shared filesystem only judges the
    # temporaries of its own host's processes.
    return f"{os.path.abspath(dst)}.tmp-{socket.gethostname()}-"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(dst: str) -> list[str]:
    """Removes `DST.tmp-<this host>-<pid>` folders whose process no longer exists.

    A conversion that was killed (SIGKILL, out of memory, a job's time limit) cannot clean up
    after itself; the next conversion to the same destination does. Temporaries of live
    processes and of other hosts are left alone.

    Returns:
        the removed paths.
    """
    prefix = _temporary_prefix(dst)
    removed = []
    for path in sorted(glob.glob(glob.escape(prefix) + "*")):
        pid = path[len(prefix):]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_destination(dst: str) -> str:
    """Refuse to overwrite: the destination must not exist yet. Returns its absolute path."""
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.exists(dst):
        raise ConversionError(f"{dst}: already exists; choose a new --save path or remove it")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise ConversionError(f"{parent}: the parent folder of --save does not exist")
    return dst


def _is_write_failure(e: Exception) -> bool:
    """Whether `e` is a failed file write (disk full, quota, file-size limit).

    It surfaces as OSError from Python, RuntimeError from torch.save ("unexpected pos ..."),
    SafetensorError ("I/O error") from safetensors, and a plain ValueError from tensorstore
    ("Error writing ... Failed to write"); our own input errors (ConversionError, the readers'
    ValueError subclasses) are not write failures.
    """
    if isinstance(e, OSError):
        return e.errno in _WRITE_ERRNOS
    if isinstance(e, RuntimeError):
        return True
    if type(e).__name__ == "SafetensorError":
        return True
    return type(e) is ValueError and bool(_WRITE_FAILED.search(str(e)))


def write_atomically(dst: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` into `DST.tmp-<host>-<pid>` and rename it to DST; remove the temporary
    on error, and the temporaries of killed earlier conversions to DST before starting.

    An interrupted or failed conversion therefore never leaves anything at DST.
    """
    dst = check_destination(dst)
    for path in remove_stale_temporaries(dst):
        logging.info("removed %s, left by a conversion that was killed", path)
    tmp = temporary_path(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        os.rename(tmp, dst)
    except Exception as e:  # noqa: BLE001 - sorted below
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(e):
            raise
        raise WriteFailedError(
            f"{dst}: writing the converted checkpoint failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); nothing was left at "
            "--save. Check free disk space and quotas, then run the same command again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Exit codes (agpt_jax.cli): 0 done, EXIT_FAILED while converting, EXIT_USAGE bad input.


def exit_code_of(e: BaseException) -> int:
    """EXIT_FAILED for a failure while converting (a failed write, an I/O error, an interrupt),
    EXIT_USAGE for an input the user must fix (any other ValueError or OSError: a missing,
    unreadable or malformed file, an existing destination)."""
    if isinstance(e, WriteFailedError) or isinstance(e, KeyboardInterrupt):
        return EXIT_FAILED
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return EXIT_FAILED
    return EXIT_USAGE


def run_cli(body: Callable[[], None], debug: bool) -> int:
    """Run a converter body; an error becomes one line on stderr and its exit code (exit_code_of):
    2 for bad input, 1 for a failure while writing or an interrupt."""
    hostmem.fix_mmap_threshold()  # each tensor's memory goes back as soon as it is freed
    try:
        body()
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return exit_code_of(e)
    except KeyboardInterrupt as e:
        print("error: interrupted; nothing was written at --save", file=sys.stderr)
        return exit_code_of(e)
    return 0
