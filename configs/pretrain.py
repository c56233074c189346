"""Pretraining from scratch with a cosine schedule (Megatron's default recipe).

Random init (seed), linear warmup over the warmup fraction, cosine to MIN_LR over the run. The
built-in demo uses it to make the "legacy pretrained model" that the CPT recipes then continue.
LOAD must be empty; to continue a checkpoint use legacy.py or constant_cooldown.py. A run started
again with the same SAVE resumes from its newest checkpoint.

Usage: python scripts/cpt.py --config configs/pretrain.py:demo --config.data_file_list=web.txt
       --config.save=runs/pretrain
"""

from __future__ import annotations

import os

from collections.abc import Mapping

import ml_collections

from agpt_jax import recipes


def get_config(arg: str | None = None,
               environ: Mapping[str, str] | None = None) -> ml_collections.ConfigDict:
    """The pretraining recipe at scale `arg` (agpt_7b | demo | smoke)."""
    scale = recipes.parse_arg(arg, "pretrain")
    lr, min_lr = {"agpt_7b": (2e-4, 2e-5), "demo": (2e-3, 2e-4), "smoke": (1e-3, 1e-4)}[scale]
    c = recipes.base_config("pretrain", scale, lr=lr, min_lr=min_lr, lr_decay_style="cosine",
                            lr_warmup_frac=0.05,
                            environ=os.environ if environ is None else environ)
    c.load = ""  # the env LOAD is ignored: pretraining starts from random weights
    return c
