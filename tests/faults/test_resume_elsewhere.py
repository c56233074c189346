"""Resuming a run somewhere else than where it was saved, and a full disk during an array write.

Every run is a smoke-scale cpt.py child (configs/pretrain.py:smoke, ITERS iterations, global batch
GBS, no evaluation) with the same flags except the mesh, the process layout and stop_at_iteration.
The reference is one uninterrupted run: 1 process x 4 CPU devices, mesh data=2,fsdp=2.

Tolerance. A run on another mesh, another device count or another process count reduces its
gradients (and the loss) in another order: the result is the same up to fp32 rounding, not bit
for bit, and the small differences grow a little through Adam over the iterations. So what does
not depend on floating-point reductions is compared exactly: the iteration numbers, the tokens
consumed (in total and per corpus, i.e. the same batches), the LR of every iteration, the Adam
step, the data iterator position and consumed samples in the final checkpoint. Losses, gradient
norms, final params and Adam moments are compared within fp32 reduction noise (LOSS_RTOL,
STATE_RTOL/STATE_ATOL); restarting the data stream or dropping the restored Adam state moves them
by orders of magnitude more. A resume on the saving run's own mesh and process layout (the
full-disk restart) is compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from agpt_jax import checkpoint
from agpt_jax.metrics import read_metrics

import fault_helpers as fh
from test_cpt import _free_port

ITERS = 8
STOP = 5  # the interrupted runs save and stop after this iteration (off the save_interval grid)
SAVE_INTERVAL = 2
GBS = 8
REF_MESH = "data=2,fsdp=2,tensor=1"
ENOSPC_STEP = 4
TIMEOUT = 300.0
# fp32 reduction noise after ITERS iterations. Observed: losses and gradient norms differ by at
# most ~1.1e-7 relative, final params and Adam moments by at most ~1.3e-6 of max(|x|, 0.01).
LOSS_RTOL = 1e-5
STATE_RTOL, STATE_ATOL = 1e-5, 1e-7
WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc_array_cpt.py")
# Per-iteration metrics that are not the result of a floating-point reduction.
EXACT_KEYS = ("tokens", "tokens/papers", "lr", "skipped")
CLOSE_KEYS = ("loss", "loss/papers", "grad_norm")


def _args(file_list: str, save: str, mesh: str, devices: int, *extra: str) -> list[str]:
    # global_batch fixed, grad_acc_steps derived: the same GBS on 1, 2 or 4 devices.
    return fh.cpt_args("pretrain", file_list, save, f"train_iters={ITERS}",
                       f"global_batch={GBS}", "grad_acc_steps=0", "eval_iters=0",
                       f"save_interval={SAVE_INTERVAL}", "keep_checkpoints=10",
                       "log_interval=1", f"mesh={mesh}", *extra, devices=devices)


def _job(work: dict, save: str, mesh: str, devices: int, *extra: str,
         processes: int = 1, argv0: list[str] | None = None, **env: str) -> list[fh.Child]:
    """Starts one cpt.py job: `processes` children of `devices` CPU devices each."""
    environ = fh.child_env(work["cache"], devices=devices, **env)
    args = _args(work["file_list"], save, mesh, devices, *extra)
    if argv0 is not None:
        args = argv0 + args[2:]
    if processes == 1:
        return [fh.Child(args, environ)]
    port = _free_port()
    return [fh.Child(args + [f"--coordinator_address=127.0.0.1:{port}",
                             f"--num_processes={processes}", f"--process_id={i}"], environ)
            for i in range(processes)]


def _finish(*jobs: list[fh.Child]) -> None:
    """Waits for every child of `jobs`; each must exit 0."""
    try:
        for job in jobs:
            for child in job:
                rc = child.finish(TIMEOUT)
                assert rc == 0, child.text[-3000:]
    finally:
        for job in jobs:
            for child in job:
                child.kill(9)


def _per_iteration(save: str) -> dict[int, dict]:
    """iteration -> the last metrics.jsonl training record of that iteration."""
    out = {}
    for r in read_metrics(os.path.join(save, "metrics.jsonl")):
        if "loss" in r:
            out[int(r["iteration"])] = r
    return out


def _final(save: str) -> dict:
    step = checkpoint.resolve_checkpoint_dir(save)
    with open(os.path.join(step, checkpoint.ITEM_DATA, "metadata")) as f:
        data_state = json.load(f)
    return {"step": os.path.basename(step), "progress": checkpoint.read_progress(step),
            "data": data_state, "params": checkpoint.restore_params(step), "adam": checkpoint.restore_adam(step)}


def _assert_resumed(job: list[fh.Child], step: int) -> None:
    for child in job:
        assert child.matching(rf"resuming from .*checkpoints/{step}$"), child.text[-3000:]


def _assert_continues(ref: str, got: str, exact: bool = False) -> None:
    """`got` equals the reference run `ref`: see the module docstring for what is exact and what
    is within fp32 reduction noise (everything exact with `exact`)."""
    a, b = _per_iteration(ref), _per_iteration(got)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1)), (sorted(a), sorted(b))
    for it in a:
        for key in EXACT_KEYS + (CLOSE_KEYS if exact else ()):
            assert b[it][key] == a[it][key], (it, key, b[it][key], a[it][key])
        if not exact:
            for key in CLOSE_KEYS:
                np.testing.assert_allclose(b[it][key], a[it][key], rtol=LOSS_RTOL,
                                           err_msg=f"iteration {it} {key}")
    fa, fb = _final(ref), _final(got)
    assert fa["step"] == fb["step"] == str(ITERS)
    assert fb["progress"].iteration == fa["progress"].iteration == ITERS
    assert fb["progress"].consumed_samples == fa["progress"].consumed_samples == ITERS * GBS
    assert (fb["progress"].consumed_tokens_per_corpus
            == fa["progress"].consumed_tokens_per_corpus)
    assert fb["progress"].schedule_count == fa["progress"].schedule_count
    assert fb["data"]["next_iteration"] == fa["data"]["next_iteration"] == ITERS
    assert int(np.asarray(fb["adam"]["count"])) == int(np.asarray(fa["adam"]["count"])) == ITERS
    for name in ("params", "adam"):
        pairs = zip(jax.tree_util.tree_leaves_with_path(fa[name]), jax.tree.leaves(fb[name]))
        for (path, x), y in pairs:
            where = f"{name}{jax.tree_util.keystr(path)}"
            if exact:
                np.testing.assert_array_equal(y, x, err_msg=where)
            else:
                np.testing.assert_allclose(y, x, rtol=STATE_RTOL, atol=STATE_ATOL, err_msg=where)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("elsewhere")
    return {"root": root, "file_list": fh.write_corpus(str(root)),
            "cache": str(root / "jax_cache")}


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run (1 process x 4 devices, data=2,fsdp=2), started at once in the
    background; call the returned function for its SAVE once it is needed."""
    save = str(work["root"] / "reference")
    job = _job(work, save, REF_MESH, 4)
    done = []

    def wait() -> str:
        if not done:
            _finish(job)
            done.append(save)
        return save

    yield wait
    if not done:  # a test failed before it needed the reference (Child.finish runs once)
        for child in job:
            child.kill(9)
            child.finish(10)


