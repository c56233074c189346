"""scripts/evaluate.py against an independent reference: the HF export run by transformers in torch.

The checkpoint is a run folder saved by Orbax's CheckpointManager (as scripts/cpt.py saves), with a
tiny model that "trained" in bfloat16; the reference logits come from converters.orbax_to_hf +
transformers.LlamaForCausalLM in fp32, and the reference cross-entropy from torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from script_modules import load_script

SEQ = 32
GBS = 8
EVAL_ITERS = 3


evaluate = load_script("evaluate")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def run_dir(work):
    """A run root with two CheckpointManager steps; the newest (4) has different params."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from agpt_jax.model import get_preset, init_params

    # init_std 0.3 makes the logits far from uniform, so a wrong mapping or sample shows.
    cfg = get_preset("tiny").replace(compute_dtype="bfloat16", init_std=0.3, seq_length=SEQ)
    root = str(work / "run")
    mgr = ocp.CheckpointManager(os.path.join(root, "checkpoints"),
                                item_names=("params", "metadata"))
    meta = {"format": "agpt-jax", "format_version": 1, "source": "test",
            "model": dataclasses.asdict(cfg), "original_vocab_size": cfg.vocab_size,
            "padded_vocab_size": cfg.padded_vocab_size}
    for step, seed in ((2, 1), (4, 2)):
        params = jax.device_get(nn.unbox(init_params(cfg, jax.random.PRNGKey(seed))))
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                               metadata=ocp.args.JsonSave(dict(meta,
                                                                               iteration=step))))
    mgr.wait_until_finished()
    return root


@pytest.fixture(scope="module")
def hf_model(work, run_dir):
    import torch
    from transformers import LlamaForCausalLM

    from converters import orbax_to_hf

    dst = str(work / "hf")
    assert orbax_to_hf.main(["--load", run_dir, "--save", dst]) == 0
    return LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _torch_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean token cross-entropy per row, [rows] float64, with torch."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(logits, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    ce = F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1), reduction="none")
    return ce.reshape(y.shape).mean(-1).numpy()


