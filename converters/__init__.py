"""Checkpoint converters at agpt-jax's border: DeepSpeed universal <-> Orbax, Orbax -> HF Llama.

Only this package imports torch, transformers or safetensors, and only inside functions.

Command lines:
    python -m converters.universal_to_orbax --load SRC --save DST [--no-optimizer-state]
    python -m converters.orbax_to_universal --load SRC --save DST
    python -m converters.orbax_to_hf --load SRC --save DST [--tokenizer PATH]
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Callable


# tensorstore's message for a failed file write (disk full, quota, size limit).
_WRITE_FAILED = re.compile(r"Error writing|Failed to write")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


class ConversionError(ValueError):
    """A conversion cannot proceed: bad input or an existing destination."""


def temporary_path(dst: str) -> str:
    """Where a conversion writes before the final rename: `DST.tmp-<pid>`."""
    return f"{os.path.abspath(dst)}.tmp-{os.getpid()}"


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
    """Run `write(tmp)` into `DST.tmp-<pid>` and rename it to DST; remove the temporary on error.

    An interrupted or failed conversion therefore never leaves anything at DST.
    """
    dst = check_destination(dst)
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
        raise ConversionError(
            f"{dst}: writing the converted checkpoint failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); nothing was left at "
            "--save. Check free disk space and quotas, then run the same command again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_cli(body: Callable[[], None], debug: bool) -> int:
    """Run a converter body; a user error becomes one line on stderr and exit code 1."""
    try:
        body()
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at --save", file=sys.stderr)
        return 1
    return 0