@pytest.mark.slow
def test_resume_on_another_mesh_continues_the_run(work, reference):
    """Saved on data=2,fsdp=2 (4 devices) at iteration STOP, resumed to the end on fsdp=4 (4
    devices) and on 1 device: each continuation equals the uninterrupted data=2,fsdp=2 run (same
    batches, iterations and LRs exactly; losses, final params and Adam state within fp32
    reduction noise)."""
    root = work["root"]
    saved = str(root / "mesh_saved")
    _finish(_job(work, saved, REF_MESH, 4, f"stop_at_iteration={STOP}"))
    assert sorted(_per_iteration(saved)) == list(range(1, STOP + 1))
    runs = {"fsdp4": ("data=1,fsdp=4,tensor=1", 4), "one_device": ("data=1,fsdp=1,tensor=1", 1)}
    jobs = {}
    for name, (mesh, devices) in runs.items():
        shutil.copytree(saved, str(root / name))
        jobs[name] = _job(work, str(root / name), mesh, devices)
    _finish(*jobs.values())
    for name, job in jobs.items():
        _assert_resumed(job, STOP)
        _assert_continues(reference(), str(root / name))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_checkpoint_resumes_on_two_and_on_one(work, reference):
    """A 2-process job (2 x 2 devices, data=2,fsdp=2) stopped at iteration STOP, resumed to the
    end by a 2-process job and, from a copy, by 1 process (4 devices): both equal the
    uninterrupted 1-process run (exact and fp32-noise parts as in the module docstring)."""
    root = work["root"]
    two = str(root / "procs_two")
    _finish(_job(work, two, REF_MESH, 2, f"stop_at_iteration={STOP}", processes=2))
    assert sorted(_per_iteration(two)) == list(range(1, STOP + 1))
    one = str(root / "procs_one")
    shutil.copytree(two, one)
    again, single = _job(work, two, REF_MESH, 2, processes=2), _job(work, one, REF_MESH, 4)
    _finish(again, single)
    _assert_resumed(again, STOP)
    _assert_resumed(single, STOP)
    for save in (two, one):
        _assert_continues(reference(), save)


