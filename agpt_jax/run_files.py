"""What a run writes before it trains, and the dry run that writes only that.

A run directory gets config.json (the resolved config) and the LR schedule of the whole run
(lr_schedule.csv, lr_schedule.png) before the first step; the dry run checks every input, writes
these three files and returns a summary (agpt_jax.checkpoint documents the rest of the run
directory).

May import: config, data, schedules, checkpoint, runtime. Not loop, not
converters.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from agpt_jax import checkpoint
from agpt_jax import schedules
from agpt_jax.config import RunConfig, describe, write_config_json
from agpt_jax.data import read_file_list
from agpt_jax.data.indexed import IndexedDataset
from agpt_jax.data.samples import num_epochs_for, parse_split
from agpt_jax.runtime import Runtime


@dataclasses.dataclass
class DryRunReport:
    """What `dry_run` found and wrote."""

    summary: str
    lr_csv: str
    lr_png: str


def lr_schedule_rows(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(iterations 1..train_iters, the LR each iteration's update uses), float64."""
    its = np.arange(1, cfg.train_iters + 1)
    # lr_at_iterations(k) is the LR after k completed iterations: the one iteration k+1 uses.
    return its, schedules.lr_at_iterations(cfg.schedule, its - 1)


def write_lr_schedule(cfg: RunConfig, run_dir: str) -> tuple[str, str]:
    """Writes lr_schedule.csv (header `iteration,lr`) and lr_schedule.png; returns their paths."""
    its, lrs = lr_schedule_rows(cfg)
    csv_path = os.path.join(run_dir, "lr_schedule.csv")
    with open(csv_path + ".tmp", "w") as f:
        f.write("iteration,lr\n")
        for i, lr in zip(its, lrs):
            f.write(f"{int(i)},{float(lr)!r}\n")  # repr: shortest exact float text
    os.replace(csv_path + ".tmp", csv_path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    tokens = its * cfg.batch.tokens_per_iteration
    ax.plot(tokens, lrs)
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{cfg.recipe}: {cfg.schedule.style}, {cfg.train_iters} iterations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = os.path.join(run_dir, "lr_schedule.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def prepare_run_dir(cfg: RunConfig, rt: Runtime) -> None:
    if rt.is_main_process:
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_config_json(cfg, os.path.join(cfg.run_dir, "config.json"))
        write_lr_schedule(cfg, cfg.run_dir)


def _describe_source(load: str) -> str:
    directory = checkpoint.resolve_checkpoint_dir(load)
    checkpoint.read_metadata(directory)
    return f"{directory}: agpt-jax checkpoint" + (
        " with Adam state" if checkpoint.has_adam(directory) else " (params only)")


def _data_summary(cfg: RunConfig, start_iteration: int = 0) -> list[str]:
    entries = read_file_list(cfg.data.file_list, check_files=True)
    total_w = sum(e.weight for e in entries)
    train_frac = parse_split(cfg.data.split)[0]
    samples = (start_iteration + cfg.train_iters) * cfg.batch.global_batch_size
    lines, shares = [], {}
    for e in entries:
        shares[e.corpus] = shares.get(e.corpus, 0.0) + e.weight / total_w
        tokens = IndexedDataset(e.prefix).num_tokens
        need = int(math.ceil(samples * e.weight / total_w * 1.005))
        train_tokens = max(1, int(tokens * train_frac))
        epochs = num_epochs_for(train_tokens, cfg.batch.seq_length, need)
        lines.append(f"file {e.prefix} corpus {e.corpus}: {tokens:,} tokens, {need:,} train "
                     f"samples, ~{epochs} epoch(s)")
    lines += [f"corpus {name}: share {share:.4f}" for name, share in sorted(shares.items())]
    return lines


def dry_run(cfg: RunConfig, rt: Runtime, load_description: str | None = None) -> DryRunReport:
    """Checks every input, writes config.json and the LR schedule (CSV, PNG), returns a summary.

    `load_description` is the summary's line on LOAD (converters.load.describe, which also
    knows universal checkpoints); without it LOAD must be an agpt-jax checkpoint.

    Raises:
        DataError: the DATA_FILE_LIST or a file in it is missing or malformed (names the file).
        CheckpointError: LOAD is not a checkpoint.
    """
    lines = [describe(cfg)]
    lines += _data_summary(cfg)
    if cfg.checkpoint.load:
        lines.append(f"load: {load_description or _describe_source(cfg.checkpoint.load)}")
    prepare_run_dir(cfg, rt)
    csv_path = os.path.join(cfg.run_dir, "lr_schedule.csv")
    png_path = os.path.join(cfg.run_dir, "lr_schedule.png")
    lines.append(f"wrote {os.path.join(cfg.run_dir, 'config.json')}, {csv_path}, {png_path}")
    return DryRunReport(summary="\n".join(lines), lr_csv=csv_path, lr_png=png_path)
