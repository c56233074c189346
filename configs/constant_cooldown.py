"""Constant LR + cooldown recipe (phase 1 -> phase 2, "WSD" in the literature).

Continue at a constant LR with no re-warm (warmup fraction 0), so the model never forgets through
a warmup spike, and optionally cool down over the last `cooldown_frac` of the run with the 1-sqrt
shape to MIN_LR (Megatron's `--lr_constant_plus_cooldown`, spec §2.3; Hägele et al. 2024 find
~20% of the run enough). Any constant-LR checkpoint can later be branched into a cooldown with
configs/cooldown.py, so a converged model can be had at any point.

The source checkpoint must not be cooled down already: if its recorded LR (the metadata's
param_groups lr, or a run's last LR) is below 0.9 x the configured LR, the run refuses with an
explanation; `--config.allow_cooled_down_source=True` overrides that.

Load semantics are those of configs/legacy.py (iteration and schedule reset, Adam state loaded
unless `load_optimizer_state=False`).

Usage: python scripts/cpt.py --config configs/constant_cooldown.py:demo --config.cooldown_frac=0.2
"""

from __future__ import annotations

import os
import sys

import ml_collections

# config_flags loads this file by path; make its sibling `common.py` importable from any folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The constant+cooldown recipe at scale `arg` (agpt_7b | demo | smoke)."""
    scale = common.parse_arg(arg, "constant_cooldown")
    lr, min_lr = {"agpt_7b": (2e-4, 2e-5), "demo": (1e-3, 1e-4), "smoke": (1e-3, 1e-4)}[scale]
    c = common.base_config("constant_cooldown", scale, lr=lr, min_lr=min_lr,
                           lr_decay_style="constant", lr_warmup_frac=0.0)
    c.cooldown_frac = 0.2
    return c
