"""Cooldown branch: N tokens of 1-sqrt cooldown from any constant-LR checkpoint (the WSD payoff).

LOAD is a constant-LR checkpoint (usually a step of a constant_cooldown run with cooldown_frac=0).
The branch runs `cooldown_tokens // SEQ // GLOBAL_BATCH` iterations whose LR falls from LR to
MIN_LR with the 1-sqrt shape over the whole branch (Megatron's constant style with
`--lr_constant_plus_cooldown_frac 1.0`, spec §2.3). Params and Adam state are loaded; the data
stream continues where the source run stopped (the source's consumed iterations), so the branch
sees new batches, as a cooldown at the end of that run would.

Usage: python scripts/cpt.py --config configs/cooldown.py:demo --config.load=RUN/checkpoints/80
       --config.cooldown_tokens=200000
"""

from __future__ import annotations

import os

from collections.abc import Mapping

import ml_collections

from agpt_jax import recipes


def get_config(arg: str | None = None,
               environ: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """The cooldown branch at scale `arg` (agpt_7b | demo | smoke)."""
    scale = recipes.parse_arg(arg, "cooldown")
    lr, min_lr = {"agpt_7b": (2e-4, 2e-5), "demo": (1e-3, 1e-4), "smoke": (1e-3, 1e-4)}[scale]
    c = recipes.base_config("cooldown", scale, lr=lr, min_lr=min_lr, lr_decay_style="constant",
                            lr_warmup_frac=0.0,
                            environ=os.environ if environ is None else environ)
    c.cooldown_frac = 1.0
    # The branch length; it replaces train_tokens / train_iters.
    c.cooldown_tokens = {"agpt_7b": 2_000_000_000, "demo": 40 * 128 * 16, "smoke": 4 * 32 * 16}[scale]
    c.train_tokens, c.train_iters = 0, 0
    return c
