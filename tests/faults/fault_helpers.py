"""Shared pieces of the fault-injection tests: a tiny corpus, cpt.py child processes that can be
watched line by line and killed, and the result records docs/reliability.md is generated from.

Results: when the environment variable RELIABILITY_RESULTS names a folder, every fault test writes
one JSON record there (`record`); scripts/reliability_table.py turns the folder into the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from agpt_jax.data import write_indexed_dataset

ROOT = pathlib.Path(__file__).resolve().parents[2]
CPT = str(ROOT / "scripts" / "cpt.py")
RESULTS_ENV = "RELIABILITY_RESULTS"
# Environment variables of the launcher that a child must not inherit from the test's shell.
LAUNCHER_VARS = ("LOAD", "SAVE", "DATA_FILE_LIST", "TRAIN_TOKENS", "TRAIN_ITERS", "TRAIN_ITER",
                 "GLOBAL_BATCH", "MICRO_BATCH", "GRAD_ACC_STEPS", "SEQ", "LR", "SAVE_INTERVAL")


def write_corpus(directory: str, seed: int = 0) -> str:
    """Writes one corpus of arithmetic token progressions and its DATA_FILE_LIST; returns the list.

    Args:
        directory: an existing folder.
        seed: the numpy seed of document lengths and starts.
    """
    rng = np.random.RandomState(seed)

    def docs(n: int):
        for _ in range(n):
            length, start = rng.randint(40, 120), rng.randint(0, 99)
            yield (start + 3 * np.arange(length)) % 97 + 1

    prefix = os.path.join(directory, "papers")
    write_indexed_dataset(prefix, docs(400), np.uint16)
    path = os.path.join(directory, "list.txt")
    with open(path, "w") as f:
        f.write(f"1.0 {prefix} papers\n")
    return path


def child_env(compilation_cache: str | None = None, devices: int = 1,
              **extra: str) -> dict[str, str]:
    """The environment of a cpt.py child: CPU, `devices` simulated devices, no launcher variables,
    jax's persistent compilation cache in `compilation_cache` (restarts do not recompile)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    if compilation_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def cpt_args(recipe: str, file_list: str, save: str, *overrides: str,
             devices: int = 1) -> list[str]:
    """argv of a smoke-scale cpt.py run with `overrides` ("key=value" config overrides)."""
    args = [sys.executable, CPT, "--config", f"configs/{recipe}.py:smoke",
            f"--num_cpu_devices={devices}", f"--config.data_file_list={file_list}",
            f"--config.save={save}", "--config.progress_bar=False"]
    return args + [f"--config.{o}" for o in overrides]


class Child:
    """A child process whose stderr and stdout lines are collected (with their arrival time) by a
    reader thread, so that a test can wait for a log line and act on it at once.

    Args:
        argv: the command.
        env: its environment.
        cwd: its working directory (the repository root by default).
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(list(argv), cwd=cwd or str(ROOT), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        """Moves arrived lines to self.lines; False once the output has ended."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120.0) -> float | None:
        """Waits until `count` lines matching `pattern` arrived; returns the time of the last one,
        or None if the process ended (or `timeout` passed) first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t, line in self.lines if regex.search(line)]
            if len(hits) >= count:
                return hits[count - 1]
            if not self._drain(0.05) and self._queue.empty():
                hits = [t for t, line in self.lines if regex.search(line)]
                return hits[count - 1] if len(hits) >= count else None
        return None

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 180.0) -> int:
        """Waits for the exit (killing the child after `timeout`) and collects every line."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._thread.join(timeout=10)
        while self._drain(0.01):
            pass
        return rc

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for _, line in self.lines if regex.search(line)]


def last_line_per_iteration(records: list[dict], key: str = "loss") -> dict[int, float]:
    """iteration -> `key` of the last metrics.jsonl record of that iteration that has `key`."""
    out = {}
    for r in records:
        if key in r:
            out[int(r["iteration"])] = r[key]
    return out


def record(name: str, result: dict) -> None:
    """Writes one result record for docs/reliability.md (when RELIABILITY_RESULTS is set).

    Args:
        name: the record's file stem (one per fault or bad-input class).
        result: JSON-able fields: "kind" ("fault" or "bad_input"), "title", "how", "trials",
            "observed" and any details.
    """
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def make_cfg(recipe: str, **over):
    """The RunConfig of configs/<recipe>.py:smoke with `over` set (in-process runs)."""
    import importlib.util

    import jax

    from agpt_jax import config as config_lib

    spec = importlib.util.spec_from_file_location(f"cfg_{recipe}",
                                                  ROOT / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config("smoke")
    cd.progress_bar = False
    for k, v in over.items():
        setattr(cd, k, v)
    return config_lib.from_config(cd, jax.device_count())


def tree_files(root: str) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file under `root` (the "no file changed" check)."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (os.path.getsize(path),
                                                    hashlib.sha256(f.read()).hexdigest())
    return out
