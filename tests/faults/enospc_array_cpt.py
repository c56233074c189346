"""cpt.py with a full disk injected into an ARRAY write: the first array of the `params` item of
checkpoint step $FAULT_ENOSPC_STEP that this process writes gets half of its bytes onto the disk
(a partial data file in the item's OCDBT folder), then fails as tensorstore fails on a full
filesystem: a ValueError "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"
(the text tensorstore 0.1.86 gives when an OCDBT write hits ENOSPC on a full tmpfs).

Orbax writes every array of a PyTree item through
`orbax.checkpoint._src.serialization.serialization.async_serialize_from_host` (called by the
ArrayHandler's background write, looked up on the module at call time), so wrapping that function
fails the write of the array chunks themselves, in Orbax's background thread, as a real full disk
does. Run as `python tests/faults/enospc_array_cpt.py <cpt.py flags>`.
"""

from __future__ import annotations

import os
import re
import runpy
import sys

from orbax.checkpoint._src.serialization import serialization

_STEP = int(os.environ["FAULT_ENOSPC_STEP"])
# The item's folder while Orbax writes it: `<step>.orbax-checkpoint-tmp*/params[.orbax-...]`.
_ITEM = re.compile(rf"/{_STEP}(\.orbax-checkpoint-tmp[^/]*)?/params(\.orbax-checkpoint-tmp[^/]*)?"
                   r"(/|$)")
_original = serialization.async_serialize_from_host
_failed = []


def _base_path(kvstore) -> str:
    """The local folder of a tensorstore kvstore spec (OCDBT over a file kvstore, or a file one)."""
    while isinstance(kvstore, dict) and "base" in kvstore:
        kvstore = kvstore["base"]
    if isinstance(kvstore, dict):
        kvstore = kvstore.get("path", "")
    return str(kvstore).removeprefix("file://")


async def _async_serialize_from_host(rslices_on_host, tensorstore_spec, **kwargs):
    base = _base_path(tensorstore_spec.get("kvstore", {}))
    if not _failed and _ITEM.search(base):
        _failed.append(base)
        key = tensorstore_spec.get("kvstore", {}).get("path", "?")
        data = os.path.join(base, "d")
        os.makedirs(data, exist_ok=True)
        partial = os.path.join(data, "enospc_partial.__lock")
        fragments = rslices_on_host.to_fragments().fragments
        raw = b"".join(f.value.tobytes() for f in fragments)
        with open(partial, "wb") as f:
            f.write(raw[: len(raw) // 2])
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "{key}" in OCDBT database at local file '
            f'"{base}/": Failed writing: "{partial}": Failed to write {len(raw)} bytes to file: '
            "No space left on device [os_error_code='28']")
    return await _original(rslices_on_host, tensorstore_spec, **kwargs)


serialization.async_serialize_from_host = _async_serialize_from_host
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(root, "scripts", "cpt.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
