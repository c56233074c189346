"""Resume-memory benchmark: the host memory a run costs to bring its state back from a checkpoint.

A run started again with the same SAVE resumes from its newest checkpoint (agpt_jax/loop.py). This
measures what that costs in resident memory, relative to the size of the state it brings back
(fp32 params + Adam mu + nu + the counters: 12 bytes a parameter), through loop.run alone, so the
figure stays comparable whatever loop.run does inside:

1. One process, CPU, `--devices` simulated devices. A first `loop.run` trains the pretrain recipe at
   `--scale` (demo by default: configs/pretrain.py:demo, the `demo` model preset) for `--iters`
   iterations on tiny synthetic corpora (agpt_jax.data.write_indexed_dataset) and saves a
   checkpoint at the end (stop_at_iteration), into a temporary SAVE. eval_iters=0.
2. In the same process (the compiled step is cached, the allocator is warm), a second `loop.run`
   with the same SAVE and stop_at_iteration one later resumes from that checkpoint. train_iters is
   the same in both runs (the first one stops early), so the LR schedule, hence the compiled step,
   is the same and is not compiled again. Resident memory (/proc/self/statm, resident pages x page
   size) is sampled by a background thread every `--sample_ms`, and the kernel's own high-water
   mark (VmHWM in /proc/self/status) is reset (`echo 5 > /proc/self/clear_refs`) right before the
   second run. The window is from entering the second `loop.run` until it logs "training
   iterations A..B of N" (after the state is restored and before the first step): a logging
   handler reads the sampled peak and VmHWM when that record is emitted.
   Baseline = RSS right before the second loop.run. peak_rss_bytes = the peak RSS in the window
   minus the baseline: the INCREASE, not the process's total. It is the larger of the kernel's
   VmHWM (where clear_refs works) and the sampled peak (`peak_source` says which; both are
   printed): the kernel's mark sees what falls between samples, but the kernel keeps RSS in
   per-CPU counters and its mark can lag what statm reads by a few dozen pages (a sample 200 KB
   above it was seen at smoke scale, once the restore's trims made RSS fall and rise again).
   state_bytes = the byte size of the state as restored, from the model config: the leaves of
   jax.eval_shape of the params (1x) and of the optimizer's init on them (mu, nu: 2x; plus the
   clip/Adam/LR counters) and the step counter, at their dtypes. peak_over_state = peak_rss_bytes / state_bytes. On CPU every simulated device's
   shard lives in this one process, so the whole state counts, whatever `--devices`.
   The resume is repeated `--resumes` times (5), each restoring the same checkpoint (the step
   the previous one saved is removed first); the figures printed are those of the resume with
   the median peak_over_state, and `peak_over_state_of_each` lists all of them.
3. XLA's side, for the 7B plan on its default mesh (`python -m agpt_jax.plan --model agpt_7b
   --json` in a child process: fsdp=-1 on 1 simulated device, seq 4096, micro-batch 1): per device,
   the state bytes (as above for the agpt_7b preset, / devices) and the compiled step's argument,
   output, temp and alias bytes; xla_peak_over_state = (argument + output + temp - alias) / state
   bytes per device. 15-45 s on 2 cores (compile 12-40 s); `--nowith_7b` skips it.

What the figure can and cannot see: RSS counts pages touched and not yet returned, so memory the
first run freed but glibc kept would be reused without showing (the warm allocator of a
long-lived process: 0.2 to 1.8 for the same code at demo scale), which is why each resume starts
after `hostmem.release_free_heap()`; and with transparent huge pages RSS moves in 2 MiB steps, so
at demo scale (a 14.45 MiB state) single resumes still spread by about +-0.15, hence the median
of five. `--model bench_125m` (a 1.4 GiB state, ~1.5 min) gives a steadier figure. `--trace FILE`
writes every sample and log record.

The process starts with the huge-page malloc tunable, as scripts/cpt.py does (agpt_jax/hostmem.py;
AGPT_JAX_MALLOC=system for glibc's defaults). Printed: a table (quantity, bytes, MiB), the log
records of the window with the RSS at each, and as the LAST line of stdout one JSON object.

    python benchmarks/resume_memory.py                    # demo scale, 1 device, 40-95 s on 2 cores
    python benchmarks/resume_memory.py --devices 4        # the same state sharded over 4 devices
    python benchmarks/resume_memory.py --scale smoke --nowith_7b      # tiny model, ~15 s
    python benchmarks/resume_memory.py --model bench_125m # a bigger state at the demo's batch/seq

Over 400 lines on purpose: one measurement and what it needs beside it (the memory readers, the
sampler thread, the two runs, the 7B plan's XLA figure and the report), which nothing else uses.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging as pylogging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from absl import app, flags, logging

from agpt_jax import hostmem  # imports nothing heavy

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCALE = flags.DEFINE_enum("scale", "demo", ["demo", "smoke"], "configs/pretrain.py scale")
_MODEL = flags.DEFINE_string("model", "", "model preset instead of the scale's (e.g. bench_125m)")
_DEVICES = flags.DEFINE_integer("devices", 1, "simulated CPU devices", lower_bound=1)
_ITERS = flags.DEFINE_integer("iters", 3, "iterations of the first run (then one resumed)",
                              lower_bound=1)
_RESUMES = flags.DEFINE_integer("resumes", 5, "resumes of the same checkpoint, one after the "
                                "other in the process; the median's figures are reported",
                                lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 0, "sequence length (0 = the scale's)")
_SAMPLE_MS = flags.DEFINE_float("sample_ms", 1.0, "RSS sampling period (ms)")
_WITH_7B = flags.DEFINE_bool("with_7b", True, "also XLA's memory analysis of the 7B plan")
_WORKDIR = flags.DEFINE_string("workdir", "", "where the temporary SAVE and corpora go")
_KEEP = flags.DEFINE_bool("keep", False, "keep the temporary folder")
_VERBOSE = flags.DEFINE_bool("verbose", False, "print the runs' INFO logs to stderr")
_TRACE = flags.DEFINE_string("trace", "", "write every RSS sample of the resumed run and every "
                             "log record to this CSV (s, RSS increase bytes, message)")

MARKER = "training iterations"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20


# ------------------------------------------------------------------------------------------------
# Memory readers.


def rss_bytes() -> int:
    """Resident set size of this process: /proc/self/statm field 2 x page size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else None


