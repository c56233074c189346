"""End-to-end CPT runs at smoke scale: learning, bit-exact resume, SIGTERM, non-finite, dry run,
2 processes.

Fixtures are written with the data package's own writer: two corpora of arithmetic token
progressions ("papers" step 3, "web" step 7), which a tiny model learns within a few iterations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from agpt_jax import compat
from agpt_jax import config as config_lib
from agpt_jax import checkpoint
from agpt_jax import loop, run_files, runtime
from agpt_jax.data import DataError, write_indexed_dataset
from agpt_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPT = str(ROOT / "scripts" / "cpt.py")


def load_config(recipe: str, arg: str = "smoke"):
    path = ROOT / "configs" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{recipe}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def make_cfg(recipe: str, **over) -> config_lib.RunConfig:
    cd = load_config(recipe)
    cd.progress_bar = False
    for k, v in over.items():
        setattr(cd, k, v)
    return config_lib.from_config(cd, jax.device_count())


def write_corpora(directory: str) -> dict[str, str]:
    rng = np.random.RandomState(0)

    def docs(step: int, n: int):
        for _ in range(n):
            length, start = rng.randint(40, 120), rng.randint(0, 99)
            yield (start + step * np.arange(length)) % 97 + 1

    write_indexed_dataset(os.path.join(directory, "papers"), docs(3, 300), np.uint16)
    write_indexed_dataset(os.path.join(directory, "web"), docs(7, 300), np.uint16)
    lists = {"mix": "0.9 papers papers\n0.1 web web\n", "web": "1.0 web web\n",
             "broken": "0.5 papers papers\n0.5 missing_corpus web\n"}
    out = {}
    for name, text in lists.items():
        out[name] = os.path.join(directory, f"{name}.txt")
        with open(out[name], "w") as f:
            f.write(text)
    return out


@pytest.fixture(scope="module")
def rt():
    return runtime.initialize("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpora(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def pretrained(rt, data, tmp_path_factory):
    """A 'legacy pretrained model': the pretrain recipe on web only."""
    save = str(tmp_path_factory.mktemp("pretrain"))
    cfg = make_cfg("pretrain", data_file_list=data["web"], save=save, train_iters=6)
    result = loop.run(cfg, rt)
    return save, result


def test_pretrain_writes_a_complete_run_dir(pretrained):
    save, result = pretrained
    assert result.last_iteration == 6 and not result.stopped_by_signal
    for name in ("config.json", "metrics.jsonl", "lr_schedule.csv", "lr_schedule.png"):
        assert os.path.isfile(os.path.join(save, name)), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(save))
    step = checkpoint.resolve_checkpoint_dir(save)
    assert step.endswith(os.path.join("checkpoints", "6"))
    # Orbax 0.12 also leaves its own commit marker, commit_success.txt, in every step.
    assert sorted(set(os.listdir(step)) - {"commit_success.txt"}) == sorted(
        ["_CHECKPOINT_METADATA", "adam", "data", "metadata", "params", "train"])
    meta = checkpoint.read_metadata(save)  # the converters' reader accepts a run's step
    assert meta["iteration"] == 6 and meta["adam_step"] == 6
    assert checkpoint.model_config(save) == make_cfg("pretrain", data_file_list="x", save=save).model
    # The export to Megatron builds the run's param groups (decayed, then not) at its last LR.
    from converters import orbax_to_universal

    groups = orbax_to_universal.contents_from_metadata(meta, checkpoint.model_config(save), 6).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    last_lr = [r["lr"] for r in read_metrics(os.path.join(save, "metrics.jsonl")) if "lr" in r][-1]
    assert meta["last_lr"] == last_lr and all(g["lr"] == last_lr for g in groups)
    records = [r for r in read_metrics(os.path.join(save, "metrics.jsonl")) if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["lr"] == 0.0  # Megatron's warmup starts at 0 (spec §2.1)
    for key in ("loss/web", "tokens/web", "grad_norm", "update_norm", "tokens_per_s",
                "tflops_per_device", "mfu", "skipped"):
        assert key in records[-1], key
    assert records[-1]["tokens"] == 6 * 16 * 32 == records[-1]["tokens/web"]
    with open(os.path.join(save, "lr_schedule.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "iteration,lr" and len(rows) == 7
    # The LR each iteration's update used is the CSV's row for that iteration.
    np.testing.assert_allclose([float(r.split(",")[1]) for r in rows[1:]],
                               [r["lr"] for r in records], rtol=1e-6, atol=1e-12)


LEGACY = dict(train_iters=12, eval_interval=4, save_interval=3, lr=3e-3)


@pytest.mark.slow
def test_legacy_cpt_learns_and_resumes_bit_exact(rt, data, pretrained, tmp_path):
    common = dict(data_file_list=data["mix"], load=pretrained[0], **LEGACY)
    whole = str(tmp_path / "whole")
    result = loop.run(make_cfg("legacy", save=whole, **common), rt)
    assert result.start_iteration == 0 and result.last_iteration == 12  # iteration reset to 0
    records = read_metrics(os.path.join(whole, "metrics.jsonl"))
    evals = [r for r in records if "eval/loss" in r]
    assert [r["iteration"] for r in evals] == [4, 8, 12]
    assert evals[-1]["eval/loss/papers"] < evals[0]["eval/loss/papers"] - 0.05
    train = [r for r in records if "loss" in r]
    assert np.mean([r["loss/papers"] for r in train[-3:]]) < np.mean(
        [r["loss/papers"] for r in train[:3]])
    assert train[-1]["tokens/papers"] > 5 * train[-1]["tokens/web"]  # the 0.9 / 0.1 blend
    # Adam step continued from the source (spec §2.6): 6 pretraining + 12 CPT updates.
    assert checkpoint.read_metadata(whole)["adam_step"] == 18

    # Interrupted after 5 iterations, then started again with the same SAVE.
    parts = str(tmp_path / "parts")
    first = loop.run(make_cfg("legacy", save=parts, stop_at_iteration=5, **common), rt)
    assert first.last_iteration == 5
    second = loop.run(make_cfg("legacy", save=parts, **common), rt)
    assert second.start_iteration == 5 and second.last_iteration == 12

    def losses(d):
        return [(r["iteration"], r.get("loss"), r.get("eval/loss"), r.get("lr"))
                for r in read_metrics(os.path.join(d, "metrics.jsonl"))]

    assert losses(parts) == losses(whole)  # exactly equal floats, eval lines included
    for x, y in zip(jax.tree.leaves(checkpoint.restore_params(whole)),
                    jax.tree.leaves(checkpoint.restore_params(parts))):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(checkpoint.restore_adam(whole)),
                    jax.tree.leaves(checkpoint.restore_adam(parts))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_universal_load_is_converted_once_and_continues_identically(rt, data, pretrained,
                                                                    tmp_path):
    from converters import load, orbax_to_universal

    universal = orbax_to_universal.convert(pretrained[0], str(tmp_path / "megatron"),
                                           progress=False)
    runs = {}
    for name, src in (("orbax", pretrained[0]), ("universal", str(tmp_path / "megatron"))):
        runs[name] = str(tmp_path / name)
        cfg = make_cfg("legacy", data_file_list=data["mix"], load=src, save=runs[name],
                       stop_at_iteration=2, **LEGACY)
        loop.run(load.prepare(cfg, rt), rt)  # the border, as scripts/cpt.py crosses it
    assert os.path.isfile(os.path.join(runs["universal"], load.CONVERTED_INIT,
                                       "_CHECKPOINT_METADATA")), universal
    assert not os.path.exists(os.path.join(runs["orbax"], load.CONVERTED_INIT))
    assert checkpoint.read_metadata(runs["universal"])["source"] == str(tmp_path / "megatron")
    # The converted start equals the source on the real vocabulary; the padding rows come back
    # as zeros, as DeepSpeed pads vocabulary tensors on a universal load (spec §3.6).
    src = checkpoint.restore_params(pretrained[0])
    got = checkpoint.restore_params(os.path.join(runs["universal"], load.CONVERTED_INIT))
    v = make_cfg("pretrain", data_file_list="x", save="x").model.vocab_size
    np.testing.assert_array_equal(got["embed"]["embedding"][:v], src["embed"]["embedding"][:v])
    np.testing.assert_array_equal(got["lm_head"]["kernel"][:, :v], src["lm_head"]["kernel"][:, :v])
    assert not np.any(got["embed"]["embedding"][v:]) and not np.any(got["lm_head"]["kernel"][:, v:])
    for x, y in zip(jax.tree.leaves(src["layers"]), jax.tree.leaves(got["layers"])):
        np.testing.assert_array_equal(x, y)
    # The reference run: the orbax source with what DeepSpeed's padding changes set by hand (the
    # LM head's padded vocabulary columns and their Adam moments zero; the embedding's padded rows
    # are never looked up and already zero in the moments), everything else as saved. The padded
    # columns take part in the softmax, so the unchanged source's losses differ by ~1e-4 relative;
    # this one must continue bit for bit as the universal load does.
    import orbax.checkpoint as ocp

    def zero_padding(tree):
        tree["lm_head"]["kernel"][:, v:] = 0
        tree["embed"]["embedding"][v:] = 0
        return tree

    adam = jax.tree.map(np.array, checkpoint.restore_adam(pretrained[0]))
    adam["mu"], adam["nu"] = zero_padding(adam["mu"]), zero_padding(adam["nu"])
    zeroed = str(tmp_path / "zero_padded")
    with ocp.CheckpointManager(os.path.join(zeroed, "checkpoints"),
                               item_names=("params", "adam", "metadata")) as mgr:
        mgr.save(6, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(zero_padding(jax.tree.map(np.array, src))),
            adam=ocp.args.PyTreeSave(adam),
            metadata=ocp.args.JsonSave(checkpoint.read_metadata(pretrained[0]))))
        mgr.wait_until_finished()
    runs["zero_padded"] = str(tmp_path / "zero_padded_run")
    loop.run(make_cfg("legacy", data_file_list=data["mix"], load=zeroed,
                      save=runs["zero_padded"], stop_at_iteration=2, **LEGACY), rt)
    uni, ref = ([r["loss"] for r in read_metrics(os.path.join(runs[n], "metrics.jsonl"))
                 if "loss" in r] for n in ("universal", "zero_padded"))
    assert len(uni) == 2 and uni == ref
    assert checkpoint.read_metadata(runs["universal"])["adam_step"] == 6 + 2


@pytest.mark.slow
def test_cooldown_branch_continues_the_constant_run(rt, data, pretrained, tmp_path):
    constant = str(tmp_path / "constant")
    loop.run(make_cfg("constant_cooldown", data_file_list=data["mix"], load=pretrained[0],
                      save=constant, cooldown_frac=0.0, train_iters=6, lr=1e-4,
                      save_interval=3), rt)
    records = [r for r in read_metrics(os.path.join(constant, "metrics.jsonl")) if "loss" in r]
    assert [r["lr"] for r in records] == pytest.approx([1e-4] * 6)  # constant, no warmup
    branch = str(tmp_path / "branch")
    cfg = make_cfg("cooldown", data_file_list=data["mix"], load=constant, save=branch, lr=1e-4,
                   min_lr=1e-5)
    assert cfg.train_iters == cfg.cooldown_tokens // 32 // 16 == 4
    loop.run(cfg, rt)
    lrs = [r["lr"] for r in read_metrics(os.path.join(branch, "metrics.jsonl")) if "loss" in r]
    assert lrs[0] == pytest.approx(1e-4) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-5 + 9e-5 * (1 - np.sqrt(3 / 4)), rel=1e-5)  # 1-sqrt
    step = checkpoint.resolve_checkpoint_dir(branch)
    progress = checkpoint.read_progress(step)
    assert progress.data_start_iteration == 6 and progress.iteration == 4
    with open(os.path.join(step, "data", "metadata")) as f:
        assert json.load(f)["next_iteration"] == 10  # the source's stream, continued


def test_constant_cooldown_refuses_a_cooled_down_source(rt, data, pretrained, tmp_path):
    # The pretrained model's last LR is near min_lr: cooled down by its cosine.
    cfg = make_cfg("constant_cooldown", data_file_list=data["mix"], load=pretrained[0],
                   save=str(tmp_path / "cc"))
    with pytest.raises(config_lib.ConfigError, match="looks cooled down already"):
        loop.run(cfg, rt)


def test_non_finite_updates_stop_the_run(rt, data, pretrained, tmp_path):
    save = str(tmp_path / "nan")
    cfg = make_cfg("constant_cooldown", data_file_list=data["mix"], load=pretrained[0],
                   save=save, lr=1e36, allow_cooled_down_source=True, max_skipped_in_a_row=2,
                   train_iters=6, save_interval=100)
    with pytest.raises(loop.NonFiniteError, match="2 non-finite updates in a row"):
        loop.run(cfg, rt)
    records = [r for r in read_metrics(os.path.join(save, "metrics.jsonl")) if "loss" in r]
    assert [r["skipped"] for r in records][-2:] == [1, 1]
    assert not os.path.isdir(os.path.join(save, "checkpoints")) or not [
        n for n in os.listdir(os.path.join(save, "checkpoints")) if n.isdigit()]


def test_dry_run_writes_the_schedule_and_names_a_missing_file(rt, data, tmp_path):
    cfg = make_cfg("constant_cooldown", data_file_list=data["mix"], load=str(tmp_path),
                   save=str(tmp_path / "dry"), train_iters=50)
    with pytest.raises(checkpoint.CheckpointError):  # LOAD is an empty folder, not a checkpoint
        run_files.dry_run(cfg, rt)
    cfg = make_cfg("pretrain", data_file_list=data["mix"], save=str(tmp_path / "dry"),
                   train_iters=50)
    report = run_files.dry_run(cfg, rt)
    assert "corpus papers: share 0.9000" in report.summary
    with open(report.lr_csv) as f:
        assert len(f.read().splitlines()) == 51
    assert os.path.getsize(report.lr_png) > 1000
    assert not os.path.isdir(os.path.join(cfg.run_dir, "checkpoints"))
    cfg = make_cfg("pretrain", data_file_list=data["broken"], save=str(tmp_path / "dry2"))
    with pytest.raises(DataError, match=r"line 2: missing .*missing_corpus\.bin"):
        run_files.dry_run(cfg, rt)


def _child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for name in ("LOAD", "SAVE", "DATA_FILE_LIST", "TRAIN_TOKENS", "TRAIN_ITERS"):
        env.pop(name, None)
    return env


def test_cli_config_error_is_one_line(data, tmp_path):
    proc = subprocess.run(
        [sys.executable, CPT, "--config", "configs/legacy.py:smoke",
         f"--config.data_file_list={data['mix']}", f"--config.save={tmp_path}",
         "--config.global_batch=7"],
        cwd=ROOT, env=_child_env(8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cpt.py:")]
    assert len(errors) == 2, proc.stderr  # missing LOAD and the batch arithmetic
    assert any("LOAD is empty" in ln for ln in errors)
    assert any("GLOBAL_BATCH=16" in ln for ln in errors)
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, CPT, "--config", "configs/legacy.py:smoke",
                           "--config.learning_rate=1"],
                          cwd=ROOT, env=_child_env(8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "cpt.py: config error: unknown config key in --config.learning_rate")


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(data, pretrained, tmp_path):
    save = str(tmp_path / "sig")
    proc = subprocess.Popen(
        [sys.executable, CPT, "--config", "configs/legacy.py:smoke",
         f"--config.data_file_list={data['mix']}", f"--config.load={pretrained[0]}",
         f"--config.save={save}", "--config.train_iters=400", "--config.save_interval=1000",
         "--config.eval_interval=1000", "--config.progress_bar=False"],
        cwd=ROOT, env=_child_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(save, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.isfile(metrics) and len(read_metrics(metrics)) >= 3:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    last = read_metrics(metrics)[-1]["iteration"]
    assert 3 <= last < 400
    step = checkpoint.resolve_checkpoint_dir(save)
    assert os.path.basename(step) == str(last)
    assert checkpoint.read_metadata(step)["iteration"] == last
    leaves = jax.tree.leaves(checkpoint.restore_params(step))
    assert all(np.all(np.isfinite(x)) for x in leaves)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GLOO_JOIN_TIMEOUT = "Gloo context initialization failed: DEADLINE_EXCEEDED"


def _run_two_processes(args: list[str], logs: pathlib.Path,
                       env: dict[str, str] | None = None) -> tuple[list[int], list[str]]:
    """Runs the smoke pretrain as 2 processes x 4 CPU devices; (exit codes, stderr texts).

    Their output goes to files under `logs`: a pipe read after the other process's would stall a
    process whose log outgrows the pipe while its peer waits for it in a collective.
    """
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    names = [logs / f"process{i}.stderr" for i in range(2)]
    procs = []
    for i, name in enumerate(names):
        with open(logs / f"process{i}.stdout", "w") as out, open(name, "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, CPT, "--config", "configs/pretrain.py:smoke",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}", *args], cwd=ROOT, env={**_child_env(4), **(env or {})},
                stdout=out, stderr=err, text=True))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], [name.read_text() for name in names]


#: XLA's CPU client logs each collective communicator it creates (TF_CPP_VMODULE=cpu_cliques=3):
#: the device group and the rank of this process's device in it.
_COMMUNICATOR_CREATED = re.compile(
    r"Create a new communicator for clique key devices=\[([^\]]*)\] and rank (\d+)")
_LOG_COMMUNICATORS = {"TF_CPP_VMODULE": "cpu_cliques=3", "TF_CPP_MIN_LOG_LEVEL": "0"}


def _last_words(err: str) -> str:
    """A failed process's stderr without the extension-module list a fatal signal appends."""
    return "\n".join(line for line in err.splitlines()
                     if not line.startswith("Extension modules:")
                     and "cpu_cliques.cc" not in line)[-6000:]


