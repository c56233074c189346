"""kill -9 at random moments, restart, and the run ends bit-identical to an uninterrupted one.

One chain: a smoke-scale run of ITERS iterations that saves every iteration asynchronously is
SIGKILLed at seeded random moments (KILLS times, some right after the "(async)" save log line,
while Orbax is still writing the step), restarted with the same SAVE after each kill, and finally
allowed to finish. Properties:
  - every restart resumes from the newest complete checkpoint on disk at the time of the kill;
  - every loss line ever written (by killed runs too) equals the uninterrupted run's for that
    iteration, bit for bit, so the last line per iteration does as well;
  - the final params and Adam state equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import jax
import numpy as np
import pytest

from agpt_jax import checkpoint
from agpt_jax.metrics import read_metrics

import fault_helpers as fh

SEED = 7_2024
KILLS = 20
ITERS = 64
TIMEOUT = 180.0
_CKPT_TMP = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def _complete_steps(save: str) -> list[int]:
    directory = os.path.join(save, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()
                  and os.path.isfile(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def _unfinished(save: str) -> list[str]:
    directory = os.path.join(save, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if _CKPT_TMP.match(n))


def _args(file_list: str, save: str) -> list[str]:
    return fh.cpt_args("pretrain", file_list, save, f"train_iters={ITERS}", "save_interval=1",
                       "eval_interval=1000", "log_interval=1")


@pytest.mark.slow
def test_kill9_chain_resumes_bit_exact(tmp_path):
    file_list = fh.write_corpus(str(tmp_path))
    env = fh.child_env(str(tmp_path / "jax_cache"))
    ref = str(tmp_path / "uninterrupted")
    child = fh.Child(_args(file_list, ref), env)
    assert child.finish(TIMEOUT) == 0, child.text[-3000:]
    ref_losses = fh.last_line_per_iteration(read_metrics(os.path.join(ref, "metrics.jsonl")))
    assert sorted(ref_losses) == list(range(1, ITERS + 1))

    rng = random.Random(SEED)
    save = str(tmp_path / "killed")
    trials, restarts = [], 0
    while True:
        restarts += 1
        before = _complete_steps(save)
        child = fh.Child(_args(file_list, save), env)
        trial = {"restart": restarts, "resumed_from": None}
        if len(trials) < KILLS:
            mode = rng.choices(["after_async_save", "during_training", "from_spawn"],
                               weights=[4, 5, 1])[0]
            trial["mode"] = mode
            if mode == "after_async_save":
                trial["nth_save"] = rng.randint(1, 2)
                at = child.wait_for(r"saved checkpoint .*\(async\)", trial["nth_save"], TIMEOUT)
            elif mode == "during_training":
                trial["delay_s"] = round(rng.uniform(0.0, 0.6), 3)
                at = child.wait_for(r"iteration \d+ tokens", 1, TIMEOUT)  # the first one done
                if at is not None:
                    time.sleep(max(0.0, at + trial["delay_s"] - time.monotonic()))
            else:
                trial["delay_s"] = round(rng.uniform(1.0, 7.0), 3)
                time.sleep(trial["delay_s"])
            child.kill(signal.SIGKILL)
            rc = child.finish(TIMEOUT)
            trial["killed"] = rc == -signal.SIGKILL
            trial["tmp_step_dirs_after_kill"] = _unfinished(save)
            # The step whose asynchronous write was started last, if the kill cut that write.
            async_steps = [int(m) for m in re.findall(
                r"saved checkpoint .*checkpoints/(\d+) \(async\)", child.text)]
            trial["write_interrupted"] = (bool(async_steps)
                                          and async_steps[-1] not in _complete_steps(save))
        else:
            rc = child.finish(TIMEOUT)
        resumed = child.matching(r"resuming from .*checkpoints/(\d+)")
        if resumed:
            trial["resumed_from"] = int(re.search(r"checkpoints/(\d+)", resumed[0]).group(1))
        started = child.matching(r"random init from seed|resuming from|loading ")
        if started:
            # A restart resumes from the newest complete step left by the previous kill.
            assert trial["resumed_from"] == (before[-1] if before else None), (
                trial, before, child.text[-2000:])
        else:
            trial["resumed_from"] = before[-1] if before else None  # killed before restoring
        metrics = os.path.join(save, "metrics.jsonl")
        done = [int(m) for m in re.findall(r"iteration (\d+) tokens", child.text)]
        trial["last_iteration_logged"] = max(done) if done else None
        trial["steps_on_disk_after"] = _complete_steps(save)
        if "mode" not in trial:
            assert rc == 0, child.text[-3000:]
            trials.append(trial)
            break
        if not trial["killed"]:  # finished before the kill landed: the chain is over
            assert rc == 0, child.text[-3000:]
            trials.append(trial)
            break
        trials.append(trial)
        assert os.path.isfile(metrics) or trial["last_iteration_logged"] is None
    kills = [t for t in trials if t.get("killed")]
    assert len(kills) >= KILLS, trials
    # At least a few kills landed while Orbax was writing a step asynchronously.
    during_write = [t for t in kills if t["write_interrupted"]]
    assert len(during_write) >= 3, trials

    records = read_metrics(os.path.join(save, "metrics.jsonl"))
    mismatched = [(r["iteration"], r["loss"], ref_losses[r["iteration"]]) for r in records
                  if "loss" in r and r["loss"] != ref_losses[r["iteration"]]]
    assert not mismatched, mismatched[:5]
    assert fh.last_line_per_iteration(records) == ref_losses
    for name, restore in (("params", checkpoint.restore_params), ("adam", checkpoint.restore_adam)):
        for x, y in zip(jax.tree.leaves(restore(ref)), jax.tree.leaves(restore(save))):
            np.testing.assert_array_equal(x, y, err_msg=name)

    # Lost work per kill: iterations logged by the killed run that the next run did again.
    for prev, nxt in zip(trials, trials[1:]):
        if prev.get("killed"):
            done = prev["last_iteration_logged"] or 0
            prev["lost_iterations"] = max(0, done - (nxt["resumed_from"] or 0))
    lost = [t["lost_iterations"] for t in kills]
    fh.record("fault_kill9", {
        "kind": "fault", "order": 1,
        "title": "kill -9 at random moments (async checkpoint writes included)",
        "how": (f"one {ITERS}-iteration smoke run saving every iteration asynchronously, "
                f"SIGKILLed at seeded random moments (seed {SEED}: right after the n-th async "
                "save line, a random delay after the first iteration, or a random delay from "
                "spawn) and restarted with the same SAVE; compared with an uninterrupted run"),
        "trials": len(kills),
        "observed": (f"{len(kills)} kills ({len(during_write)} while a step was being written), "
                     f"every restart resumed from the newest complete step; lost iterations per "
                     f"kill: mean {np.mean(lost):.1f}, max {max(lost)}; losses of all "
                     f"{len(records)} metric lines and final params/Adam state bit-identical to "
                     "the uninterrupted run"),
        "seed": SEED, "trials_detail": trials,
    })