def reset_hwm() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _status_kib("VmHWM")
    return hwm is not None and hwm * 1024 <= rss_bytes() + 64 * MiB


def hwm_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


class Sampler:
    """Background thread: RSS every `period_s`, keeping the peak and when it happened."""

    def __init__(self, period_s: float, keep: bool = False):
        self.period_s = period_s
        self.series: list[tuple[float, int]] | None = [] if keep else None
        self.peak, self.peak_t, self.n = 0, 0.0, 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def read(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * PAGE

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.read()
            self.n += 1
            if self.series is not None:
                self.series.append((time.perf_counter() - self.t0, rss))
            if rss > self.peak:
                self.peak, self.peak_t = rss, time.perf_counter() - self.t0
            time.sleep(self.period_s)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.peak = self.read()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


class WindowHandler(pylogging.Handler):
    """Notes every log record of the window with the RSS then; freezes the window's figures at the
    first record whose message starts with MARKER."""

    def __init__(self, sampler: Sampler):
        super().__init__(level=pylogging.DEBUG)
        self.sampler = sampler
        self.events: list[tuple[float, int, str, str]] = []
        self.marker: dict[str, Any] | None = None

    def emit(self, record: pylogging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to fail on
            return
        now = time.perf_counter() - self.sampler.t0
        rss = self.sampler.read()
        self.events.append((now, rss, os.path.basename(record.pathname or ""),
                            msg.splitlines()[0][:90] if msg else ""))
        if self.marker is None and msg.startswith(MARKER):
            self.marker = {"t": now, "rss": rss, "sampled_peak": max(self.sampler.peak, rss),
                           "sampled_peak_t": self.sampler.peak_t, "hwm": hwm_bytes(),
                           "samples": self.sampler.n, "message": msg}


# ------------------------------------------------------------------------------------------------
# The runs.


def write_corpora(directory: str, docs: int) -> str:
    """Two corpora of arithmetic token progressions (as tests/test_cpt.py) and their list."""
    import numpy as np

    from agpt_jax.data import write_indexed_dataset

    rng = np.random.RandomState(0)

    def gen(step: int):
        for _ in range(docs):
            length, start = rng.randint(40, 120), rng.randint(0, 99)
            yield (start + step * np.arange(length)) % 97 + 1

    write_indexed_dataset(os.path.join(directory, "papers"), gen(3), np.uint16)
    write_indexed_dataset(os.path.join(directory, "web"), gen(7), np.uint16)
    path = os.path.join(directory, "mix.txt")
    with open(path, "w") as f:
        f.write(f"0.9 {directory}/papers papers\n0.1 {directory}/web web\n")
    return path


def load_recipe(scale: str):
    spec = importlib.util.spec_from_file_location("resume_memory_pretrain",
                                                  ROOT / "configs" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(scale, environ={})  # no launcher variable leaks in


def make_cfg(scale: str, device_count: int, **over):
    from agpt_jax import config as config_lib

    cd = load_recipe(scale)
    cd.progress_bar = False
    for k, v in over.items():
        setattr(cd, k, v)
    return config_lib.from_config(cd, device_count)


def state_sizes(model_cfg, optim_cfg, schedule_cfg) -> dict[str, int]:
    """Bytes of the train state as restored, from the model config (no array is allocated):
    params, Adam mu and nu, and every scalar counter (step, Adam count, LR count, clip norm)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from agpt_jax import model as model_lib
    from agpt_jax import optim, schedules

    params = nn.unbox(jax.eval_shape(lambda: model_lib.init_params(model_cfg,
                                                                   jax.random.PRNGKey(0))))
    tx = optim.make_optimizer(optim_cfg, schedules.make_schedule(schedule_cfg))
    opt = jax.eval_shape(tx.init, params)
    nbytes = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    p = nbytes(params)
    mu, nu = nbytes(opt["adam"].mu), nbytes(opt["adam"].nu)
    counters = nbytes(opt) - mu - nu + jnp.dtype(jnp.int32).itemsize  # + TrainState.step
    return {"params": p, "mu": mu, "nu": nu, "counters": counters,
            "total": p + mu + nu + counters, "num_params": model_cfg.num_params()}


def plan_7b() -> dict[str, Any]:
    """agpt_jax.plan's JSON for the 7B on its default mesh, in a child process (its own devices)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "agpt_jax.plan", "--model", "agpt_7b", "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - start
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, 1) or not lines:  # 1: does not fit the 64 GB budget, still a plan
        raise RuntimeError(f"agpt_jax.plan failed (exit {out.returncode}): {out.stderr[-2000:]}")
    plan = json.loads(lines[-1])
    plan["wall_s"] = wall
    return plan


def write_trace(path: str, series, events, baseline: int) -> None:
    rows = [(t, rss - baseline, "") for t, rss in series]
    rows += [(t, rss - baseline, f"{where}: {msg}") for t, rss, where, msg in events]
    with open(path, "w") as f:
        f.write("s,rss_increase_bytes,record\n")
        for t, rss, msg in sorted(rows, key=lambda r: r[0]):
            f.write(f"{t:.4f},{rss},{json.dumps(msg) if msg else ''}\n")


def measure() -> dict[str, Any]:
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={_DEVICES.value}"])
    import jax

    from agpt_jax import loop, runtime

    rt = runtime.initialize("cpu", num_cpu_devices=_DEVICES.value)
    devices = jax.device_count()
    work = tempfile.mkdtemp(prefix="resume_memory_", dir=_WORKDIR.value or None)
    try:
        started = time.perf_counter()
        over: dict[str, Any] = {"eval_iters": 0, "train_iters": _ITERS.value + 1}
        if _MODEL.value:
            over["model"] = _MODEL.value
        if _SEQ.value:
            over["seq_length"] = _SEQ.value
        cd = load_recipe(_SCALE.value)
        tokens = ((_ITERS.value + 1) * cd.micro_batch * cd.grad_acc_steps * devices
                  * (_SEQ.value or cd.seq_length))
        data_list = write_corpora(work, docs=max(300, int(1.5 * tokens / 80) + 1))
        save = os.path.join(work, "save")
        over.update(data_file_list=data_list, save=save, save_interval=_ITERS.value + 1)
        cfg1 = make_cfg(_SCALE.value, devices, stop_at_iteration=_ITERS.value, **over)
        cfg2 = make_cfg(_SCALE.value, devices, stop_at_iteration=_ITERS.value + 1, **over)
        first = loop.run(cfg1, rt)
        if first.checkpoint is None or first.last_iteration != _ITERS.value:
            raise RuntimeError(f"the first run did not save iteration {_ITERS.value}: {first}")
        first_s = time.perf_counter() - started

        sizes = state_sizes(cfg2.model, cfg2.optim, cfg2.schedule)
        del first
        runs = []
        for i in range(_RESUMES.value):
            runs.append(_resume_once(loop, cfg2, rt, sizes["total"]))
            if i + 1 < _RESUMES.value:  # the next resume restores the same step again
                shutil.rmtree(os.path.join(save, "checkpoints", str(_ITERS.value + 1)))
        # The resume with the median peak_over_state stands for all (RSS moves in 2 MiB huge
        # pages and with what the warm allocator kept, so one resume of a small state is coarse).
        result = dict(sorted(runs, key=lambda r: r["peak_over_state"])[(len(runs) - 1) // 2])
        result.update({
            "resumes": len(runs),
            "peak_over_state_of_each": [r["peak_over_state"] for r in runs],
            "state_bytes_from": "jax.eval_shape of params and optimizer init (model config)",
            "params_bytes": sizes["params"], "mu_bytes": sizes["mu"], "nu_bytes": sizes["nu"],
            "counter_bytes": sizes["counters"], "num_params": sizes["num_params"],
            "first_run_s": first_s,
            "scale": _SCALE.value, "model": _MODEL.value or load_recipe(_SCALE.value).model,
            "seq_length": cfg2.batch.seq_length, "global_batch": cfg2.batch.global_batch_size,
            "devices": devices, "jax_version": jax.__version__,
            "python": sys.version.split()[0], "malloc": hostmem.status(),
        })
        return result
    finally:
        if _KEEP.value:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _resume_once(loop, cfg, rt, state: int) -> dict[str, Any]:
    """One resuming `loop.run` of `cfg` (from the newest checkpoint, one iteration), measured."""
    gc.collect()
    # What the first run freed goes back to the kernel, so that what the resume reuses of it is
    # faulted in again and shows in RSS.
    hostmem.release_free_heap()
    sampler = Sampler(_SAMPLE_MS.value / 1000, keep=bool(_TRACE.value))
    handler = WindowHandler(sampler)
    root = pylogging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level, pylogging.INFO) if old_level else pylogging.INFO)
    hwm_ok = reset_hwm()
    baseline = rss_bytes()
    sampler.start()
    try:
        second = loop.run(cfg, rt)
    finally:
        sampler.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)
    resume_s = time.perf_counter() - sampler.t0
    whole_hwm = hwm_bytes() if hwm_ok else None
    if second.start_iteration != _ITERS.value or second.last_iteration != _ITERS.value + 1:
        raise RuntimeError(f"the resumed run did not resume at {_ITERS.value}: {second}")
    if _TRACE.value:  # the last resume's
        write_trace(_TRACE.value, sampler.series, handler.events, baseline)
    mark = handler.marker
    if mark is None:
        raise RuntimeError(f"the resumed run logged no record starting with {MARKER!r}; "
                           "the window has no end")
    sampled = mark["sampled_peak"] - baseline
    hwm = mark["hwm"] - baseline if hwm_ok and mark["hwm"] is not None else None
    peak = max(sampled, hwm if hwm is not None else sampled)
    return {
        "peak_rss_bytes": int(peak),
        "peak_rss_is": "increase over baseline_rss_bytes, in the window from entering the "
                       "resuming loop.run to its 'training iterations' log line",
        "peak_source": "VmHWM" if hwm is not None and hwm >= sampled else "sampled",
        "sampled_peak_rss_bytes": int(sampled),
        "hwm_peak_rss_bytes": None if hwm is None else int(hwm),
        "state_bytes": int(state),
        "peak_over_state": peak / state,
        "baseline_rss_bytes": int(baseline),
        "rss_at_marker_bytes": int(mark["rss"] - baseline),
        "whole_resume_peak_rss_bytes": None if whole_hwm is None else int(whole_hwm - baseline),
        "window_s": mark["t"], "sampled_peak_at_s": mark["sampled_peak_t"],
        "samples": mark["samples"], "resume_run_s": resume_s,
        "events": _notable(handler.events, mark["t"], baseline, state),
    }


def _notable(events, end: float, baseline: int, state: int) -> list[list]:
    """The window's records from agpt_jax's own files, and any other after which RSS had moved by
    at least 2 % of the state since the last one kept: [s, RSS increase, file, message]."""
    kept, last = [], 0
    for t, rss, where, msg in events:
        if t > end:
            break
        ours = where in _OUR_FILES
        if ours or abs(rss - baseline - last) >= 0.02 * state:
            kept.append([round(t, 4), int(rss - baseline), where, msg])
            last = rss - baseline
    return kept


_OUR_FILES = {p.name for p in (ROOT / "agpt_jax").rglob("*.py")}


def add_7b(result: dict[str, Any]) -> None:
    from agpt_jax import model as model_lib
    from agpt_jax import optim, schedules

    plan = plan_7b()
    # The optimizer state's shapes do not depend on its hyper-parameters or the schedule.
    sizes = state_sizes(model_lib.get_preset("agpt_7b"), optim.OptimConfig(),
                        schedules.ScheduleConfig(train_iters=1000, global_batch_size=1))
    assert plan["params"] == model_lib.get_preset("agpt_7b").num_params() == sizes["num_params"]
    # Sharded over the mesh; on the default mesh (1 device) this is exact. Counters replicate.
    per_device = (sizes["params"] + sizes["mu"] + sizes["nu"]) // plan["devices"] + sizes[
        "counters"]
    xla_peak = plan["argument_bytes"] + plan["output_bytes"] + plan["temp_bytes"] - plan[
        "alias_bytes"]
    result.update({
        "7b_mesh": plan["mesh"], "7b_devices": plan["devices"], "7b_params": plan["params"],
        "7b_seq_length": plan["seq_length"], "7b_global_batch": plan["global_batch_size"],
        "7b_state_bytes_per_device": int(per_device),
        "7b_argument_bytes": plan["argument_bytes"], "7b_output_bytes": plan["output_bytes"],
        "7b_temp_bytes": plan["temp_bytes"], "7b_alias_bytes": plan["alias_bytes"],
        "7b_xla_peak_bytes": int(xla_peak), "xla_peak_over_state": xla_peak / per_device,
        "7b_compile_s": plan["compile_s"], "7b_plan_wall_s": plan["wall_s"],
    })


