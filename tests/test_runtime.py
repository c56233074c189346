"""Tests of agpt_jax.runtime: mesh construction, launcher detection, multi-process start-up, the
platform capabilities."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from agpt_jax import compat, metrics, runtime, xpu
from agpt_jax.runtime import MeshConfig, make_mesh, parse_mesh


# --------------------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (MeshConfig(data=8, fsdp=1, tensor=1), (8, 1, 1)),
        (MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(), (1, 8, 1)),
        (MeshConfig(data=2, fsdp=1, tensor=-1), (2, 1, 4)),
        (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    ],
)
def test_make_mesh_shapes_cover_every_device_once(cfg, shape):
    devices = jax.devices()
    assert len(devices) == 8, "conftest should give 8 simulated CPU devices"
    mesh = make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == shape
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    # tensor innermost: each tensor group is a run of neighbouring devices in jax's order.
    order = {d.id: i for i, d in enumerate(devices)}
    for group in mesh.devices.reshape(-1, shape[-1]):
        positions = [order[d.id] for d in group]
        assert positions == list(range(positions[0], positions[0] + len(positions)))


def test_make_mesh_on_a_subset_of_devices():
    devices = jax.devices()[:4]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices)
    assert mesh.devices.shape == (1, 2, 2)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


def test_make_mesh_shards_an_array_along_named_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    y = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    assert {s.data.shape for s in y.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(y), x)


def test_make_mesh_mismatch_names_sizes_count_and_fix():
    with pytest.raises(ValueError) as err:
        make_mesh(MeshConfig(data=2, fsdp=3, tensor=1))
    msg = str(err.value)
    assert "2 x 3 x 1 = 6" in msg and "8 devices" in msg
    # The suggested fix must itself work.
    fix = msg.split("--mesh=")[1].split()[0]
    assert make_mesh(parse_mesh(fix)).devices.size == 8


def test_make_mesh_fill_that_cannot_divide():
    with pytest.raises(ValueError, match=r"fsdp=-1 cannot fill 8 devices.*multiply to 3"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fsdp=12", MeshConfig(data=1, fsdp=12, tensor=1)),
        ("data=2,fsdp=4,tensor=1", MeshConfig(2, 4, 1)),
        (" tensor = 2 , data=-1 ,fsdp=1", MeshConfig(-1, 1, 2)),
        ("data=2", MeshConfig(data=2, fsdp=-1, tensor=1)),
        ("", MeshConfig()),
    ],
)
def test_parse_mesh(spec, expected):
    assert parse_mesh(spec) == expected
    assert parse_mesh(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("fsdp:4", "'fsdp:4' is not of the form axis=size"),
        ("pipeline=2", "unknown axis 'pipeline'"),
        ("fsdp=four", "size 'four' of axis 'fsdp' is not an integer"),
        ("fsdp=2,fsdp=4", "axis 'fsdp' is given twice"),
        ("data=0", "data=0 is invalid"),
        ("data=-2", "data=-2 is invalid"),
        ("data=-1,fsdp=-1", "more than one axis set to -1"),
    ],
)
def test_parse_mesh_errors_name_the_bad_part(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_mesh(spec)
    assert fragment in str(err.value)
    assert repr(spec) in str(err.value)


def test_mesh_config_rejects_non_integers():
    with pytest.raises(ValueError, match="tensor=2.0 is invalid"):
        MeshConfig(tensor=2.0)  # type: ignore[arg-type]
    assert runtime.MESH_AXES == ("data", "fsdp", "tensor")


# --------------------------------------------------------------------------- launcher detection


@pytest.mark.parametrize(
    "environ, expected",
    [
        # Aurora's mpiexec (Cray PALS): PALS ranks, PMI world size; coordinator from MASTER_*.
        ({"PALS_RANKID": "3", "PALS_LOCAL_RANKID": "1", "PMI_RANK": "3", "PMI_SIZE": "24",
          "MASTER_ADDR": "x4102c5s0b0n0", "MASTER_PORT": "29500"},
         ("x4102c5s0b0n0:29500", 24, 3)),
        # MPICH / Intel MPI Hydra.
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "JAX_COORDINATOR_ADDRESS": "10.0.0.7:1234"},
         ("10.0.0.7:1234", 2, 1)),
        # Open MPI.
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
          "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "7000"},
         ("head:7000", 8, 5)),
        # srun: the step's task count wins over the allocation's; host from the step node list,
        # port from the job id (61440 + 123456 % 4096 = 61440 + 576).
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "4",
          "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "nid[001-003,007],login1"},
         ("nid001:62016", 4, 2)),
        # JAX_COORDINATOR_ADDRESS takes precedence over MASTER_ADDR.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9",
          "SLURM_JOB_NODELIST": "a1,b2", "MASTER_ADDR": "m", "MASTER_PORT": "1",
          "JAX_COORDINATOR_ADDRESS": "c:2"},
         ("c:2", 2, 0)),
        # Slurm node list with MASTER_PORT but no MASTER_ADDR: host from the list.
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu-[12-13]",
          "MASTER_PORT": "4242"},
         ("gpu-12:4242", 2, 1)),
    ],
)
def test_distributed_from_env_for_each_launcher(environ, expected):
    cfg = runtime.distributed_from_env(environ)
    assert cfg is not None
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == expected
    assert cfg.local_device_ids is None


def test_distributed_from_env_pbs_nodefile(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x4000c0s1b0n0.hsn.cm.aurora\nx4000c0s2b0n0.hsn.cm.aurora\n")
    environ = {"PALS_RANKID": "1", "PMI_SIZE": "2", "PBS_NODEFILE": str(nodefile),
               "PBS_JOBID": "4242.aurora-pbs-0001"}
    cfg = runtime.distributed_from_env(environ)
    assert cfg.coordinator_address == f"x4000c0s1b0n0.hsn.cm.aurora:{61440 + 4242 % 4096}"
    assert (cfg.num_processes, cfg.process_id) == (2, 1)


@pytest.mark.parametrize(
    "environ",
    [{}, {"PATH": "/usr/bin"}, {"PMI_RANK": "0", "PMI_SIZE": "1"},
     {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}],
)
def test_distributed_from_env_single_process_is_none(environ):
    assert runtime.distributed_from_env(environ) is None


@pytest.mark.parametrize(
    "environ, fragments",
    [
        ({"PMI_RANK": "0", "PMI_SIZE": "4"},
         ["PMI launcher", "PMI_SIZE=4", "JAX_COORDINATOR_ADDRESS", "MASTER_ADDR"]),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h"},
         ["Open MPI", "MASTER_PORT is not"]),
        ({"PALS_RANKID": "0"}, ["PALS launcher", "PMI_SIZE", "num_processes"]),
        ({"PMI_RANK": "4", "PMI_SIZE": "4"}, ["PMI_RANK=4 is not a rank in [0, PMI_SIZE=4)"]),
        ({"PMI_RANK": "x", "PMI_SIZE": "4"}, ["PMI_RANK='x' is not an integer"]),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "JAX_COORDINATOR_ADDRESS": "nohost"},
         ["JAX_COORDINATOR_ADDRESS='nohost' is not of the form host:port"]),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
         ["coordinator host n1", "no MASTER_PORT and no job id"]),
    ],
)
def test_distributed_from_env_errors_say_what_is_missing(environ, fragments):
    with pytest.raises(ValueError) as err:
        runtime.distributed_from_env(environ)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_explicit_fields_are_completed_from_the_launcher():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    partial = runtime.DistributedConfig(coordinator_address="c:9")
    cfg = runtime._complete_distributed(partial, env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("c:9", 2, 1)
    # One explicit process needs nothing else.
    assert runtime._complete_distributed(runtime.DistributedConfig(num_processes=1), {}) is None
    with pytest.raises(ValueError, match="process_id is not given"):
        runtime._complete_distributed(
            runtime.DistributedConfig(coordinator_address="c:9", num_processes=2), {})
    with pytest.raises(ValueError, match="coordinator_address is not given"):
        runtime._complete_distributed(runtime.DistributedConfig(num_processes=2, process_id=0), {})


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"coordinator_address": "host"}, "coordinator_address='host' is not of the form"),
        ({"num_processes": 0}, "num_processes=0"),
        ({"num_processes": 2, "process_id": 2}, "process_id=2 must be smaller"),
        ({"initialization_timeout_s": 0}, "initialization_timeout_s=0"),
    ],
)
def test_distributed_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        runtime.DistributedConfig(**kwargs)


# --------------------------------------------------------------------------- runtime in-process


_LAUNCHER_PREFIXES = ("PALS_", "PMI_", "OMPI_", "SLURM_", "PBS_", "MASTER_", "JAX_COORDINATOR")


def _no_launcher_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)


def test_initialize_cpu_single_process(monkeypatch):
    _no_launcher_env(monkeypatch)
    rt = runtime.initialize("cpu")
    assert rt.platform == "cpu" and rt.jax_platform == "cpu"
    assert (rt.process_index, rt.process_count) == (0, 1)
    assert rt.local_device_count == rt.device_count == len(jax.devices()) == 8
    assert rt.default_attention == "xla"
    assert rt.supports_donation and rt.supports_host_callbacks and rt.is_main_process
    assert rt.workarounds == ()
    assert runtime.initialize() is rt and runtime.initialize("cpu") is rt
    assert runtime.current_runtime() is rt
    with pytest.raises(RuntimeError, match="cannot change platform='xpu'"):
        runtime.initialize("xpu")
    with pytest.raises(RuntimeError, match="num_cpu_devices=2"):
        runtime.initialize("cpu", num_cpu_devices=2)
    with pytest.raises(ValueError, match="platform='metal' is not one of auto, xpu, cpu"):
        runtime.initialize("metal")


def test_the_runtime_resolves_its_capabilities_once(monkeypatch):
    """On CPU the runtime's capabilities are the table's; the old fields read them."""
    _no_launcher_env(monkeypatch)
    rt = runtime.initialize("cpu")
    caps = rt.capabilities
    assert caps == runtime.capabilities_for("cpu") and caps.platform == rt.platform
    assert (rt.default_attention, rt.supports_donation, rt.supports_host_callbacks) == (
        caps.default_attention, caps.supports_donation, caps.supports_host_callbacks)
    assert caps.copy_before_async_save and not caps.accelerator and caps.pallas_interpret
    assert caps.xla_flags == compat.CPU_XLA_FLAGS == runtime.CPU_XLA_FLAGS
    assert "attention=xla donation=True host_callbacks=True" in rt.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.peak_tflops_per_device = 1.0  # type: ignore[misc]


def test_capabilities_table():
    """What each named target can do, without starting anything (plan.py plans an XPU job on CPU)."""
    table = {name: runtime.capabilities_for(name) for name in runtime.TARGET_PLATFORMS}
    assert runtime.TARGET_PLATFORMS == ("cpu", "gpu", "xpu", "tpu")
    assert all(caps.platform == name for name, caps in table.items())
    assert len(set(table.values())) == 4  # hashable, and no two alike
    cpu, gpu, xpu_, tpu = (table[n] for n in runtime.TARGET_PLATFORMS)
    assert [c.default_attention for c in (cpu, gpu, xpu_, tpu)] == ["xla", "pallas", "blockwise",
                                                                    "xla"]
    assert [c.blockwise_block for c in (cpu, gpu, xpu_, tpu)] == [256, 512, 512, 512]
    assert [c.blockwise_split_single_block for c in (cpu, gpu, xpu_, tpu)] == [True] + [False] * 3
    assert [c.pallas_interpret for c in (cpu, gpu, xpu_, tpu)] == [True, False, True, True]
    # metrics' MFU denominators: 416 TFLOP/s bf16 per Max 1550 stack, no figure elsewhere.
    assert [c.peak_tflops_per_device for c in (cpu, gpu, xpu_, tpu)] == [0.0, 0.0, 416.0, 0.0]
    # Orbax's host "copy" is a view of the donated state on CPU only.
    assert [c.copy_before_async_save for c in (cpu, gpu, xpu_, tpu)] == [True] + [False] * 3
    assert [c.accelerator for c in (cpu, gpu, xpu_, tpu)] == [False] + [True] * 3
    assert gpu.xla_flags == xpu_.xla_flags == tpu.xla_flags == ()
    # The stricter XPU stack (the extension at jax 0.5.0): no host callbacks.
    assert not xpu_.supports_host_callbacks and xpu_.supports_donation
    assert runtime.capabilities_for(xpu_) is xpu_
    for bad in ("cuda", "sycl", "auto", None):
        with pytest.raises(ValueError, match="expected one of"):
            runtime.capabilities_for(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend, version, platform, plugin", [
    ("cpu", "", "cpu", None), ("cuda", "", "gpu", None), ("rocm", "", "gpu", None),
    ("tpu", "", "tpu", None), ("sycl", "", "xpu", xpu.EXTENSION),
    ("oneapi", "", "xpu", xpu.ONEAPI), ("gpu", "PJRT oneapi 0.11.2", "xpu", xpu.ONEAPI),
    ("METAL", "", "METAL", None),
])
def test_platform_of_backend(backend, version, platform, plugin):
    assert runtime.platform_of_backend(backend, version) == (platform, plugin)


def test_capabilities_of_a_running_backend():
    from agpt_jax.runtime import capabilities as capabilities_lib

    def resolve(platform, backend, donation=True, callbacks=True):
        return capabilities_lib.for_backend(platform, backend, supports_donation=donation,
                                            supports_host_callbacks=callbacks)

    assert resolve("gpu", "cuda").default_attention == "pallas"
    assert resolve("gpu", "rocm").default_attention == "xla"  # Pallas' default needs CUDA
    sycl = resolve("xpu", "sycl", donation=False, callbacks=False)
    assert (sycl.supports_donation, sycl.supports_host_callbacks) == (False, False)
    assert resolve("xpu", "oneapi").supports_host_callbacks
    assert resolve("xpu", "oneapi").peak_tflops_per_device == 416.0
    assert resolve("cpu", "cpu") == runtime.capabilities_for("cpu")
    other = resolve("METAL", "METAL")  # a backend outside the table: generic capabilities
    assert (other.platform, other.default_attention, other.blockwise_block) == ("METAL", "xla", 512)


def test_peak_tflops_reads_the_capabilities():
    xpu_caps = runtime.capabilities_for("xpu")
    assert metrics.peak_tflops(xpu_caps, 0.0) == 416.0
    assert metrics.peak_tflops(runtime.capabilities_for("cpu"), 0.0) == 0.0
    assert metrics.peak_tflops(xpu_caps, 100.0) == 100.0  # configured wins
    assert metrics.peak_tflops(runtime.capabilities_for("cpu"), 7.0) == 7.0


def test_sycl_donation_workaround_edits_jax_allow_list():
    from jax._src.interpreters import mlir

    before = list(mlir._platforms_with_donation)
    try:
        for _ in range(2):  # idempotent: "sycl" appears once
            note = runtime._enable_sycl_donation()
            assert note is not None and "sycl" in note
        assert mlir._platforms_with_donation.count("sycl") == 1
        assert set(before) <= set(mlir._platforms_with_donation)
    finally:
        mlir._platforms_with_donation[:] = before


def test_check_all_reduce_over_eight_devices():
    result = runtime.check_all_reduce()
    assert result.ok, result.detail
    assert "over 8 devices == 36" in result.detail  # 1 + 2 + ... + 8
    # A reduction over fewer devices gives a different total: the check is not a constant.
    assert "over 4 devices == 10" in runtime.check_all_reduce(jax.devices()[:4]).detail


def test_fused_attention_detection():
    hlo = runtime.attention_probe_hlo(seq_len=64, heads=2, head_dim=16)
    assert "bf16" in hlo and runtime.fused_attention_targets(hlo) == []  # CPU has no fMHA
    fused = ('%fmha = (bf16[1,8,512,64]{3,2,1,0}, u8[0]{0}) custom-call(bf16[1,8,512,64] %q), '
             'custom_call_target="__cudnn$fmhaSoftmax", backend_config={}\n'
             '%other = f32[2] custom-call(f32[2] %x), custom_call_target="__onednn$matmul"')
    assert runtime.fused_attention_targets(fused) == ["__cudnn$fmhaSoftmax"]
    rt = dataclasses.replace(runtime.initialize("cpu"), platform="cpu")
    assert runtime.check_fused_attention(rt).detail.startswith("not applicable")


# --------------------------------------------------------------------------- subprocesses


def _child_env(devices: int, **extra: str) -> dict[str, str]:
    """A clean environment for a child jax: no launcher variables, ``devices`` CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands: list[tuple[list[str], dict[str, str]]], timeout: float) -> list[str]:
    """Starts every command at once, waits for all, kills all on timeout; returns stdouts."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in commands]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"child exited {proc.returncode}:\n{out}\n{err[-4000:]}"
            outputs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"children did not finish within {timeout} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_runtime_worker.py")


def _assert_two_process_results(outputs: list[str]) -> None:
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    total = sum(range(1, 5))  # rows 1..4, one per device of the 2 x 2 devices
    for pid, res in enumerate(results):
        rt = res["runtime"]
        assert (rt["process_index"], rt["process_count"]) == (pid, 2)
        assert (rt["local_device_count"], rt["device_count"]) == (2, 4)
        assert any("gloo" in w for w in rt["workarounds"])
        assert res["psum"] == [total]
        assert res["gathered"] == [0, 1]
        assert all(c["ok"] for c in res["checks"]), res["checks"]
        # data=2 x fsdp=2: each data row of the mesh is one process's devices.
        assert res["mesh_processes"] == [[0, 0], [1, 1]]
    assert sorted(results[0]["local_rows"] + results[1]["local_rows"]) == [0, 1, 2, 3]


@pytest.mark.multiprocess
def test_two_processes_explicit_config_psum_over_four_devices():
    port = _free_port()
    outputs = _run_all(
        [([sys.executable, WORKER, "explicit", str(port), str(pid)], _child_env(2))
         for pid in range(2)], timeout=120)
    _assert_two_process_results(outputs)


@pytest.mark.multiprocess
def test_two_processes_from_mpich_environment():
    port = str(_free_port())
    outputs = _run_all(
        [([sys.executable, WORKER, "env"],
          _child_env(2, PMI_RANK=str(pid), PMI_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port))
         for pid in range(2)], timeout=120)
    _assert_two_process_results(outputs)


def test_check_command_text_and_json():
    text, as_json = _run_all(
        [([sys.executable, "-m", "agpt_jax.runtime", "--check"], _child_env(4)),
         ([sys.executable, "-m", "agpt_jax.runtime", "--check", "--json", "--platform=cpu",
           "--cpu_devices=3"], _child_env(1))], timeout=120)
    assert "devices: 4 in this process, 4 total" in text
    assert "check all-reduce: PASS: psum over 4 devices == 10" in text
    assert "fused attention: PASS: not applicable" in text
    report = json.loads(as_json.strip().splitlines()[-1])
    assert report["ok"] and report["runtime"]["device_count"] == 3
    assert report["versions"]["jax"] == jax.__version__
    assert [c["name"] for c in report["checks"]] == ["devices", "all-reduce", "fused attention"]
    # The report's runtime entries are what they were before Runtime.capabilities existed.
    assert list(report["runtime"]) == [
        "platform", "process_index", "process_count", "local_device_count", "device_count",
        "workarounds", "default_attention", "supports_donation", "supports_host_callbacks",
        "device_kind", "jax_platform"]


def test_check_command_bad_input_exits_2_with_one_line():
    """A bad flag, argument or launcher variable is a usage error (2), not a failed check (1)."""
    cases = {
        "unknown flag": (["--check", "--bogus"], {}, "Unknown command line flag 'bogus'"),
        "flag value": (["--check", "--cpu_devices=many"], {}, "flag --cpu_devices=many"),
        "device count": (["--check", "--cpu_devices=0"], {}, "--cpu_devices=0 must be at least 1"),
        "rank": (["--check", "--process_id=-1"], {}, "process_id=-1 must be non-negative"),
        "argument": (["--check", "extra"], {}, "unexpected arguments: extra"),
        "no --check": ([], {}, "nothing to do: pass --check"),
        "launcher variable": (["--check"], {"PMI_RANK": "x", "PMI_SIZE": "2"},
                              "PMI_RANK='x' is not an integer"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "agpt_jax.runtime", *args],
                                    env=_child_env(1, **extra), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (args, extra, _) in cases.items()}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert proc.returncode == 2, (name, proc.returncode, err[-3000:])
            assert "Traceback" not in err and len(lines) == 1, (name, err[-3000:])
            assert cases[name][2] in lines[0], (name, lines)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_check_command_fails_clearly_without_plugin():
    """No plugin here (CI installs none): --platform=xpu names both plugins and their installs."""
    assert xpu.installed() == []  # a machine with a plugin must not run this suite's CPU checks
    proc = subprocess.run([sys.executable, "-m", "agpt_jax.runtime", "--check", "--platform=xpu"],
                          env=_child_env(1), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    out = proc.stdout
    assert "no Intel GPU plugin is installed" in out and compat.STACK in out
    assert "intel-extension-for-openxla" in out and "pip install -c constraints.txt -e '.[xpu]'" in out
    assert "jax-oneapi-plugin" in out and "-c constraints-jax011.txt -e '.[oneapi]'" in out


def test_plugin_table_matches_the_backends_jax_knows():
    """The table's claims about jax hold for the jax of the plugin's stack: jax 0.11 knows the
    oneapi backend and donates on it; jax 0.5.0 does not donate on the extension's sycl."""
    assert runtime.plugin_for_backend("oneapi") is xpu.ONEAPI
    assert runtime.plugin_for_backend("gpu", "PJRT oneapi 0.11.2") is xpu.ONEAPI
    assert runtime.plugin_for_backend("sycl") is xpu.EXTENSION
    assert runtime.plugin_for_backend("cuda") is None and runtime.plugin_for_backend("cpu") is None
    from jax._src import xla_bridge
    from jax._src.interpreters import mlir

    donates = set(mlir._platforms_with_donation)
    if compat.JAX_VERSION >= (0, 11):
        assert xpu.ONEAPI.backend in xla_bridge._experimental_plugins
        assert xla_bridge._platform_aliases[xpu.ONEAPI.backend] == "gpu"
        assert (xpu.ONEAPI.backend in donates) == xpu.ONEAPI.donation_in_jax
    else:
        assert compat.JAX_VERSION[:2] == (0, 5)
        assert (xpu.EXTENSION.backend in donates) == xpu.EXTENSION.donation_in_jax
