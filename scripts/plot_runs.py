"""Plot training runs side by side: loss (total and per corpus), eval loss and LR against tokens.

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] --out runs.png

Each RUN_DIR is a `scripts/cpt.py` save folder holding `metrics.jsonl`: one JSON object per line,
train lines {"iteration", "tokens", "loss", "loss/<corpus>", "lr", ...} and eval lines
{"iteration", "tokens", "eval/loss", "eval/loss/<corpus>"}. The PNG has three panels sharing the
token axis: train loss (total solid, each corpus dashed or dotted), eval loss (points) and the
learning rate. One colour per run, labelled by the run folder's name, so e.g. CPT runs that rewarm
to LR/2, LR and 2LR can be compared at a glance.

Exit codes: 0 plotted; 2 bad input (a flag, a missing run folder, an unreadable or malformed
metrics.jsonl; the message names the file and line); 1 writing the PNG failed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from collections.abc import Sequence

import numpy as np
from absl import flags

from agpt_jax import cli
from agpt_jax.paths import output_file_problem

METRICS_FILE = "metrics.jsonl"
_CORPUS_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_CORPUS_MARKERS = ("s", "^", "D", "v", "P")


class RunDirError(ValueError):
    """A run folder is missing, or its metrics.jsonl cannot be plotted."""


@dataclasses.dataclass
class Series:
    """One curve: x in tokens, y values, both float64 [n] in file order."""

    tokens: np.ndarray
    values: np.ndarray


@dataclasses.dataclass
class RunMetrics:
    """The plottable metrics of one run.

    Attributes:
        label: legend name (the run folder's name).
        path: the metrics.jsonl read.
        loss: train loss per logged iteration.
        corpus_loss: corpus name -> its train loss (logged iterations where it had samples).
        lr: learning rate per logged iteration.
        eval_loss: eval loss per eval.
        eval_corpus_loss: corpus name -> eval loss.
    """

    label: str
    path: str
    loss: Series
    corpus_loss: dict[str, Series]
    lr: Series
    eval_loss: Series
    eval_corpus_loss: dict[str, Series]

    @property
    def corpora(self) -> list[str]:
        return sorted(set(self.corpus_loss) | set(self.eval_corpus_loss))


def _number(value: object, path: str, lineno: int, field: str) -> float:
    """A finite-or-nan float from a metrics field, or a RunDirError naming file, line and field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunDirError(f"{path}:{lineno}: field {field!r} is {value!r}, expected a number; "
                          "fix or delete that line")
    return float(value)


class _Collector:
    """Accumulates (tokens, value) pairs per series name."""

    def __init__(self) -> None:
        self.points: dict[str, tuple[list[float], list[float]]] = {}

    def add(self, name: str, tokens: float, value: float) -> None:
        xs, ys = self.points.setdefault(name, ([], []))
        xs.append(tokens)
        ys.append(value)

    def series(self, name: str) -> Series:
        xs, ys = self.points.get(name, ([], []))
        return Series(np.asarray(xs, np.float64), np.asarray(ys, np.float64))

    def by_prefix(self, prefix: str) -> dict[str, Series]:
        return {k[len(prefix):]: self.series(k) for k in sorted(self.points)
                if k.startswith(prefix)}


def read_run(run_dir: str, label: str | None = None) -> RunMetrics:
    """Read a run folder's metrics.jsonl.

    Args:
        run_dir: the run's save folder (or the metrics.jsonl file itself).
        label: legend name; default the folder's name.

    Returns:
        The run's series. Lines that are neither train nor eval lines (no "loss", no "eval/loss")
        are ignored; a resumed run that logs an iteration again keeps both points, in file order.

    Raises:
        RunDirError: the folder or file is missing or unreadable, a line is not JSON, a needed
            field is missing or not a number, or the file has no train line.
    """
    path = run_dir
    if os.path.isdir(run_dir):
        path = os.path.join(run_dir, METRICS_FILE)
    elif not run_dir.endswith(".jsonl"):
        raise RunDirError(f"{run_dir}: no such run folder; pass the --save folder of a cpt.py run")
    if not os.path.isfile(path):
        raise RunDirError(f"{path}: missing; {os.path.dirname(path) or '.'} is not a cpt.py run "
                          f"folder (it writes {METRICS_FILE} at its first log step)")
    if label is None:
        folder = os.path.dirname(os.path.abspath(path))
        label = os.path.basename(folder)
    c = _Collector()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                          f"{METRICS_FILE} is JSON lines written by cpt.py") from None
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror or e})") from None
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{lineno}: not a JSON object ({e.msg}); every line of "
                              f"{METRICS_FILE} must be one JSON object") from None
        if not isinstance(rec, dict):
            raise RunDirError(f"{path}:{lineno}: expected a JSON object, got "
                              f"{type(rec).__name__}")
        is_train, is_eval = "loss" in rec, "eval/loss" in rec
        if not (is_train or is_eval):
            continue
        if "tokens" not in rec:
            raise RunDirError(f"{path}:{lineno}: field 'tokens' is missing; every train and "
                              "eval line needs the tokens consumed so far")
        tokens = _number(rec["tokens"], path, lineno, "tokens")
        for key, value in rec.items():
            if key == "loss" or key.startswith("loss/") or key == "lr" or (
                    key.startswith("eval/loss")):
                if value is None:  # a corpus absent from this batch
                    continue
                c.add(key, tokens, _number(value, path, lineno, key))
    loss = c.series("loss")
    if loss.tokens.size == 0:
        raise RunDirError(f"{path}: no train line (a line with 'loss' and 'tokens'); the run has "
                          "not logged yet, or this is not a cpt.py metrics file")
    return RunMetrics(label=label, path=path, loss=loss, corpus_loss=c.by_prefix("loss/"),
                      lr=c.series("lr"), eval_loss=c.series("eval/loss"),
                      eval_corpus_loss=c.by_prefix("eval/loss/"))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over `window` points (the first points average what exists).

    Args:
        values: float64 [n].
        window: points per mean; 1 returns the values unchanged.

    Returns:
        float64 [n].
    """
    if window <= 1 or values.size == 0:
        return values
    csum = np.cumsum(np.concatenate(([0.0], values)))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _unique_labels(run_dirs: Sequence[str]) -> list[str]:
    """Folder names, extended with parent folders until they are all different."""
    parts = [os.path.abspath(d.rstrip("/")).split(os.sep) for d in run_dirs]
    if any(d.endswith(".jsonl") for d in run_dirs):
        parts = [p[:-1] if p[-1].endswith(".jsonl") else p for p in parts]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}: {'/'.join(p)}" for i, p in enumerate(parts)]


def _token_axis_label(runs: Sequence[RunMetrics]) -> tuple[float, str]:
    """Scale and label for the token axis (tokens, K, M, B) from the largest token count."""
    top = max(float(np.max(r.loss.tokens)) for r in runs)
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if top >= 10 * scale:
            return scale, f"tokens ({unit})"
    return 1.0, "tokens"


def plot_runs(runs: Sequence[RunMetrics], out_png: str, smooth_window: int = 1,
              title: str | None = None) -> str:
    """Draw the runs into one PNG.

    Args:
        runs: from `read_run`.
        out_png: the file to write (its folder is created).
        smooth_window: running-mean window of the train losses (eval and LR are never smoothed).
        title: figure title; default lists the runs.

    Returns:
        The absolute path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    corpora = sorted({name for r in runs for name in r.corpora})
    corpus_style = {n: _CORPUS_STYLES[i % len(_CORPUS_STYLES)] for i, n in enumerate(corpora)}
    corpus_marker = {n: _CORPUS_MARKERS[i % len(_CORPUS_MARKERS)] for i, n in enumerate(corpora)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    scale, xlabel = _token_axis_label(runs)

    fig, (ax_loss, ax_eval, ax_lr) = plt.subplots(1, 3, figsize=(18, 5.5), sharex=True)
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        ax_loss.plot(run.loss.tokens / scale, smooth(run.loss.values, smooth_window), color=color,
                     lw=1.6, ls="-")
        for name, s in run.corpus_loss.items():
            ax_loss.plot(s.tokens / scale, smooth(s.values, smooth_window), color=color, lw=1.0,
                         ls=corpus_style[name], alpha=0.8)
        if run.eval_loss.tokens.size:
            ax_eval.plot(run.eval_loss.tokens / scale, run.eval_loss.values, color=color, ls="-",
                         lw=1.0, marker="o", ms=5)
        for name, s in run.eval_corpus_loss.items():
            ax_eval.plot(s.tokens / scale, s.values, color=color, ls=corpus_style[name], lw=0.8,
                         marker=corpus_marker[name], ms=5, alpha=0.8)
        if run.lr.tokens.size:
            ax_lr.plot(run.lr.tokens / scale, run.lr.values, color=color, lw=1.6)

    suffix = f" (running mean of {smooth_window})" if smooth_window > 1 else ""
    ax_loss.set_title("train loss" + suffix)
    ax_eval.set_title("eval loss")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_eval, ax_lr):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if not any(r.eval_loss.tokens.size or r.eval_corpus_loss for r in runs):
        ax_eval.text(0.5, 0.5, "no eval lines in these runs", ha="center", va="center",
                     transform=ax_eval.transAxes, color="gray")
    if not any(r.lr.tokens.size for r in runs):
        ax_lr.text(0.5, 0.5, "no 'lr' in these runs", ha="center", va="center",
                   transform=ax_lr.transAxes, color="gray")
    _share_loss_limits(ax_loss, ax_eval, runs, smooth_window)

    run_handles = [Line2D([], [], color=colors[i % len(colors)], lw=2.5, label=r.label)
                   for i, r in enumerate(runs)]
    style_handles = [Line2D([], [], color="black", lw=1.6, ls="-", marker="o", ms=4,
                            label="total")]
    style_handles += [Line2D([], [], color="black", lw=1.0, ls=corpus_style[n],
                             marker=corpus_marker[n], ms=4, label=n) for n in corpora]
    ax_lr.legend(handles=run_handles, title="run", loc="best", fontsize=9)
    ax_eval.legend(handles=style_handles, title="corpus", loc="best", fontsize=9)
    fig.suptitle(title or "runs: " + ", ".join(r.label for r in runs), fontsize=11)
    fig.tight_layout()
    out_png = os.path.abspath(out_png)
    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _share_loss_limits(ax_loss, ax_eval, runs: Sequence[RunMetrics], window: int) -> None:
    """One y range for both loss panels, ignoring the first 5% of tokens (the initial spike)."""
    values = []
    for r in runs:
        series = [r.loss, *r.corpus_loss.values(), r.eval_loss, *r.eval_corpus_loss.values()]
        top = float(np.max(r.loss.tokens))
        for i, s in enumerate(series):
            if not s.values.size:
                continue
            v = smooth(s.values, window) if i <= len(r.corpus_loss) else s.values
            keep = s.tokens >= 0.05 * top if top > 0 else np.ones_like(v, bool)
            v = v[keep & np.isfinite(v)]
            if v.size:
                values.append(v)
    if not values:
        return
    allv = np.concatenate(values)
    lo, hi = float(np.min(allv)), float(np.max(allv))
    pad = max(0.05 * (hi - lo), 1e-3)
    if math.isfinite(lo) and math.isfinite(hi):
        for ax in (ax_loss, ax_eval):
            ax.set_ylim(lo - pad, hi + pad)


