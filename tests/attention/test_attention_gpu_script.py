"""The prepared GPU script runs end to end on CPU (--cpu-smoke), so the one GPU run it exists for
does not fail on a Python error."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "attention_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("attention_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_checks_and_times_every_implementation(tmp_path: pathlib.Path, capsys) -> None:
    script = load_script()
    out_file = tmp_path / "results.json"
    assert script.main(["--cpu-smoke", "--iters", "1", "--json", str(out_file)]) == 0
    results = json.loads(out_file.read_text())
    impls = {"xla", "blockwise", "pallas"}
    assert {row["impl"] for row in results["checks"]} == impls
    assert all(row["ok"] for row in results["checks"])
    timed = {(t["impl"], t["forward_only"]) for t in results["timings"]}
    assert timed == {(impl, fwd) for impl in impls for fwd in (True, False)}
    assert all(t["seconds"] > 0 and t["temp_bytes"] >= 0 for t in results["timings"])
    printed = capsys.readouterr().out
    assert "| fwd+bwd | 128 | pallas |" in printed and "correctness: all passed" in printed


def test_refuses_to_time_without_a_gpu(capsys) -> None:
    """Without --cpu-smoke on a CPU machine the script exits 2 instead of timing the wrong thing."""
    assert load_script().main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
