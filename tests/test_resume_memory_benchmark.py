"""benchmarks/resume_memory.py at smoke scale: it resumes, and its JSON line is consistent.

The expected state size is derived here from the model preset's parameter count (fp32 params + Adam
mu + nu = 12 bytes a parameter, plus a few scalar counters), not from the benchmark's own figures.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from agpt_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "resume_memory.py"


@pytest.mark.slow  # 25-30 s on 2 cores: two compiles of the smoke step
def test_resume_memory_benchmark_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, str(BENCH), "--scale", "smoke", "--iters", "1",
                          "--resumes", "2", "--nowith_7b", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])  # the LAST line is the JSON object
    assert r["scale"] == "smoke" and r["devices"] == 1 and r["jax_version"] == jax.__version__
    n = model_lib.get_preset("tiny").num_params()  # the smoke scale's model (agpt_jax/recipes.py)
    assert r["num_params"] == n
    assert r["params_bytes"] == r["mu_bytes"] == r["nu_bytes"] == 4 * n
    # step, Adam count, LR count (int32) and the clip norm (fp32): 16 bytes.
    assert r["counter_bytes"] == 16
    assert r["state_bytes"] == 12 * n + 16
    assert r["peak_over_state"] == r["peak_rss_bytes"] / r["state_bytes"]
    # Two resumes of the same step; the reported one is the lower median of the two.
    assert r["resumes"] == 2 and min(r["peak_over_state_of_each"]) == r["peak_over_state"]
    # The peak is the larger of the two readings; either can miss what the other saw.
    readings = {"sampled": r["sampled_peak_rss_bytes"], "VmHWM": r["hwm_peak_rss_bytes"]}
    seen = {k: v for k, v in readings.items() if v is not None}
    assert r["peak_rss_bytes"] == max(seen.values()) == seen[r["peak_source"]]
    assert r["peak_rss_bytes"] >= 0 and r["baseline_rss_bytes"] > 0
    assert 0 < r["window_s"] <= r["resume_run_s"] and r["samples"] >= 1
    assert r["events"][-1][3].startswith("training iterations 2..2 of 2"), r["events"][-1]
    assert "xla_peak_over_state" not in r
    assert list(tmp_path.iterdir()) == []  # the temporary SAVE and corpora are removed