@pytest.mark.slow
def test_two_processes_match_one(data, pretrained, tmp_path):
    # The same run as the `pretrained` fixture (1 process x 8 devices), as 2 processes x 4.
    single = pretrained[0]
    double = str(tmp_path / "two")
    args = [f"--config.data_file_list={data['web']}", f"--config.save={double}",
            "--config.train_iters=6", "--config.progress_bar=False"]
    for attempt in range(2):
        shutil.rmtree(double, ignore_errors=True)
        codes, errs = _run_two_processes(args, tmp_path / f"logs{attempt}", _LOG_COMMUNICATORS)
        # XLA's CPU client gives gloo 30 s (not configurable) for every device of the job to join a
        # new collective. Two processes of 4 devices on the 2-core test machine under a parallel
        # test load have missed that once in ~20 runs: one or both fail with this message before
        # any value is compared (the other may instead be aborted by jax when its peer leaves,
        # SIGABRT, as tests/faults/test_dead_peer.py shows). That is the machine, not the run;
        # one retry, never more.
        if attempt == 0 and codes != [0, 0] and any(_GLOO_JOIN_TIMEOUT in e for e in errs):
            continue
        break
    if codes != [0, 0]:
        # pytest.fail, not an assert: pytest shortens an assert's message to a few hundred
        # characters, which hides the line that says why a process failed.
        pytest.fail(f"exit codes {codes}\n" + "\n".join(
            f"--- process {i} stderr (end) ---\n{_last_words(e)}" for i, e in enumerate(errs)))
    for i, err in enumerate(errs):
        created = _COMMUNICATOR_CREATED.findall(err)
        assert created, f"process {i} logged no communicator (TF_CPP_VMODULE had no effect?)"
        twice = sorted({c for c in created if created.count(c) > 1})
        assert not twice, f"process {i} created these communicators twice: {twice}"
        if compat.CPU_COMMUNICATORS_CAN_BE_CREATED_TWICE:
            # The runtime creates them before it reports itself, and this run (fsdp over all
            # 8 devices) uses no other device group: nothing is left to create lazily.
            start_up = _COMMUNICATOR_CREATED.findall(err[:err.index("runtime: platform=")])
            assert sorted(start_up) == sorted(created), (i, start_up, created)
    one = read_metrics(os.path.join(single, "metrics.jsonl"))
    two = read_metrics(os.path.join(double, "metrics.jsonl"))
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "eval/loss", "loss/web", "eval/loss/web", "lr", "grad_norm"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(checkpoint.restore_params(single)),
                    jax.tree.leaves(checkpoint.restore_params(double))):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
