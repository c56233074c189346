"""Two processes of one job, one SIGKILLed mid-training: the survivor does not hang; it exits
non-zero with a message within DEAD_PEER_DEADLINE_S.

Both cases run at once: the worker (process 1) dies, and the coordinator (process 0, host of
jax's coordination service) dies. cpt.py runs with --heartbeat_timeout_s=HEARTBEAT_S.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

import fault_helpers as fh

HEARTBEAT_S = 10
# The stated bound: the heartbeat timeout plus the time to notice and report it.
DEAD_PEER_DEADLINE_S = HEARTBEAT_S + 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_survivor_exits_with_a_message(tmp_path):
    file_list = fh.write_corpus(str(tmp_path))
    env = fh.child_env(str(tmp_path / "jax_cache"), devices=1)
    jobs = {}
    for victim in (1, 0):
        port = _free_port()
        save = str(tmp_path / f"victim{victim}")
        jobs[victim] = [fh.Child(fh.cpt_args(
            "pretrain", file_list, save, "train_iters=100000", "save_interval=100000",
            "eval_interval=100000", "log_interval=1") + [
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}", f"--heartbeat_timeout_s={HEARTBEAT_S}"], env)
            for i in range(2)]
    rows = []
    try:
        for victim, kids in jobs.items():
            assert kids[0].wait_for(r"iteration 3 tokens", 1, 300) is not None, kids[0].text[-3000:]
            sent = time.monotonic()
            kids[victim].kill(signal.SIGKILL)
            survivor = kids[1 - victim]
            rc = survivor.finish(DEAD_PEER_DEADLINE_S + 60)
            seconds = time.monotonic() - sent
            assert rc != 0, survivor.text[-3000:]
            assert seconds < DEAD_PEER_DEADLINE_S, (seconds, survivor.text[-3000:])
            # The message says a process of the job died or failed.
            # cpt.py's error line (the failed collective, then a line on the dead process), or
            # jax's own fatal message when the coordination service itself is gone.
            said = (survivor.matching(r"^cpt\.py: error: .*(another process .*died|Gloo|"
                                      r"Connection reset)")
                    or survivor.matching(r"another task died|heartbeat timeout"))
            # Its second line comes from main() as the process leaves; when the coordinator died,
            # jax's coordination client may abort the process (SIGABRT) between the two lines.
            if said and said[0].startswith("cpt.py") and rc == 1:
                assert survivor.matching(r"^cpt\.py: process \d of 2 stops with exit code 1; "
                                         r"if another process died"), survivor.text[-3000:]
            assert said, survivor.text[-3000:]
            kids[victim].finish(10)
            rows.append((victim, rc, seconds, said[0]))
    finally:
        for kids in jobs.values():
            for k in kids:
                k.kill(signal.SIGKILL)
    for victim, rc, seconds, said in rows:
        who = "worker (process 1)" if victim else "coordinator (process 0)"
        fh.record(f"fault_dead_peer_{victim}", {
            "kind": "fault", "order": 6,
            "title": f"two processes, the {who} killed",
            "how": (f"2-process cpt.py job (1 CPU device each, --heartbeat_timeout_s={HEARTBEAT_S}"
                    f"), SIGKILL to the {who} after iteration 3; stated bound "
                    f"{DEAD_PEER_DEADLINE_S} s"),
            "trials": 1,
            "observed": f"survivor exited with code {rc} after {seconds:.1f} s",
            "message": re.sub(r"^\S+ \S+ +\d+ \S+\] ", "", said)[:300],
        })
