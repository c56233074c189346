"""`converters.write_atomically`: the temporaries of killed conversions are removed by the next."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import converters


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_conversion_removes_only_dead_temporaries(tmp_path):
    dst = str(tmp_path / "out")
    host = socket.gethostname()
    dead = f"{dst}.tmp-{host}-{_dead_pid()}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = f"{dst}.tmp-{host}-{sleeper.pid}"
        other_host = f"{dst}.tmp-{host}x-{_dead_pid()}"
        for path in (dead, alive, other_host):
            os.makedirs(os.path.join(path, "part"))

        def write(tmp: str) -> None:
            assert tmp == f"{dst}.tmp-{host}-{os.getpid()}"
            with open(os.path.join(tmp, "done"), "w") as f:
                f.write("ok")

        converters.write_atomically(dst, write)
        assert os.path.isfile(os.path.join(dst, "done"))
        assert not os.path.exists(dead)
        assert os.path.isdir(alive), "a running conversion's folder must be kept"
        assert os.path.isdir(other_host), "another host's processes cannot be checked from here"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failed_write_leaves_nothing(tmp_path):
    dst = str(tmp_path / "out")

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "half"), "w") as f:
            f.write("x")
        raise KeyError("boom")

    try:
        converters.write_atomically(dst, write)
    except KeyError:
        pass
    else:
        raise AssertionError("the writer's error must propagate")
    assert os.listdir(tmp_path) == []


def test_exit_codes_bad_input_2_failed_write_1(tmp_path, capsys):
    """run_cli: an existing --save is bad input (2); a full disk while writing is a failure (1)."""
    import errno

    taken = tmp_path / "taken"
    taken.mkdir()
    assert converters.run_cli(
        lambda: converters.write_atomically(str(taken), lambda tmp: None), debug=False) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {taken}: already exists; choose a new --save path or remove it", err

    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(tmp, "shard"))

    dst = str(tmp_path / "out")
    assert converters.run_cli(lambda: converters.write_atomically(dst, full), debug=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {dst}: writing the converted checkpoint "
                                               "failed (OSError:"), err
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert converters.run_cli(lambda: open(str(tmp_path / "no_such.pt"), "rb"), debug=False) == 2
    assert "no_such.pt" in capsys.readouterr().err
