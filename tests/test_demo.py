"""The built-in demo end to end at its --quick size: every step runs and the results make sense.

One module-scoped run of `scripts/demo.py --quick` (corpora, tokenizer, preprocess, cosine
pretraining, constant-LR phase 1, universal export of both, mix, legacy CPT from the cosine model,
phase 2 (constant+cooldown) from phase 1, Megatron and HF export, evaluate, plot); the tests then
check properties of what it wrote.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from script_modules import load_script


demo = load_script("demo")


def _records(run_dir: str) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            (train if "loss" in rec else evals if "eval/loss" in rec else []).append(rec)
    return train, evals


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import contextlib
    import io

    out = str(tmp_path_factory.mktemp("demo") / "out")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(["--out", out, "--quick"])
    text = buf.getvalue()
    assert rc == 0, text[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return out, text, summary


def _run(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


@pytest.mark.slow
def test_every_step_reports_what_where_and_how_long(demo_run):
    out, text, summary = demo_run
    steps = [line for line in text.splitlines() if line.startswith("[")]
    assert [s.split("]")[0] + "]" for s in steps] == [f"[{i}/12]" for i in range(1, 13)]
    assert text.count("done in ") == 12
    assert len(summary["steps"]) == 12 and summary["seconds_total"] > 0
    paths = summary["paths"]
    for path in (paths["tokenizer"], paths["mix_list"], paths["plot"], paths["pretrain_plot"]):
        assert os.path.isfile(path) and path in text
    for path in paths["runs"] + [paths["universal_cosine"], paths["universal_phase1"]]:
        assert os.path.isdir(path) and path in text
    # The mix is 0.9 papers + 0.1 web, one line each.
    with open(paths["mix_list"]) as f:
        mix = [line.split() for line in f if line.strip()]
    assert [(float(w), c) for w, _, c in mix] == [(0.9, "papers"), (0.1, "web")]


@pytest.mark.slow
def test_pretraining_and_cpt_learn(demo_run):
    """Both pretraining runs lower the web loss; each CPT branch lowers the papers loss below that
    of the model it started from, measured by evaluate.py on held-out documents and in the run's
    own metrics."""
    out, _, summary = demo_run
    for name in ("pretrain_cosine", "phase1_constant"):
        train, evals = _records(_run(out, name))
        assert evals[-1]["eval/loss/web"] < train[0]["loss"] - 0.5, name
    loss = summary["loss"]
    assert loss["legacy"]["papers"] < loss["pretrained_cosine"]["papers"] - 0.05
    assert loss["constant_cooldown"]["papers"] < loss["phase1"]["papers"] - 0.05
    for name in ("legacy", "constant_cooldown"):
        train, _ = _records(_run(out, name))
        papers = [r["loss/papers"] for r in train if "loss/papers" in r]
        # Per-batch losses of one corpus move by +-0.3 here (logged batches of a few thousand
        # tokens), so the first and the last three batches are compared as means; a single first
        # batch was a coin toss (6.79 against a final mean of 6.80 on jax 0.11).
        assert np.mean(papers[-3:]) < np.mean(papers[:3]), name
        # Both corpora are in the CPT batches (replay), the papers share near 0.9.
        last = train[-1]
        share = last["tokens/papers"] / (last["tokens/papers"] + last["tokens/web"])
        assert 0.8 < share < 0.97, name


@pytest.mark.slow
def test_pretraining_runs_differ_only_in_the_schedule(demo_run):
    """Same init, data and peak LR: the same first loss and warmup; the cosine run decays to
    min_lr, phase 1 stays at its peak LR once warmed up (no decay, no cooldown)."""
    out, _, _ = demo_run
    cosine, _ = _records(_run(out, "pretrain_cosine"))
    phase1, _ = _records(_run(out, "phase1_constant"))
    assert len(cosine) == len(phase1)
    assert phase1[0]["loss"] == pytest.approx(cosine[0]["loss"], rel=1e-5)
    lr = [r["lr"] for r in phase1]
    peak = max(lr)
    assert lr[0] < 0.5 * peak  # the warmup at the start of pretraining
    top = lr.index(peak)
    assert all(b >= a for a, b in zip(lr[:top], lr[1:top + 1]))  # warmup only rises
    assert lr[top:] == pytest.approx([peak] * (len(lr) - top))  # never decays after it
    assert top < 0.2 * len(lr)
    assert max(r["lr"] for r in cosine) == pytest.approx(peak, rel=0.05)
    assert cosine[-1]["lr"] < 0.2 * peak


@pytest.mark.slow
def test_phase1_keeps_its_saves_and_phase2_continues_the_last(demo_run):
    out, _, summary = demo_run
    ckpts = os.path.join(_run(out, "phase1_constant"), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    phase1, _ = _records(_run(out, "phase1_constant"))
    n = len(phase1)
    assert steps == [n // 3, 2 * n // 3, n]  # every third of the run, all kept
    loaded = summary["phase1_checkpoint"]
    assert loaded["iteration"] == steps[-1]
    assert os.path.samefile(loaded["dir"], os.path.join(ckpts, str(steps[-1])))
    with open(os.path.join(summary["paths"]["universal_phase1"], "latest_universal")) as f:
        assert f.read().strip() == f"global_step{steps[-1]}_universal"


@pytest.mark.slow
def test_schedules_are_the_recipes(demo_run):
    """Legacy re-warms from ~0 and decays; phase 2 starts at the LR phase 1 had at the checkpoint
    it loaded (no re-warm), stays there, and ends cooled down."""
    out, _, summary = demo_run
    legacy, _ = _records(_run(out, "legacy"))
    cc, _ = _records(_run(out, "constant_cooldown"))
    phase1, _ = _records(_run(out, "phase1_constant"))
    loaded = summary["phase1_checkpoint"]["iteration"]
    lr_at_load = next(r["lr"] for r in phase1 if r["iteration"] == loaded)
    assert cc[0]["lr"] == pytest.approx(lr_at_load, rel=1e-6)  # no re-warm
    peak = max(r["lr"] for r in cc)
    assert peak == pytest.approx(lr_at_load, rel=1e-6)
    assert cc[len(cc) // 2]["lr"] == pytest.approx(peak, rel=1e-6)  # constant before the cooldown
    assert cc[-1]["lr"] < 0.5 * peak  # cooled down at its end
    legacy_peak = max(r["lr"] for r in legacy)
    assert legacy[0]["lr"] < 0.05 * legacy_peak  # warms up from ~0
    assert legacy[-1]["lr"] < 0.5 * legacy_peak


@pytest.mark.slow
def test_universal_round_trips_and_exports(demo_run):
    """Each CPT run, loading a universal checkpoint, starts from exactly the params of the model
    that was exported (its SAVE/converted_init); the CPT results exist as Megatron universal
    checkpoints and HF folders with the tokenizer."""
    from agpt_jax import checkpoint

    out, _, summary = demo_run
    for source, run in ((_run(out, "pretrain_cosine"), "legacy"),
                        (summary["phase1_checkpoint"]["dir"], "constant_cooldown")):
        a = dict(_flatten(checkpoint.restore_params(source)))
        b = dict(_flatten(checkpoint.restore_params(os.path.join(_run(out, run), "converted_init"))))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{run}: {k}")
    for name in ("legacy", "constant_cooldown"):
        assert os.path.isfile(os.path.join(out, "megatron", name, "latest_universal"))
        hf = os.path.join(out, "hf", name)
        cfg = json.load(open(os.path.join(hf, "config.json")))
        assert cfg["vocab_size"] == 2048 and cfg["num_hidden_layers"] == 4
        assert os.path.isfile(os.path.join(hf, "model.safetensors"))
        assert any(f.startswith("tokenizer") for f in os.listdir(hf))
    for png in (summary["paths"]["plot"], summary["paths"]["pretrain_plot"]):
        assert os.path.getsize(png) > 30_000


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield "/".join(map(str, prefix)), np.asarray(tree)


def test_out_folder_is_never_clobbered(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert demo.main(["--out", str(foreign), "--quick", "--overwrite"]) == 1
    assert "was not written by the demo" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / demo.MARKER).write_text("")
    (earlier / "cpt_runs.png").write_text("x")
    assert demo.main(["--out", str(earlier), "--quick"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (earlier / "cpt_runs.png").exists()


def test_corpora_come_from_the_installation():
    papers = list(demo.papers_documents())
    web = list(demo.web_documents(max_files=40))
    assert len(papers) > 100 and len(web) > 20
    assert all(0 < len(d) <= demo.DOC_CHARS or "\n\n" not in d for d in papers)
    assert not set(papers) & set(web)
    assert demo.chunk_text("a\n\nb\n\nc", max_chars=4) == ["a\n\nb", "c"]
