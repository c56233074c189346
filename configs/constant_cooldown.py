"""Constant LR + cooldown recipe (phase 1 -> phase 2, "WSD" in the literature): the seed's command.

AuroraGPT's phase-2 command is

    LOAD=<phase-1 checkpoint> TRAIN_TOKENS=$((22*10**9)) GRAD_ACC_STEPS=16 LR=0.0002 \
    LR_DECAY_STYLE=constant LR_WARMUP_FRAC=0.0 \
      bash train_alcf.sh --universal-checkpoint --finetune --lr_constant_plus_cooldown

and this recipe does what Megatron-DeepSpeed does with it (spec megatron-deepspeed.md §1.2, §2.3):
continue at the constant LR with no re-warm (warmup fraction 0), then a 1-sqrt cooldown over the
last 0.05 of the run (`--lr_constant_plus_cooldown_frac`'s default) down to min_lr 0 (the launcher
passes no `--min-lr`; Megatron's default is 0.0). The same at every scale.

Choosing another cooldown. Hägele et al. (2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations") find a 1-sqrt cooldown over ~20% of the run matches a tuned cosine, and
a floor of LR/10 keeps the last updates useful; 5% to 0 is the seed's choice (short, so that most
tokens are spent at the peak LR and the constant checkpoints stay branchable). For their choice:

    --lr_constant_plus_cooldown_frac 0.2 --min-lr 2e-5        (Megatron flags), or
    --config.cooldown_frac=0.2 --config.min_lr=2e-5           (MIN_LR=2e-5 in the env works too)

`cooldown_frac=0` continues at the constant LR with no cooldown at all (phase 1); any constant-LR
checkpoint can later be branched into a cooldown with configs/cooldown.py.

The source checkpoint must not be cooled down already: if its recorded LR (the metadata's
param_groups lr, or a run's last LR) is below 0.9 x the configured LR, the run refuses with an
explanation; `--config.allow_cooled_down_source=True` overrides that.

Load semantics are those of configs/legacy.py (iteration and schedule reset, Adam state loaded
unless `load_optimizer_state=False`).

Usage: python scripts/cpt.py --config configs/constant_cooldown.py:demo --config.load=... \
       --config.save=... [--universal-checkpoint --finetune --lr_constant_plus_cooldown]
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_collections

from agpt_jax import recipes

# Megatron's --lr_constant_plus_cooldown_frac default and --min-lr default (spec §2.3, §1.2).
MEGATRON_COOLDOWN_FRAC = 0.05
MEGATRON_MIN_LR = 0.0


def get_config(arg: str | None = None,
               environ: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """The constant+cooldown recipe at scale `arg` (agpt_7b | demo | smoke)."""
    scale = recipes.parse_arg(arg, "constant_cooldown")
    lr = {"agpt_7b": 2e-4, "demo": 1e-3, "smoke": 1e-3}[scale]
    c = recipes.base_config("constant_cooldown", scale, lr=lr, min_lr=MEGATRON_MIN_LR,
                            lr_decay_style="constant", lr_warmup_frac=0.0,
                            environ=os.environ if environ is None else environ)
    c.cooldown_frac = MEGATRON_COOLDOWN_FRAC
    return c