@pytest.fixture(scope="module")
def file_list(work):
    """Two corpora with different token statistics: 'papers' over ids 3..49, 'web' over 50..99."""
    from agpt_jax.data import write_indexed_dataset

    rng = np.random.default_rng(0)
    lines = []
    for name, lo, hi, docs in (("papers", 3, 50, 60), ("web", 50, 100, 40)):
        prefix = str(work / "data" / name)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        write_indexed_dataset(prefix, [rng.integers(lo, hi, int(rng.integers(20, 90)))
                                       for _ in range(docs)], np.uint16)
        lines.append(f"{0.7 if name == 'papers' else 0.3} {prefix} {name}")
    path = str(work / "list.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.torch
def test_loss_per_corpus_matches_hf_export(work, run_dir, file_list, hf_model):
    """Per-corpus loss and perplexity of the valid split equal torch CE of the HF model's logits."""
    from agpt_jax.data import BlendConfig, build_blended_splits, read_file_list

    out = str(work / "valid.json")
    assert evaluate.main(["--checkpoint", run_dir, "--data-file-list", file_list, "--split",
                          "valid", "--dtype", "float32", "--global-batch-size", str(GBS),
                          "--eval-iters", str(EVAL_ITERS), "--data-split", "80,20,0",
                          "--batch-size", "5", "--json", out]) == 0
    report = json.load(open(out))
    assert report["checkpoint"].endswith(os.path.join("checkpoints", "4"))
    assert report["dtype"] == "float32"

    # Reference: the same Megatron blend (train_iters 1, eval_interval 100, the in-corpus shuffle
    # the recipes use), HF logits, torch CE.
    cfg = BlendConfig(seq_length=SEQ, global_batch_size=GBS, train_iters=1, eval_interval=100,
                      eval_iters=EVAL_ITERS, split="80,20,0", shuffle_sample_in_corpus=True)
    valid = build_blended_splits(read_file_list(file_list), cfg)["valid"]
    n = EVAL_ITERS * GBS
    rows = np.stack([valid[i][0] for i in range(n)])
    corpus = np.array([valid[i][1] for i in range(n)])
    ce = _torch_ce(_hf_logits(hf_model, rows[:, :-1]), rows[:, 1:])
    results = report["results"]
    assert set(results) == {"papers", "web", "total"}
    for c, name in enumerate(valid.corpora):
        sel = corpus == c
        assert results[name]["samples"] == int(sel.sum()) > 0
        assert results[name]["tokens"] == int(sel.sum()) * SEQ
        assert results[name]["loss"] == pytest.approx(float(ce[sel].mean()), abs=2e-5)
        assert results[name]["perplexity"] == pytest.approx(math.exp(ce[sel].mean()), rel=1e-4)
    assert results["total"]["loss"] == pytest.approx(float(ce.mean()), abs=2e-5)
    assert results["total"]["samples"] == n
    # The corpora really differ, so a swapped corpus id would not pass.
    assert abs(results["papers"]["loss"] - results["web"]["loss"]) > 0.05


@pytest.mark.torch
def test_saved_logits_match_hf_and_default_dtype_is_the_checkpoints(work, run_dir, hf_model):
    """--save-logits in fp32 equals the HF logits; the default dtype is the trained one (bf16)."""
    tokens = np.random.default_rng(5).integers(0, 100, (3, 20)).astype(np.int64)  # 3: pads to 8
    np.save(work / "tokens.npy", tokens)
    ref = _hf_logits(hf_model, tokens)

    out32, js = str(work / "logits32.npy"), str(work / "logits32.json")
    assert evaluate.main(["--checkpoint", run_dir, "--tokens", str(work / "tokens.npy"),
                          "--save-logits", out32, "--dtype", "float32", "--json", js]) == 0
    got = np.load(out32)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    reported = json.load(open(js))["logits"]["next_token_loss"]
    assert reported == pytest.approx(float(_torch_ce(ref[:, :-1], tokens[:, 1:]).mean()), abs=1e-5)

    out16, js16 = str(work / "logits16.npy"), str(work / "logits16.json")
    assert evaluate.main(["--checkpoint", run_dir, "--tokens", str(work / "tokens.npy"),
                          "--save-logits", out16, "--json", js16]) == 0
    assert json.load(open(js16))["dtype"] == "bfloat16"
    got16 = np.load(out16)
    assert not np.array_equal(got16, got)  # really computed in bf16 ...
    # ... of the same model. The yardstick is the reference's own bf16 computation (the HF model
    # cast to bfloat16: the same matmuls on 8-bit-significand inputs, norms and softmax in fp32,
    # residual adds in bf16): ours may be at most 25% further from the fp32 logits than it, in RMS
    # and in the worst logit (the rounding order differs). With init_std 0.3 the bf16 error of this
    # model is ~2% of the logits' RMS (5 units of the bf16 roundoff 2**-8), so a 1% error in a
    # logit formula (~1% RMS, adding in quadrature) is below what bf16 resolves here; the fp32
    # comparison above (atol 1e-4) is the check that catches it.
    import torch

    with torch.no_grad():
        ref16 = copy.deepcopy(hf_model).to(torch.bfloat16)(
            torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    ours, theirs = got16 - ref, ref16 - ref
    assert np.sqrt(np.mean(ours**2)) <= 1.25 * np.sqrt(np.mean(theirs**2))
    assert np.abs(ours).max() <= 1.25 * np.abs(theirs).max()


def test_split_all_reads_one_epoch_of_every_file(work, run_dir, file_list):
    """--split all evaluates (tokens - 1) // seq samples of each file, ignoring the list weights."""
    from agpt_jax.data import IndexedDataset, read_file_list

    out = str(work / "all.json")
    assert evaluate.main(["--checkpoint", run_dir, "--data-file-list", file_list, "--split",
                          "all", "--json", out]) == 0
    results = json.load(open(out))["results"]
    expected = {e.corpus: (int(IndexedDataset(e.prefix).sizes.sum()) - 1) // SEQ
                for e in read_file_list(file_list)}
    assert {k: v["samples"] for k, v in results.items() if k != "total"} == expected
    total = sum(expected.values())
    assert results["total"]["samples"] == total
    weighted = sum(results[k]["loss"] * n for k, n in expected.items()) / total
    assert results["total"]["loss"] == pytest.approx(weighted, rel=1e-6)

    capped = str(work / "capped.json")
    assert evaluate.main(["--checkpoint", run_dir, "--data-file-list", file_list, "--split",
                          "all", "--max-samples", "4", "--json", capped]) == 0
    assert json.load(open(capped))["results"]["total"]["samples"] == 8


@pytest.mark.parametrize("case", ["no_checkpoint", "tokens_without_out", "bad_ids", "no_valid",
                                  "nothing_to_do", "bad_list", "bad_mesh", "logits_into_a_folder",
                                  "json_under_a_file"])
def test_bad_input_is_one_clear_line(work, run_dir, file_list, capsys, case):
    bad_ids = str(work / "bad_ids.npy")
    np.save(bad_ids, np.array([[1, 2, 500]]))
    os.makedirs(work / "dir.npy", exist_ok=True)
    argv, needle = {
        "no_checkpoint": (["--checkpoint", str(work / "nope"), "--data-file-list", file_list],
                          "nope: no such checkpoint directory"),
        "tokens_without_out": (["--checkpoint", run_dir, "--tokens", bad_ids],
                               "--tokens and --save-logits go together"),
        "bad_ids": (["--checkpoint", run_dir, "--tokens", bad_ids, "--save-logits",
                     str(work / "x.npy")], "outside the model's padded vocabulary [0, 112)"),
        "no_valid": (["--checkpoint", run_dir, "--data-file-list", file_list, "--data-split",
                      "1,0,0"], "pass --split all"),
        "nothing_to_do": (["--checkpoint", run_dir], "pass --data-file-list"),
        "bad_list": (["--checkpoint", run_dir, "--data-file-list", str(work / "missing.txt")],
                     "missing.txt' does not exist"),
        "bad_mesh": (["--checkpoint", run_dir, "--data-file-list", file_list, "--mesh",
                      "bogus=2"], "--mesh: mesh spec 'bogus=2': unknown axis 'bogus'"),
        "logits_into_a_folder": (["--checkpoint", run_dir, "--tokens", bad_ids, "--save-logits",
                                  str(work / "dir.npy")], f"--save-logits {work / 'dir.npy'}: is a "
                                                          "folder"),
        "json_under_a_file": (["--checkpoint", run_dir, "--data-file-list", file_list, "--json",
                               str(work / "bad_ids.npy" / "r.json")],
                              f"--json {work / 'bad_ids.npy' / 'r.json'}: {work / 'bad_ids.npy'} "
                              "is a file"),
    }[case]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and needle in err[0], err
    assert not os.path.exists(work / "x.npy")


def test_platform_names_are_the_runtimes():
    """scripts/evaluate.py spells out the platforms to stay jax-free at import."""
    from agpt_jax import runtime

    assert evaluate.PLATFORMS == runtime.PLATFORMS


@pytest.mark.parametrize("mesh_spec", ["", "data=2,fsdp=2,tensor=2"])
def test_eval_step_needs_no_optimizer_and_equals_the_trainers(run_dir, monkeypatch, mesh_spec):
    """agpt_jax.evaluate compiles training's eval step for the params alone: with the optimizer
    made unbuildable it still loads and evaluates, and its params' shardings and per-sequence
    losses are exactly those of the trainer's `evaluate` (what scripts/evaluate.py used before)."""
    import jax
    import optax

    from agpt_jax import evaluate as evaluate_lib
    from agpt_jax import optim
    from agpt_jax import train as train_lib

    def no_optimizer(*args, **kwargs):
        raise AssertionError("evaluation built an optimizer")

    with monkeypatch.context() as m:
        m.setattr(optim, "make_optimizer", no_optimizer)
        m.setattr(train_lib, "build_trainer", no_optimizer)
        loaded = evaluate_lib.LoadedModel(run_dir, "float32", mesh_spec)
        rows = np.random.default_rng(3).integers(0, 100, (11, SEQ + 1))
        losses = loaded.sequence_losses(rows, 5)  # padded to a multiple of the data-parallel size
    assert losses.shape == (11,) and losses.dtype == np.float32

    mesh = loaded.step.mesh
    trainer = train_lib.build_trainer(loaded.config, optim.OptimConfig(),
                                      optax.constant_schedule(0.0),
                                      train_lib.StepConfig(global_batch_size=loaded.data_parallel),
                                      mesh)
    ours = jax.tree.leaves(jax.tree.map(lambda a: a.sharding, loaded.step.abstract_params))
    theirs = jax.tree.leaves(jax.tree.map(lambda a: a.sharding, trainer.abstract_state.params))
    assert ours == theirs
    assert loaded.step.batch_sharding == trainer.batch_sharding
    b = loaded.batch_rows(5)
    padded = np.concatenate([rows, np.repeat(rows[:1], -len(rows) % b, axis=0)])
    reference = []
    for start in range(0, len(padded), b):
        chunk = padded[start:start + b]
        batch = {k: jax.device_put(v.astype(np.int32), trainer.batch_sharding)
                 for k, v in (("tokens", chunk[:, :-1]), ("labels", chunk[:, 1:]))}
        reference.append(np.asarray(trainer.evaluate(loaded.params, batch)["sequence_loss"]))
    np.testing.assert_array_equal(losses, np.concatenate(reference)[:len(rows)])