@pytest.mark.slow
def test_disk_full_during_an_array_write(work, reference):
    """ENOSPC in the write of step ENOSPC_STEP's params arrays (tests/faults/enospc_array_cpt.py):
    exit 1, one error line naming the failed write, the checkpoint a restart resumes from and
    the fix, no traceback; the previous step restores bit-identical to the uninterrupted run's
    step, and a restart with the same SAVE resumes from it and ends bit-identical to the
    uninterrupted run (same mesh and process layout, so every value is exact)."""
    save = str(work["root"] / "disk_full")
    previous = ENOSPC_STEP - SAVE_INTERVAL
    full = _job(work, save, REF_MESH, 4, argv0=[sys.executable, WRAPPER],
                FAULT_ENOSPC_STEP=str(ENOSPC_STEP))[0]
    rc = full.finish(TIMEOUT)
    assert rc == 1, full.text[-3000:]
    assert "Traceback" not in full.text, full.text[-3000:]
    errors = full.matching(r"^cpt\.py: error:")
    assert len(errors) == 1, full.text[-3000:]
    message = errors[0]
    assert "No space left on device" in message and "RESOURCE_EXHAUSTED" in message, message
    assert f"{ENOSPC_STEP}.orbax-checkpoint-tmp" in message, message  # the failed write's step
    assert f"checkpoints/{previous}, which a restart resumes from" in message, message
    assert "Free disk space" in message, message
    checkpoints = os.path.join(save, "checkpoints")
    complete = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert complete == [previous], (complete, os.listdir(checkpoints))
    done = max(_per_iteration(save))
    assert done > ENOSPC_STEP

    ref = reference()
    for name, restore in (("params", checkpoint.restore_params), ("adam", checkpoint.restore_adam)):
        want = restore(os.path.join(ref, "checkpoints", str(previous)))
        got = restore(os.path.join(checkpoints, str(previous)))
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(y, x, err_msg=name)

    again = _job(work, save, REF_MESH, 4)
    _finish(again)
    _assert_resumed(again, previous)
    _assert_continues(ref, save, exact=True)
    # Every line the failed run wrote is redone with the same values.
    records = [r for r in read_metrics(os.path.join(save, "metrics.jsonl")) if "loss" in r]
    ref_per_it = _per_iteration(ref)
    assert all(r["loss"] == ref_per_it[r["iteration"]]["loss"] for r in records)
    fh.record("fault_disk_full_array", {
        "kind": "fault", "order": 4.5,
        "title": "disk full while the params arrays of a checkpoint are written",
        "how": (f"cpt.py under a wrapper whose write of step {ENOSPC_STEP}'s first params array "
                "writes half its bytes and fails as tensorstore does on a full disk "
                "(RESOURCE_EXHAUSTED, ENOSPC) in Orbax's background write; then the same "
                "command again with room"),
        "trials": 1,
        "observed": (f"exit 1 with one line, no traceback; step {previous} intact and equal to "
                     f"the uninterrupted run's; the rerun resumed from {previous}, "
                     f"{done - previous} iterations redone; losses, params and Adam state "
                     "bit-identical to the uninterrupted run"),
        "message": message.split("error: ", 1)[1][:400],
    })


def test_known_orbax_reports_are_not_printed_and_others_are():
    """The reports that made the disk-full run above print a traceback on Python 3.12 (Orbax 0.12:
    a failed background write's callback posted to its closed asyncio loop), and those of the
    reads a failed restore abandoned (a damaged step: an error raised while a read coroutine is
    closed), are dropped by the unraisable hook cpt.py installs; any other unraisable exception
    still reaches the default, a GeneratorExit-caused one outside a coroutine included."""
    import types

    from agpt_jax import compat

    async def read():
        return None

    def raised_while_closing() -> Exception:
        try:
            try:
                raise GeneratorExit
            except GeneratorExit as closing:
                raise OSError("read abandoned") from closing
        except OSError as e:
            return e

    coroutine = read()
    seen = []
    hook = compat.quiet_known_unraisables(seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    abandoned = types.SimpleNamespace(exc_value=raised_while_closing(), object=coroutine)
    not_a_coroutine = types.SimpleNamespace(exc_value=raised_while_closing(), object=object())
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"), object=coroutine)
    for report in (closed, abandoned, not_a_coroutine, other):
        hook(report)
    coroutine.close()
    assert seen == [not_a_coroutine, other]