def parse_args(argv: Sequence[str] | None) -> types.SimpleNamespace:
    """The flags and RUN_DIRs of `argv` (sys.argv[1:] when None); bad ones exit 2."""
    fv = flags.FlagValues()
    flags.DEFINE_string("out", "runs.png", "PNG to write", flag_values=fv)
    flags.DEFINE_integer("smooth", 1, "running-mean window of the train losses, in logged points",
                         flag_values=fv)
    flags.DEFINE_string("title", None, "figure title", flag_values=fv)
    args, runs = cli.parse_args(fv, argv, __doc__)
    if not runs:
        print("error: pass one or more RUN_DIR (cpt.py --save folders) before or after the flags",
              file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    args.runs = runs
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smooth < 1:
        print(f"error: --smooth {args.smooth} must be at least 1", file=sys.stderr)
        return 2
    if not args.out.lower().endswith(".png"):
        print(f"error: --out {args.out!r} must end with .png", file=sys.stderr)
        return 2
    try:
        labels = _unique_labels(args.runs)
        runs = [read_run(d, label) for d, label in zip(args.runs, labels)]
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = output_file_problem(args.out)
    if problem:
        print(f"error: --out {args.out!r}: {problem}", file=sys.stderr)
        return 2
    try:
        out = plot_runs(runs, args.out, args.smooth, args.title)
    except OSError as e:
        print(f"error: writing --out {args.out!r} failed ({e})", file=sys.stderr)
        return 1
    for r in runs:
        last = r.loss.values[-1]
        ev = f", last eval loss {r.eval_loss.values[-1]:.4f}" if r.eval_loss.values.size else ""
        print(f"{r.label}: {r.loss.values.size} train points up to {r.loss.tokens[-1]:.0f} "
              f"tokens, last loss {last:.4f}{ev}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