def print_report(r: dict[str, Any]) -> None:
    print(f"resume memory: {r['scale']} scale (model {r['model']}, {r['num_params']:,} params, "
          f"seq {r['seq_length']}, global batch {r['global_batch']}), {r['devices']} CPU "
          f"device(s), jax {r['jax_version']}, python {r['python']}; {r['malloc']}")
    print(f"window: entering the resuming loop.run -> its '{MARKER}' line, {r['window_s']:.3f} s, "
          f"{r['samples']} RSS samples; increases are over the baseline RSS")
    print()
    rows = [
        ("baseline RSS (before the resuming loop.run)", r["baseline_rss_bytes"]),
        ("peak RSS increase in the window (" + r["peak_source"] + ")", r["peak_rss_bytes"]),
        ("  sampled peak increase", r["sampled_peak_rss_bytes"]),
        ("  kernel VmHWM peak increase", r["hwm_peak_rss_bytes"]),
        ("RSS increase at the 'training iterations' line", r["rss_at_marker_bytes"]),
        ("peak RSS increase, whole resumed run (+1 step, save)", r["whole_resume_peak_rss_bytes"]),
        ("state: params", r["params_bytes"]),
        ("state: Adam mu", r["mu_bytes"]),
        ("state: Adam nu", r["nu_bytes"]),
        ("state: counters (step, Adam, LR, clip)", r["counter_bytes"]),
        ("state total", r["state_bytes"]),
    ]
    if "xla_peak_over_state" in r:
        rows += [
            (f"7B plan state per device ({r['7b_devices']} device(s))",
             r["7b_state_bytes_per_device"]),
            ("7B plan XLA argument bytes per device", r["7b_argument_bytes"]),
            ("7B plan XLA output bytes per device", r["7b_output_bytes"]),
            ("7B plan XLA temp bytes per device", r["7b_temp_bytes"]),
            ("7B plan XLA alias bytes per device", r["7b_alias_bytes"]),
            ("7B plan XLA peak (arg + out + temp - alias)", r["7b_xla_peak_bytes"]),
        ]
    print(f"| {'quantity':54s} | {'bytes':>15s} | {'MiB':>11s} |")
    print(f"|{'-' * 56}|{'-' * 17}|{'-' * 13}|")
    for name, value in rows:
        if value is None:
            print(f"| {name:54s} | {'n/a':>15s} | {'n/a':>11s} |")
        else:
            print(f"| {name:54s} | {value:15,d} | {value / MiB:11.2f} |")
    print()
    each = ", ".join(f"{x:.3f}" for x in r["peak_over_state_of_each"])
    print(f"peak_over_state = {r['peak_over_state']:.3f} (peak RSS increase / state bytes; the "
          f"median of {r['resumes']} resume(s): {each}; the table and the records are its)")
    if "xla_peak_over_state" in r:
        print(f"xla_peak_over_state = {r['xla_peak_over_state']:.3f} (7B step on "
              f"{r['7b_mesh']}, seq {r['7b_seq_length']}; compile {r['7b_compile_s']:.1f} s, "
              f"plan {r['7b_plan_wall_s']:.1f} s)")
    print()
    print("log records of the window: agpt_jax's, and others after which RSS had moved by >= 2 % "
          "of the state\n(s since entering loop.run, RSS increase MiB, file: message):")
    print(f"  {0:8.3f} {0:9.2f}  (entering loop.run)")
    for t, rss, where, msg in r["events"]:
        print(f"  {t:8.3f} {rss / MiB:9.2f}  {where}: {msg}")
    print(f"  sampled peak at {r['sampled_peak_at_s']:.3f} s")
    print(f"first run {r['first_run_s']:.1f} s (compiles the step); resumed run "
          f"{r['resume_run_s']:.1f} s")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)  # the marker is an INFO record
    if not _VERBOSE.value:
        logging.get_absl_handler().addFilter(lambda r: r.levelno >= pylogging.WARNING)
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    start = time.perf_counter()
    result = measure()
    if _WITH_7B.value:
        add_7b(result)
    result["total_s"] = time.perf_counter() - start
    print_report(result)
    print(f"total {result['total_s']:.1f} s")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()  # as scripts/cpt.py starts: glibc reads it at start-up
    app.run(main)
