"""A full disk while a checkpoint is written: the run stops with one line naming the failed write
and the checkpoint a restart resumes from; that checkpoint and the data iterator state are intact,
so the restart (with room on the disk) redoes the lost iterations bit for bit."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

from agpt_jax import checkpoint
from agpt_jax.metrics import read_metrics

import fault_helpers as fh

ENOSPC_STEP = 6
ITERS = 12
WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc_cpt.py")


@pytest.mark.slow
def test_enospc_during_async_save(tmp_path):
    file_list = fh.write_corpus(str(tmp_path))
    cache = str(tmp_path / "jax_cache")
    save = str(tmp_path / "run")
    args = fh.cpt_args("pretrain", file_list, save, f"train_iters={ITERS}", "save_interval=2",
                       "eval_interval=1000", "log_interval=1")
    full = fh.Child([sys.executable, WRAPPER, *args[2:]],
                    fh.child_env(cache, FAULT_ENOSPC_STEP=str(ENOSPC_STEP)))
    rc = full.finish(240)
    assert rc == 1, full.text[-3000:]
    assert "Traceback" not in full.text, full.text[-3000:]
    errors = full.matching(r"^cpt\.py: error:")
    assert len(errors) == 1, full.text[-3000:]
    message = errors[0]
    assert "No space left on device" in message and "checkpoints/4, which a restart" in message
    assert "Free disk space" in message
    complete = sorted(int(n) for n in os.listdir(os.path.join(save, "checkpoints"))
                      if n.isdigit())
    assert complete == [2, 4], complete  # nothing that looks complete for the failed step
    before = read_metrics(os.path.join(save, "metrics.jsonl"))
    lost = max(r["iteration"] for r in before) - 4

    again = fh.Child(args, fh.child_env(cache))
    assert again.finish(240) == 0, again.text[-3000:]
    assert again.matching(r"resuming from .*checkpoints/4$")
    records = read_metrics(os.path.join(save, "metrics.jsonl"))
    # Every iteration the failed run did is redone with the same loss: params, Adam state and
    # the data iterator position of step 4 were intact.
    per_it: dict[int, set[float]] = {}
    for r in records:
        if "loss" in r:
            per_it.setdefault(r["iteration"], set()).add(r["loss"])
    assert sorted(per_it) == list(range(1, ITERS + 1))
    assert all(len(v) == 1 for v in per_it.values()), per_it
    with open(os.path.join(checkpoint.resolve_checkpoint_dir(save), "data", "metadata")) as f:
        assert '"next_iteration": %d' % ITERS in f.read()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(checkpoint.restore_params(save)))
    fh.record("fault_disk_full", {
        "kind": "fault", "order": 4,
        "title": "disk full while an asynchronous checkpoint is written",
        "how": (f"cpt.py under a wrapper whose write of step {ENOSPC_STEP}'s data item writes "
                "half its bytes and fails with ENOSPC (Orbax's JSON handler patched in the "
                "child); then the same command again with room"),
        "trials": 1,
        "observed": (f"exit 1 with one line, no traceback; steps 2, 4 intact, step "
                     f"{ENOSPC_STEP} left only as Orbax's tmp folder; the rerun resumed from 4, "
                     f"{lost} iterations redone with identical losses"),
        "message": message.split("error: ", 1)[1][:400],
    })
