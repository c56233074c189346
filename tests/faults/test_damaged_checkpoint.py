"""A checkpoint step damaged after it was written: the run skips it with a warning naming it and
resumes from the previous good step, ending identical to an undamaged run."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest
from absl import logging

from agpt_jax import checkpoint
from agpt_jax import loop, runtime
from agpt_jax.metrics import read_metrics

import fault_helpers as fh

ITERS = 6
STOP = 4


def _truncate_params_data(step_dir: str) -> str:
    """Truncates the biggest file of the params item to half its size; returns its path."""
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "params"))
             for n in ns]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _remove_train_item(step_dir: str) -> str:
    path = os.path.join(step_dir, "train", "metadata")
    os.remove(path)
    return path


def _remove_adam_manifest(step_dir: str) -> str:
    path = os.path.join(step_dir, "adam", "manifest.ocdbt")
    os.remove(path)
    return path


DAMAGES = {"params data file truncated": _truncate_params_data,
           "train item removed": _remove_train_item,
           "adam manifest removed": _remove_adam_manifest}


@pytest.fixture(scope="module")
def rt():
    return runtime.initialize("cpu")


@pytest.fixture(scope="module")
def setup(rt, tmp_path_factory):
    work = tmp_path_factory.mktemp("damaged")
    file_list = fh.write_corpus(str(work))
    over = dict(data_file_list=file_list, train_iters=ITERS, save_interval=1,
                eval_interval=1000)
    whole = str(work / "whole")
    loop.run(fh.make_cfg("pretrain", save=whole, **over), rt)
    return work, over, whole


class _Warnings(logging.logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_step_is_skipped(rt, setup, damage):
    work, over, whole = setup
    save = str(work / damage.replace(" ", "_"))
    loop.run(fh.make_cfg("pretrain", save=save, stop_at_iteration=STOP, **over), rt)
    newest = os.path.join(save, "checkpoints", str(STOP))
    broken = DAMAGES[damage](newest)
    handler = _Warnings()
    logging.get_absl_logger().addHandler(handler)
    try:
        t0 = time.perf_counter()
        result = loop.run(fh.make_cfg("pretrain", save=save, **over), rt)
        seconds = time.perf_counter() - t0
    finally:
        logging.get_absl_logger().removeHandler(handler)
    named = [m for m in handler.messages if newest in m and "damaged" in m]
    assert named, handler.messages
    assert result.start_iteration == STOP - 1 and result.last_iteration == ITERS
    assert os.path.isdir(newest + ".damaged")  # kept for inspection, not deleted
    assert os.path.isfile(os.path.join(newest, "_CHECKPOINT_METADATA"))  # written again
    # The run continued from the previous good step exactly as the undamaged run did.
    for x, y in zip(jax.tree.leaves(checkpoint.restore_params(whole)),
                    jax.tree.leaves(checkpoint.restore_params(save))):
        np.testing.assert_array_equal(x, y)
    ref = fh.last_line_per_iteration(read_metrics(os.path.join(whole, "metrics.jsonl")))
    got = fh.last_line_per_iteration(read_metrics(os.path.join(save, "metrics.jsonl")))
    assert got == ref
    fh.record(f"fault_damaged_{damage.replace(' ', '_')}", {
        "kind": "fault", "order": 3,
        "title": f"damaged checkpoint step: {damage}",
        "how": (f"a {ITERS}-iteration run stopped at {STOP} (steps {STOP - 2}..{STOP} kept), "
                f"then {os.path.relpath(broken, newest)} of step {STOP} damaged and the run "
                "started again; compared with an undamaged run"),
        "trials": 1,
        "observed": (f"warning names {os.path.relpath(newest, save)} and moves it to "
                     f"{STOP}.damaged; resumed from step {result.start_iteration}, "
                     f"1 iteration redone, final params and losses identical "
                     f"(restart {seconds:.1f} s)"),
        "message": named[0][:300],
    })


def test_every_step_damaged_is_one_clear_error(rt, setup):
    work, over, _ = setup
    save = str(work / "all_damaged")
    loop.run(fh.make_cfg("pretrain", save=save, stop_at_iteration=2, **over), rt)
    for step in (1, 2):
        _remove_train_item(os.path.join(save, "checkpoints", str(step)))
    with pytest.raises(checkpoint.CheckpointError, match=r"every checkpoint of .* is damaged"):
        loop.run(fh.make_cfg("pretrain", save=save, **over), rt)
