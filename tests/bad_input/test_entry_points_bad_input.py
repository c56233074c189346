"""A catalogue of malformed inputs for every user-facing entry point: cpt.py (configs and
environment variables), the three converters, preprocess_data.py, mix_datasets.py, evaluate.py,
inspect_data.py, plot_runs.py, reliability_table.py.

Each case must give: exit code 2 (bad input), one error line naming the input (file, field or
variable) and the fix, no Python traceback (unless --debug, checked for one case per entry point),
and no file created, changed or removed anywhere under the work folder. Every case's message must
match a pattern naming the bad input and one naming its problem as the check the case is about
words it: a case whose input trips an earlier check (say, a bad checkpoint before the data it
means to test) fails on the problem pattern.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

# The fault suite's helpers. pytest's default (prepend) import mode puts tests/ first on the
# import path for tests/conftest.py, so tests/faults/ imports as the namespace package `faults`.
from faults import fault_helpers as fh

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Case:
    """One malformed input: the entry point, its arguments, what the message must contain."""

    entry: str            # "cpt", a converter module name, or a script name
    name: str             # the bad-input class (docs/reliability.md row)
    argv: tuple[str, ...]
    names: str            # regex of the bad input's name: its file, flag or variable
    problem: tuple[str, ...]  # regexes of what is wrong with it (and the fix), as its check says
    env: tuple[tuple[str, str], ...] = ()
    omitted: bool = False  # the bad input is a flag left out (`names` is that flag)

    @property
    def expect(self) -> tuple[str, ...]:
        """Every regex the error line(s) must match."""
        return (self.names, *self.problem)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_universal(root: str) -> None:
    """A copy of the committed universal fixture (tests/converters/universal_writer.py)."""
    shutil.copytree(ROOT / "tests" / "fixtures" / "universal_tiny", root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("reference.npz"))


class _Evil:
    """A pickle payload that runs a shell command when unpickled naively."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs, good and bad, under one folder whose files must not change."""
    w = tmp_path_factory.mktemp("bad_input")
    d = str(w)
    good_list = fh.write_corpus(d)
    prefix = os.path.join(d, "papers")

    def copy_corpus(name: str) -> str:
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, os.path.join(d, name + ext))
        return os.path.join(d, name)

    trunc_idx = copy_corpus("trunc_idx")
    with open(trunc_idx + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(trunc_idx + ".idx") // 2)
    # Cut at a token boundary (an even size of uint16 tokens), so that the index's sizes, not the
    # item size, show the cut; odd_bin is cut mid-token, which the item-size check finds.
    trunc_bin = copy_corpus("trunc_bin")
    with open(trunc_bin + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(trunc_bin + ".bin") // 3 // 2 * 2)
    odd_bin = copy_corpus("odd_bin")
    with open(odd_bin + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(odd_bin + ".bin") // 3 // 2 * 2 + 1)
    bad_dtype = copy_corpus("bad_dtype")
    with open(bad_dtype + ".idx", "r+b") as f:
        f.seek(17)  # the dtype code byte (Megatron's MMIDIDX header)
        f.write(bytes([42]))
    only_idx = copy_corpus("only_idx")
    os.remove(only_idx + ".bin")
    lists = {
        "three_fields": "1.0 papers\n",
        "weight_text": f"heavy {prefix} papers\n",
        "zero_weights": f"0 {prefix} papers\n0.0 {prefix} web\n",
        "missing_bin": f"1.0 {only_idx} papers\n",
        "missing_prefix": f"1.0 {d}/nothing_here papers\n",
        "truncated_idx": f"1.0 {trunc_idx} papers\n",
        "truncated_bin": f"1.0 {trunc_bin} papers\n",
        "wrong_dtype": f"1.0 {bad_dtype} papers\n",
        "odd_bin": f"1.0 {odd_bin} papers\n",
        "empty": "# nothing\n",
    }
    paths = {"good": good_list}
    for name, text in lists.items():
        paths[name] = os.path.join(d, f"{name}.txt")
        with open(paths[name], "w") as f:
            f.write(text)
    other_size = os.path.join(d, "universal_other_size")
    os.makedirs(other_size)
    write_universal(other_size)  # 64-wide model with norm_eps 1e-6: not the smoke model
    evil = os.path.join(d, "universal_evil")
    os.makedirs(evil)
    write_universal(evil)
    marker = os.path.join(d, "pwned")
    states = os.path.join(evil, "global_step20_universal", "mp_rank_00_model_states.pt")
    # The payload in torch.save's zip layout (archive/data.pkl), as a current torch.save writes
    # it, so that the reader gets to the pickle's globals rather than refusing the container.
    with zipfile.ZipFile(states, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    not_a_ckpt = os.path.join(d, "not_a_checkpoint")
    os.makedirs(not_a_ckpt)
    with open(os.path.join(not_a_ckpt, "README"), "w") as f:
        f.write("nothing to see\n")
    jsonl = os.path.join(d, "docs.jsonl")
    with open(jsonl, "w") as f:
        f.write('{"text": "hello"}\n{"text": broken\n')
    np.save(os.path.join(d, "tokens_3d.npy"), np.zeros((2, 3, 4), np.int32))
    # A valid checkpoint for the cases about evaluate's data and tokens: evaluate reads the
    # checkpoint first, so with a bad one those cases would only ever test the checkpoint.
    from converters import universal_to_orbax

    good_ckpt = os.path.join(d, "checkpoint")
    assert universal_to_orbax.main(["--load", other_size, "--save", good_ckpt,
                                    "--no-optimizer-state"]) == 0
    return {"dir": d, "lists": paths, "prefix": prefix, "other_size": other_size,
            "evil": evil, "marker": marker, "not_a_ckpt": not_a_ckpt, "jsonl": jsonl,
            "tokens_3d": os.path.join(d, "tokens_3d.npy"), "good_ckpt": good_ckpt}


def _cpt_cases(w) -> list[Case]:
    L, d = w["lists"], w["dir"]
    save = os.path.join(d, "runs", "x")
    base = ("--config", "configs/pretrain.py:smoke", f"--config.save={save}")
    good = f"--config.data_file_list={L['good']}"
    # LOAD cases use the recipe that continues a checkpoint (pretrain refuses any LOAD).
    legacy = ("--config", "configs/legacy.py:smoke", f"--config.save={save}")
    cases = [
        Case("cpt", "DATA_FILE_LIST line without 3 fields",
             base + (f"--config.data_file_list={L['three_fields']}",), r"three_fields\.txt",
             (r"line 1: expected 3 fields 'weight prefix corpus', got 2",)),
        Case("cpt", "DATA_FILE_LIST weight not a number", base, r"weight_text\.txt",
             (r"line 1: weight 'heavy' is not a number",), (("DATA_FILE_LIST", L["weight_text"]),)),
        Case("cpt", "DATA_FILE_LIST weights that sum to 0",
             base + (f"--config.data_file_list={L['zero_weights']}",), r"zero_weights\.txt",
             (r"line 1: weight 0 must be a positive finite number",
              r"line 2: weight 0\.0 must be a positive finite number")),
        Case("cpt", "DATA_FILE_LIST with no entries",
             base + (f"--config.data_file_list={L['empty']}",), r"empty\.txt",
             (r"no entries; a DATA_FILE_LIST needs at least one 'weight prefix corpus' line",)),
        Case("cpt", "DATA_FILE_LIST that does not exist",
             base + (f"--config.data_file_list={d}/no_list.txt",), r"no_list\.txt",
             (r"' does not exist; pass an existing list file",)),
        Case("cpt", "missing .bin", base + (f"--config.data_file_list={L['missing_bin']}",),
             r"only_idx\.bin", (r"line 1: missing \S*/only_idx\.bin(?! and)",)),
        Case("cpt", "missing .bin and .idx",
             base + (f"--config.data_file_list={L['missing_prefix']}",), r"nothing_here\.idx",
             (r"line 1: missing \S*/nothing_here\.bin and \S*/nothing_here\.idx",)),
        Case("cpt", "truncated .idx", base + (f"--config.data_file_list={L['truncated_idx']}",),
             r"trunc_idx\.idx",
             (r"file is \d+ bytes but its header \(len=400, doc_count=401\) implies \d+; the "
              r"index is truncated",)),
        Case("cpt", "truncated .bin", base + (f"--config.data_file_list={L['truncated_bin']}",),
             r"trunc_bin\.bin",
             (r"\d+ bytes but \S*/trunc_bin\.idx says \d+ bytes \(\d+ uint16 tokens\); the \.bin "
              r"is truncated, re-tokenize it",)),
        Case("cpt", "wrong dtype code in .idx",
             base + (f"--config.data_file_list={L['wrong_dtype']}",), r"bad_dtype\.idx",
             (r"dtype code is 42, expected one of \[1, 2, 3, 4, 5, 6, 7, 8\]",)),
        Case("cpt", "impossible batch arithmetic", base + (good,), r"GLOBAL_BATCH\)?=7",
             (r"but micro_batch 1 x grad_acc_steps 2 x data-parallel size 8 = 16; set "
              r"GLOBAL_BATCH=16",), (("GLOBAL_BATCH", "7"),)),
        Case("cpt", "TRAIN_TOKENS smaller than one batch", base + (good,), r"TRAIN_TOKENS\)?=10",
             (r"gives 0 iterations: one iteration takes SEQ 32 x GLOBAL_BATCH 16 = 512 tokens",),
             (("TRAIN_TOKENS", "10"),)),
        Case("cpt", "malformed environment variable", base + (good,), r"TRAIN_ITERS='?many",
             (r"is not an integer; unset it or give a whole number",), (("TRAIN_ITERS", "many"),)),
        Case("cpt", "LOAD that does not exist",
             legacy + (good, f"--config.load={d}/no_such_checkpoint"), r"no_such_checkpoint",
             (r"config\.load \(env LOAD\)='\S*' does not exist; give an existing checkpoint",)),
        Case("cpt", "LOAD that is not a checkpoint",
             legacy + (good, f"--config.load={w['not_a_ckpt']}"), r"not_a_checkpoint",
             (r"not an agpt-jax checkpoint: expected params/",)),
        Case("cpt", "universal checkpoint of another model size",
             legacy + (good, f"--config.load={w['other_size']}"), r"universal_other_size",
             (r"holds another model than config\.model=smoke: rope_theta: checkpoint 500000\.0 "
              r"vs config 10000\.0", r"choose the config scale that matches it")),
        Case("cpt", "pickle that tries to run code",
             legacy + (good, f"--config.load={w['evil']}"), r"mp_rank_00_model_states\.pt",
             (r"pickles the global posix\.system, which agpt-jax does not load",
              r"runs no pickled code")),
        Case("cpt", "unknown config key", base + (good, "--config.learning_rate=1"),
             r"--config\.learning_rate", (r"unknown config key in",)),
        Case("cpt", "missing --config", (), r"--config", (r"is required, e\.g\. --config ",),
             omitted=True),
        Case("cpt", "a Megatron flag cpt.py does not take", base + (good, "--seq-length", "64"),
             r"--seq-length", (r"Megatron's \S+ is not taken by cpt\.py; instead: "
                               r"config\.seq_length \(env SEQ\)",)),
        Case("cpt", "a cooldown length without the cooldown switch",
             legacy + (good, f"--config.load={w['not_a_ckpt']}",
                       "--lr_constant_plus_cooldown_frac", "0.2"),
             r"--lr_constant_plus_cooldown_frac 0\.2",
             (r"without --lr_constant_plus_cooldown: Megatron reads the length only with the "
              r"switch", r"add --lr_constant_plus_cooldown$")),
        Case("cpt", "--universal-checkpoint with a LOAD that is not one",
             legacy + (good, f"--config.load={w['not_a_ckpt']}", "--universal-checkpoint"),
             r"not_a_checkpoint",
             (r"--universal-checkpoint \(config\.universal_checkpoint\)",
              r"is not a DeepSpeed universal checkpoint \(no latest_universal file")),
        Case("cpt", "--world_size without --dry_run", base + (good, "--world_size=24"),
             r"--world_size", (r"plans another job's size and is for --dry_run only",)),
    ]
    return cases


def _run_cpt_cases(cases: list[Case], debug_case: Case) -> dict[str, tuple[int, str, float]]:
    """Runs every cpt.py case as its own process, all at once; returns name -> (rc, output, s)."""
    procs = {}
    runs = [(case.name, case, []) for case in cases] + [("--debug", debug_case, ["--debug"])]
    for key, case, extra in runs:
        env = fh.child_env(None, devices=8, **dict(case.env))
        argv = [sys.executable, fh.CPT, *case.argv, *extra]
        procs[key] = (time.monotonic(), subprocess.Popen(
            argv, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    out = {}
    for key, (t0, p) in procs.items():
        o, e = p.communicate(timeout=300)
        out[key] = (p.returncode, e, time.monotonic() - t0)
    return out


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"^(cpt\.py: (config )?error|error):", ln)]


def _check(case: Case, rc: int, err: str) -> str:
    assert rc not in (0, None), (case.name, err[-2000:])
    assert "Traceback" not in err, (case.name, err[-3000:])
    lines = _error_lines(err)
    assert lines, (case.name, err[-2000:])
    # The message: its error line and, for a list of problems, the indented lines under it.
    text = "\n".join(ln for ln in err.splitlines() if ln in lines or ln.startswith("  "))
    for pattern in case.expect:
        assert re.search(pattern, text), (case.name, pattern, text)
    return " / ".join(ln.strip() for ln in text.splitlines())


def _input_text(case: Case) -> str:
    return " ".join(case.argv + tuple(f"{k}={v}" for k, v in case.env))


def test_every_case_names_its_input_and_its_problem(work):
    """`names` is the input as the command gives it (or the flag it leaves out); no `problem`
    pattern can be met by echoing the command back, so it must be what the check says."""
    cases = _cpt_cases(work) + _inprocess_cases(work)
    assert len({(c.entry, c.name) for c in cases}) == len(cases)
    for case in cases:
        assert case.names and case.problem, case.name
        text = _input_text(case)
        if case.omitted:
            assert not re.search(case.names, text), case.name
        else:
            # What the command names: its words, the paths in the lists it passes, the files in
            # the folders it passes, and the .bin/.idx of every path (a dataset prefix).
            words = re.split(r"[\s=]", text)
            for path in list(words):
                if path.endswith(".txt") and os.path.isfile(path):
                    with open(path) as f:
                        words += f.read().split()
                elif os.path.isdir(path):
                    words += [os.path.join(root, n) for root, _, files in os.walk(path)
                              for n in files]
            assert re.search(case.names, text) or any(
                re.search(case.names, w + ext) for w in words for ext in ("", ".bin", ".idx")), (
                case.name, case.names)
        for pattern in case.problem:
            assert not re.search(pattern, text), (case.name, pattern)


def _record(case: Case, message: str, rc: int) -> None:
    slug = re.sub(r"[^a-z0-9]+", "_", f"{case.entry} {case.name}".lower()).strip("_")
    fh.record(f"bad_input_{slug}", {
        "kind": "bad_input", "entry": case.entry, "title": case.name,
        "how": f"{case.entry} {' '.join(os.path.basename(a) for a in case.argv)}"[:200]
               + (f" with {', '.join(f'{k}={v}' for k, v in case.env)}" if case.env else ""),
        "trials": 1, "observed": f"exit {rc}, one line, no traceback, no file changed",
        "message": message[:400]})


@pytest.mark.slow
def test_cpt_bad_input_catalogue(work):
    before = fh.tree_files(work["dir"])
    cases = _cpt_cases(work)
    debug_case = cases[0]
    results = _run_cpt_cases(cases, debug_case)
    for case in cases:
        rc, err, _ = results[case.name]
        message = _check(case, rc, err)
        assert rc == 2, (case.name, rc, err[-2000:])  # the exit code of bad input
        _record(case, message, rc)
    rc, err, _ = results["--debug"]
    assert rc == 2 and "Traceback" in err  # --debug shows where it came from
    assert not os.path.exists(work["marker"])  # the pickle's command never ran
    assert fh.tree_files(work["dir"]) == before
    assert not os.path.exists(os.path.join(work["dir"], "runs"))


def _inprocess_cases(w) -> list[Case]:
    d, L = w["dir"], w["lists"]
    out = os.path.join(d, "out", "x")
    ckpt = w["good_ckpt"]
    blend = ("--seq-length", "32", "--global-batch-size", "4", "--train-iters", "10")
    return [
        Case("universal_to_orbax", "universal checkpoint of another model size",
             ("--load", w["other_size"], "--save", out, "--model-config", "tiny"),
             r"universal_other_size/\S*mp_rank_00_model_states\.pt",
             (r"the given model config does not match the checkpoint's args",
              r"norm_eps: given 1e-05, checkpoint 1e-06")),
        Case("universal_to_orbax", "pickle that tries to run code",
             ("--load", w["evil"], "--save", out), r"universal_evil/\S*mp_rank_00_model_states\.pt",
             (r"pickles the global posix\.system, which agpt-jax does not load",
              r"runs no pickled code")),
        Case("universal_to_orbax", "LOAD that does not exist",
             ("--load", f"{d}/no_such", "--save", out), r"no_such", (r": no such directory",)),
        Case("universal_to_orbax", "destination exists",
             ("--load", w["other_size"], "--save", w["not_a_ckpt"]), r"not_a_checkpoint",
             (r": already exists; choose a new --save",)),
        Case("orbax_to_universal", "LOAD that is not a checkpoint",
             ("--load", w["not_a_ckpt"], "--save", out), r"not_a_checkpoint",
             (r"not an agpt-jax checkpoint: expected params/",)),
        Case("orbax_to_hf", "LOAD that does not exist",
             ("--load", f"{d}/no_such", "--save", out), r"no_such",
             (r": no such checkpoint directory",)),
        Case("orbax_to_hf", "LOAD that is not a checkpoint",
             ("--load", w["not_a_ckpt"], "--save", f"{d}/no_parent/hf"), r"not_a_checkpoint",
             (r"not an agpt-jax checkpoint: expected params/", r"pass the directory")),
        Case("preprocess_data", "input that does not exist",
             ("--input", f"{d}/none.jsonl", "--output-prefix", out, "--tokenizer-type",
              "HFTokenizer", "--tokenizer-model", f"{d}/none.json"), r"none\.jsonl",
             (r"^error: --input '\S*' does not exist",)),
        Case("preprocess_data", "tokenizer model that does not exist",
             ("--input", w["jsonl"], "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
              "--tokenizer-model", f"{d}/no_tokenizer.json"), r"no_tokenizer\.json",
             (r"^error: --tokenizer-model '\S*' does not exist",)),
        Case("mix_datasets", "weights of 0",
             ("--inputs", "1", L["zero_weights"]), r"zero_weights\.txt",
             (r"line 1: weight 0 must be a positive finite number",
              r"line 2: weight 0\.0 must be a positive finite number")),
        Case("mix_datasets", "global weight 0", ("--inputs", "0", L["good"]), r"list\.txt",
             (r"global weight 0(\.0)? for \S+ must be positive",)),
        Case("mix_datasets", "missing list", ("--inputs", "1", f"{d}/no_list.txt"),
             r"no_list\.txt", (r": cannot open the list",)),
        Case("evaluate", "checkpoint that does not exist",
             ("--checkpoint", f"{d}/no_such", "--data-file-list", L["good"]), r"no_such",
             (r"^error: --checkpoint: \S*: no such checkpoint directory",)),
        Case("evaluate", "truncated .idx",
             ("--checkpoint", ckpt, "--data-file-list", L["truncated_idx"]), r"trunc_idx\.idx",
             (r"file is \d+ bytes but its header \(len=400, doc_count=401\) implies \d+; the "
              r"index is truncated",)),
        Case("evaluate", "tokens of the wrong rank",
             ("--checkpoint", ckpt, "--tokens", w["tokens_3d"], "--save-logits",
              f"{d}/logits.npy"), r"tokens_3d\.npy",
             (r"shape \(2, 3, 4\), expected \[rows, length\]",)),
        Case("evaluate", "no data and no tokens", ("--checkpoint", ckpt), r"--data-file-list",
             (r"\(loss per corpus\) or --tokens \(logits\)",), omitted=True),
        Case("inspect_data", "DATA_FILE_LIST that does not exist",
             ("--data-file-list", f"{d}/no_list.txt") + blend, r"no_list\.txt",
             (r"' does not exist; pass an existing list file",)),
        Case("inspect_data", "truncated .idx", ("--data-file-list", L["truncated_idx"]) + blend,
             r"trunc_idx\.idx",
             (r"file is \d+ bytes but its header \(len=400, doc_count=401\) implies \d+; the "
              r"index is truncated",)),
        Case("inspect_data", ".bin cut mid-token", ("--data-file-list", L["odd_bin"]) + blend,
             r"odd_bin\.bin",
             (r"size \d*[13579] bytes is not a multiple of the uint16 item size 2 given in "
              r"\S*/odd_bin\.idx",)),
        Case("plot_runs", "run folder that does not exist",
             (f"{d}/no_such_run", "--out", f"{out}.png"), r"no_such_run",
             (r": no such run folder",)),
        Case("reliability_table", "results folder without records",
             ("--results", w["not_a_ckpt"], "--out", f"{out}.md"), r"not_a_checkpoint",
             (r": no result records \(\*\.json\)", r"RELIABILITY_RESULTS set to this folder")),
    ]


def _main_of(entry: str):
    if entry in ("universal_to_orbax", "orbax_to_universal", "orbax_to_hf"):
        return importlib.import_module(f"converters.{entry}").main
    return _load_script(entry).main


import importlib  # noqa: E402 - used by _main_of


def test_other_entry_points_bad_input_catalogue(work, capsys):
    before = fh.tree_files(work["dir"])
    for case in _inprocess_cases(work):
        main = _main_of(case.entry)
        try:
            rc = main(list(case.argv))
        except SystemExit as e:  # a bad flag (agpt_jax/cli.py)
            rc = e.code
        captured = capsys.readouterr()
        message = _check(case, rc, captured.err)
        assert rc == 2, (case.name, rc, captured.err[-2000:])  # the exit code of bad input
        _record(case, message, rc)
        assert fh.tree_files(work["dir"]) == before, case.name
        assert not os.path.exists(os.path.join(work["dir"], "out")), case.name
    assert not os.path.exists(work["marker"])
    # --debug shows the traceback (converters raise it).
    from converters import universal_to_orbax

    with pytest.raises(ValueError):
        universal_to_orbax.main(["--load", work["evil"], "--save",
                                 os.path.join(work["dir"], "out", "x"), "--debug"])
    assert fh.tree_files(work["dir"]) == before
