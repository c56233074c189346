"""scripts/plot_runs.py: reads several runs' metrics.jsonl, writes one PNG, rejects bad run dirs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from script_modules import load_script


plot_runs = load_script("plot_runs")


def _write_run(folder, peak_lr: float, iters: int = 60, eval_every: int = 20) -> dict:
    """A metrics.jsonl as cpt.py writes it (train, eval and a non-metric line); returns truth."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(int(peak_lr * 1e6))
    truth = {"loss": [], "papers": [], "lr": [], "eval": [], "tokens": []}
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"event": "start", "iteration": 0}) + "\n")
        for it in range(1, iters + 1):
            tokens = it * 4 * 32
            lr = peak_lr * 0.5 * (1 + math.cos(math.pi * it / iters))
            loss = 3.0 + 2.0 * math.exp(-it / 15) + 0.05 * rng.standard_normal()
            rec = {"iteration": it, "tokens": tokens, "loss": loss, "loss/papers": loss - 0.2,
                   "loss/web": loss + 0.4 if it % 3 else None, "tokens/papers": 96,
                   "tokens/web": 32, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.1}
            f.write(json.dumps(rec) + "\n")
            truth["loss"].append(loss)
            truth["papers"].append(loss - 0.2)
            truth["lr"].append(lr)
            truth["tokens"].append(tokens)
            if it % eval_every == 0:
                f.write(json.dumps({"iteration": it, "tokens": tokens, "eval/loss": loss + 0.1,
                                    "eval/loss/papers": loss, "eval/loss/web": loss + 0.5}) + "\n")
                truth["eval"].append(loss + 0.1)
    return truth


def test_read_run_series(tmp_path):
    truth = _write_run(tmp_path / "lr", 3e-4)
    run = plot_runs.read_run(str(tmp_path / "lr"))
    assert run.label == "lr"
    np.testing.assert_array_equal(run.loss.tokens, truth["tokens"])
    np.testing.assert_allclose(run.loss.values, truth["loss"])
    np.testing.assert_allclose(run.corpus_loss["papers"].values, truth["papers"])
    np.testing.assert_allclose(run.lr.values, truth["lr"])
    np.testing.assert_allclose(run.eval_loss.values, truth["eval"])
    assert run.corpora == ["papers", "web"]
    # null per-corpus values (the corpus had no sample in that batch) are skipped, not zeros.
    assert run.corpus_loss["web"].values.size == 40
    assert run.eval_corpus_loss["web"].tokens.tolist() == [2560, 5120, 7680]


def test_smooth_is_a_trailing_mean():
    x = np.arange(10, dtype=np.float64) ** 2
    got = plot_runs.smooth(x, 3)
    ref = [np.mean(x[max(0, i - 2):i + 1]) for i in range(10)]
    np.testing.assert_allclose(got, ref)
    np.testing.assert_array_equal(plot_runs.smooth(x, 1), x)


def test_three_runs_make_one_png(tmp_path, capsys):
    for name, lr in (("rewarm_half", 1.5e-4), ("rewarm_lr", 3e-4), ("rewarm_2lr", 6e-4)):
        _write_run(tmp_path / name, lr)
    out = tmp_path / "plots" / "cpt.png"
    assert plot_runs.main([str(tmp_path / n) for n in ("rewarm_half", "rewarm_lr", "rewarm_2lr")]
                          + ["--out", str(out), "--smooth", "3"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000  # three panels of curves, not an empty canvas
    import matplotlib.image

    img = matplotlib.image.imread(str(out))
    assert img.shape[1] > 2 * img.shape[0]  # panels side by side
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 50  # colours were drawn
    printed = capsys.readouterr().out
    assert "rewarm_2lr: 60 train points" in printed and str(out) in printed


def test_same_folder_names_get_parent_labels(tmp_path):
    _write_run(tmp_path / "a" / "run", 1e-4)
    _write_run(tmp_path / "b" / "run", 2e-4)
    labels = plot_runs._unique_labels([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")])
    assert labels == ["a/run", "b/run"]


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "bad_json", "bad_number",
                                  "no_tokens", "no_train_lines", "not_utf8"])
def test_bad_run_dirs_give_one_clear_line(tmp_path, capsys, case):
    good = tmp_path / "good"
    _write_run(good, 1e-4)
    bad = tmp_path / "bad"
    bad.mkdir()
    metrics = bad / "metrics.jsonl"
    line = {"iteration": 1, "tokens": 128, "loss": 3.0, "lr": 1e-4}
    if case == "missing_dir":
        bad = tmp_path / "nope"
        needle = "nope: no such run folder"
    elif case == "no_metrics":
        needle = "metrics.jsonl: missing"
    elif case == "bad_json":
        metrics.write_text(json.dumps(line) + "\n{not json\n")
        needle = "metrics.jsonl:2: not a JSON object"
    elif case == "bad_number":
        metrics.write_text(json.dumps(dict(line, loss="high")) + "\n")
        needle = "metrics.jsonl:1: field 'loss' is 'high', expected a number"
    elif case == "no_tokens":
        metrics.write_text(json.dumps({"iteration": 1, "loss": 3.0}) + "\n")
        needle = "metrics.jsonl:1: field 'tokens' is missing"
    elif case == "not_utf8":
        metrics.write_bytes(b"\xff\xfe" + json.dumps(line).encode() + b"\n")
        needle = "bad/metrics.jsonl: not UTF-8 text"
    else:
        metrics.write_text(json.dumps({"iteration": 1, "tokens": 1, "eval/loss": 3.0}) + "\n")
        needle = "no train line"
    out = tmp_path / "x.png"
    assert plot_runs.main([str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("case", ["folder", "under_a_file"])
def test_bad_out_is_a_usage_error(tmp_path, capsys, case):
    good = tmp_path / "good"
    _write_run(good, 1e-4)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "plots.png").mkdir()
    out = {"folder": tmp_path / "plots.png",
           "under_a_file": tmp_path / "a_file" / "sub" / "x.png"}[case]
    assert plot_runs.main([str(good), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out '{out}': "), err
    assert ("is a folder" if case == "folder" else f"{tmp_path / 'a_file'} is a file") in err[0]
