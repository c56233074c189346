"""cpt.py with a full disk injected: the write of the `data` item of checkpoint step
$FAULT_ENOSPC_STEP writes half of its bytes, then fails with ENOSPC, as a write to a full
filesystem does. Run as `python tests/faults/enospc_cpt.py <cpt.py flags>`."""

from __future__ import annotations

import errno
import json
import os
import re
import runpy
import sys

from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

_STEP = int(os.environ["FAULT_ENOSPC_STEP"])
# Orbax writes the item into `<step>.orbax-checkpoint-tmp/data.orbax-checkpoint-tmp`.
_ITEM = re.compile(rf"/{_STEP}(\.orbax-checkpoint-tmp[^/]*)?/data(\.orbax-checkpoint-tmp[^/]*)?$")
_original = jch.JsonCheckpointHandler._save_fn


async def _save_fn(self, x, directory):
    if _ITEM.search(str(directory)):
        path = os.path.join(str(directory), "metadata")
        text = json.dumps(x)
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return await _original(self, x, directory)


jch.JsonCheckpointHandler._save_fn = _save_fn
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(root, "scripts", "cpt.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
