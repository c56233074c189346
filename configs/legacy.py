"""Legacy CPT recipe: replay + re-warm, as AuroraGPT runs it with Megatron-DeepSpeed.

Megatron's `--universal-checkpoint --finetune` (spec §2.6): start from a (converted) universal
checkpoint, reset the iteration and the LR schedule to 0, re-warm linearly to LR over the warmup
fraction, then cosine to MIN_LR over the run. Replay is the DATA_FILE_LIST itself: list the new
corpus and a share of the old one (e.g. 0.9 papers + 0.1 web, Ibrahim et al. 2024).

Optimizer state on load (`load_optimizer_state`):
  True (default): Adam moments and the Adam step are restored, as Megatron's universal load does
    even with --finetune (bias correction continues from the old step).
  False: fresh zero moments and step 0.
The one deliberate difference from Megatron: Megatron's first CPT step runs at the checkpoint's
saved LR (the scheduler has not stepped yet when the param groups are overwritten from the
checkpoint); agpt-jax's first step runs at the schedule's LR (0 at the start of the warmup).

LOAD may be an agpt-jax checkpoint, a run's SAVE folder, a DeepSpeed universal checkpoint
(root with latest_universal, or a global_stepN_universal folder) or a DeepSpeed ZeRO-1 checkpoint
at TP = PP = 1 (root with latest, or a global_stepN folder); the last two are converted once into
SAVE/converted_init/.

Usage: python scripts/cpt.py --config configs/legacy.py:demo --config.load=... --config.save=...
"""

from __future__ import annotations

import os

from collections.abc import Mapping

import ml_collections

from agpt_jax import recipes


def get_config(arg: str | None = None,
               environ: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """The legacy recipe at scale `arg` (agpt_7b | demo | smoke)."""
    scale = recipes.parse_arg(arg, "legacy")
    # AuroraGPT launcher defaults (spec §1.2): LR 2e-4, cosine, warmup fraction 0.05, min_lr 0.
    lr, min_lr = {"agpt_7b": (2e-4, 0.0), "demo": (1e-3, 1e-4), "smoke": (1e-3, 1e-4)}[scale]
    return recipes.base_config("legacy", scale, lr=lr, min_lr=min_lr, lr_decay_style="cosine",
                               lr_warmup_frac=0.05,
                               environ=os.environ if environ is None else environ)
