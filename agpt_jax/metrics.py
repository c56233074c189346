"""Run metrics: throughput and MFU, per-corpus losses, JSONL + TensorBoard writing, progress bar.

Only process 0 writes (`MetricsWriter(enabled=runtime.is_main_process)`). metrics.jsonl holds one
JSON object per line; train lines carry "iteration", "tokens", "loss", "loss/<corpus>",
"tokens/<corpus>", "lr", "grad_norm", "update_norm", "tokens_per_s", "tflops_per_device", "mfu",
"skipped"; eval lines carry "iteration", "tokens", "eval/loss", "eval/loss/<corpus>".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging


def peak_tflops(capabilities: Any, configured: float) -> float:
    """The MFU denominator: `configured` when > 0, else the platform's peak (0 when unknown).

    The peak is the runtime's (``Capabilities.peak_tflops_per_device``, with its sources, in
    agpt_jax/runtime/capabilities.py: 416 TFLOP/s bf16 per XPU stack, 0 elsewhere).

    Args:
        capabilities: ``Runtime.capabilities`` (anything with ``peak_tflops_per_device``).
        configured: ``peak_tflops_per_device`` of the run config; 0 uses the platform's.
    """
    if configured > 0:
        return configured
    return float(capabilities.peak_tflops_per_device)


def throughput(tokens: int, seconds: float, flops_per_token: float, devices: int,
               peak: float) -> dict[str, float]:
    """tokens_per_s, tflops_per_device and mfu of `tokens` processed in `seconds` on `devices`.

    Args:
        tokens: tokens of the step(s) timed.
        seconds: wall time.
        flops_per_token: training FLOPs per token (GPTConfig.flops_per_token).
        devices: jax devices of the job.
        peak: peak TFLOP/s per device; 0 gives mfu 0.
    """
    seconds = max(seconds, 1e-9)
    tps = tokens / seconds
    tflops = tps * flops_per_token / devices / 1e12
    return {"tokens_per_s": tps, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak > 0 else 0.0}


def per_corpus_mean(values: np.ndarray, corpus: np.ndarray,
                    names: Sequence[str]) -> dict[str, float]:
    """Mean of `values` [rows] over the rows of each corpus (corpora with no rows are left out).

    Args:
        values: float [rows] (e.g. the per-sequence loss).
        corpus: int [rows] corpus id of each row, indexing `names`.
        names: corpus names.
    """
    out = {}
    for i, name in enumerate(names):
        sel = corpus == i
        if np.any(sel):
            out[name] = float(np.mean(values[sel]))
    return out


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in the run directory (a no-op when disabled).

    Args:
        run_dir: the run directory.
        enabled: False on every process but 0.
    """

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(run_dir)

    def write(self, record: Mapping[str, float | int], step_key: str = "iteration") -> None:
        """Appends one record (flushed) and its scalars to TensorBoard at step record[step_key]."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(dict(record)) + "\n")
        self._jsonl.flush()
        step = int(record[step_key])
        for key, value in record.items():
            if key not in (step_key,) and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False


class Progress:
    """A tqdm bar over iterations with ETA (process 0 only; absl logs are the fallback)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                             desc="train")

    def update(self, postfix: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (for tests and tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def log_line(record: Mapping[str, float]) -> None:
    """One console line of a train record."""
    logging.info("iteration %d tokens %d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f mfu %.3f%s",
                 record["iteration"], record["tokens"], record["loss"], record["lr"],
                 record["grad_norm"], record["tokens_per_s"], record["mfu"],
                 " SKIPPED (non-finite)" if record["skipped"] else "")
