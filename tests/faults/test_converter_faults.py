"""Converters killed mid-write (SIGKILL) or given a full disk: --save holds nothing that looks
complete, a full disk is one line and exit 1, and running again succeeds.

The full disk is the kernel's per-file size limit (RLIMIT_FSIZE, set in the child before exec,
SIGXFSZ ignored): every write past FSIZE_LIMIT bytes fails with EFBIG inside torch, safetensors
or tensorstore, as a full filesystem fails it with ENOSPC, without needing a mount.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from agpt_jax import checkpoint
from agpt_jax import loop, runtime

import fault_helpers as fh

SEED = 1107
FSIZE_LIMIT = 16 * 1024  # bytes: below the largest tensor file of the smoke model
CONVERTERS = ("orbax_to_universal", "universal_to_orbax", "zero_to_orbax", "orbax_to_hf")
# A real DeepSpeed ZeRO-1 save (DP = 3, tests/fixtures/zero_README.md); only read.
ZERO_SOURCE = str(fh.ROOT / "tests" / "fixtures" / "zero_dp3_fp32")


def _with_file_size_limit(argv: list[str]) -> list[str]:
    """argv run by bash with SIGXFSZ ignored and RLIMIT_FSIZE set (both survive the exec)."""
    return ["bash", "-c", f"trap '' XFSZ; ulimit -f {FSIZE_LIMIT // 1024}; exec \"$@\"", "bash",
            *argv]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    rt = runtime.initialize("cpu")
    work = tmp_path_factory.mktemp("conv")
    file_list = fh.write_corpus(str(work))
    run = str(work / "run")
    loop.run(fh.make_cfg("pretrain", data_file_list=file_list, save=run, train_iters=2,
                         eval_interval=1000), rt)
    from converters import orbax_to_universal

    universal = str(work / "universal")
    assert orbax_to_universal.main(["--load", run, "--save", universal]) == 0
    return work, {"orbax_to_universal": run, "universal_to_orbax": universal,
                  "zero_to_orbax": ZERO_SOURCE, "orbax_to_hf": run}


def _argv(name: str, load: str, save: str) -> list[str]:
    return [sys.executable, "-m", f"converters.{name}", "--load", load, "--save", save]


def _looks_complete(name: str, save: str) -> bool:
    return os.path.exists(save)


def _check_output(name: str, save: str) -> None:
    if name in ("universal_to_orbax", "zero_to_orbax"):
        assert checkpoint.read_metadata(save)["format"] == checkpoint.FORMAT
    elif name == "orbax_to_universal":
        assert os.path.isfile(os.path.join(save, "latest_universal"))
    else:
        assert os.path.isfile(os.path.join(save, "config.json"))


@pytest.mark.slow
def test_converter_kill9_and_full_disk(sources, tmp_path):
    work, load = sources
    rng = random.Random(SEED)
    env = fh.child_env()
    procs = {}
    for name in CONVERTERS:
        procs[("kill", name)] = subprocess.Popen(
            _argv(name, load[name], str(tmp_path / f"kill_{name}")), cwd=str(fh.ROOT), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[("full", name)] = subprocess.Popen(
            _with_file_size_limit(_argv(name, load[name], str(tmp_path / f"full_{name}"))),
            cwd=str(fh.ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill each converter at a seeded moment once its temporary folder exists (mid-write).
    delays = {name: rng.uniform(0.0, 0.05) for name in CONVERTERS}
    killed_at = {}
    deadline = time.monotonic() + 120
    while len(killed_at) < len(CONVERTERS) and time.monotonic() < deadline:
        for name in CONVERTERS:
            if name in killed_at:
                continue
            dst = str(tmp_path / f"kill_{name}")
            if glob.glob(dst + ".tmp-*"):
                time.sleep(delays[name])
                procs[("kill", name)].kill()
                killed_at[name] = sorted(os.listdir(glob.glob(dst + ".tmp-*")[0]))
        time.sleep(0.002)
    outs = {key: p.communicate(timeout=120) for key, p in procs.items()}
    rows = {}
    for name in CONVERTERS:
        dst = str(tmp_path / f"kill_{name}")
        assert procs[("kill", name)].returncode == -signal.SIGKILL, outs[("kill", name)][1]
        assert not _looks_complete(name, dst)
        leftovers = glob.glob(dst + ".tmp-*")
        # Running again succeeds (in this process: no second interpreter start).
        from importlib import import_module

        assert import_module(f"converters.{name}").main(
            ["--load", load[name], "--save", dst]) == 0
        _check_output(name, dst)
        # ... and removes the temporary folder the killed run left.
        assert not glob.glob(dst + ".tmp-*"), glob.glob(dst + ".tmp-*")
        rows.setdefault(name, {})["kill"] = (killed_at.get(name), leftovers)

        full = str(tmp_path / f"full_{name}")
        rc = procs[("full", name)].returncode
        err = outs[("full", name)][1]
        assert rc == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        assert "writing the converted checkpoint failed" in lines[0], lines[0]
        assert "Check free disk space" in lines[0], lines[0]
        assert not os.path.exists(full) and not glob.glob(full + ".tmp-*")
        assert import_module(f"converters.{name}").main(
            ["--load", load[name], "--save", full]) == 0
        _check_output(name, full)
        rows[name]["full"] = lines[0]
    for name, row in rows.items():
        in_tmp, leftovers = row["kill"]
        fh.record(f"fault_converter_{name}", {
            "kind": "fault", "order": 5,
            "title": f"converter {name}: kill -9 mid-write, full disk",
            "how": (f"python -m converters.{name} SIGKILLed a seeded 0-50 ms after its "
                    f"temporary folder appeared (seed {SEED}); and run with a {FSIZE_LIMIT // 1024}"
                    " KiB file-size limit (writes fail with EFBIG); both then run again"),
            "trials": 2,
            "observed": (f"killed with {len(in_tmp or [])} entries in its temporary folder: "
                         f"--save absent, {len(leftovers)} DST.tmp-<host>-<pid> left, rerun "
                         "succeeded and removed it; "
                         "full disk: exit 1, one line, nothing at --save or .tmp, rerun "
                         "succeeded"),
            "message": row["full"][:300],
        })
