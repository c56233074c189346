"""DeepSpeed ZeRO stage-1 checkpoint -> agpt-jax Orbax checkpoint, streamed rank by rank.

    python -m converters.zero_to_orbax --load SRC --save DST [--no-optimizer-state]
        [--model-config PRESET_OR_JSON]

SRC is Megatron's `--load` root (its `latest` tag is followed) or a `global_stepN` folder of a
Megatron-DeepSpeed run at TP = PP = 1 (any DP size; DeepSpeedZeroOptimizer or BF16_Optimizer
files, fp32 or bf16). DST gets exactly what `converters.universal_to_orbax` writes for the
universal checkpoint ds_to_universal would make of SRC: fp32 params, Adam's exp_avg / exp_avg_sq
and step, the same metadata (from the model-states file, rank 0's optimizer state as ds_to_universal
reduces it, and its param groups). Vocabulary tensors keep their first original_vocab_size rows
and get zero rows up to padded_vocab_size, as the universal path does (ds_to_universal cuts the
rows, DeepSpeed's universal load pads them with zeros), so both paths agree bit for bit.

Every rank file is checked before anything is written (converters/zero.py); the ranks are then
read in order, memory-mapped, once per state (fp32, exp_avg, exp_avg_sq), and each parameter is
laid out and written asynchronously as soon as its last fragment is in, so peak memory is a few
tensors. Nothing is left at DST on failure.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
from absl import logging

from converters import megatron_layout
from converters import universal_to_orbax as u2o
from converters import zero

ConvertOptions = u2o.ConvertOptions


def convert(src: str, dst: str, options: ConvertOptions = ConvertOptions()) -> str:
    """Convert a ZeRO checkpoint to an agpt-jax checkpoint directory.

    Args:
        src: `--load` root or global_stepN folder.
        dst: the checkpoint directory to create (must not exist).
        options: see universal_to_orbax.ConvertOptions.

    Returns:
        The absolute path of the written checkpoint.

    Raises:
        ZeroCheckpointError / ConversionError: bad input; nothing is left at dst.
    """
    from tqdm import tqdm

    init_ns = time.time_ns()
    ckpt = zero.open_zero(src, options.expected_config)
    cfg = ckpt.config
    step = ckpt.step if options.optimizer_state else None
    if step is not None and step != int(step):
        raise zero.ZeroCheckpointError(f"{ckpt.rank_paths[0]}: Adam step {step}, not a whole "
                                       "number of steps")
    states = [s for s, _, _ in u2o.state_plan(options.optimizer_state)]
    total = sum(os.path.getsize(p) for p in ckpt.rank_paths)
    logging.info("converting %s (%d ranks, %.2f GB) -> %s", ckpt.folder, len(ckpt.rank_paths),
                 total / 1e9, dst)

    def tensors() -> u2o.Tensors:
        # One pass over the ranks per state: a pass touches only that state's pages of each
        # memory-mapped rank file, and holds at most one parameter per group that continues on
        # the next rank, so the largest tensor is assembled once at a time, not three times.
        with tqdm(total=len(ckpt.tensors) * len(states), unit="tensor", desc="zero->orbax",
                  disable=None if options.progress else True) as bar:
            for state in states:
                for t, values in ckpt.stream((state,)):
                    w = values.pop(state)
                    if t.is_vocab:  # the universal format's rows, zero-padded as on its load
                        w = megatron_layout.pad_vocab_rows(w[:cfg.vocab_size],
                                                           cfg.padded_vocab_size)
                    yield t, state, w
                    del w
                    bar.update(1)

    metadata = u2o.build_metadata(ckpt, step, created_by="converters.zero_to_orbax")
    u2o.write_checkpoint(dst, cfg, step, tensors, metadata,
                         options.max_inflight_bytes or u2o.INFLIGHT_BYTES, init_ns)
    logging.info("wrote %s", dst)
    return os.path.abspath(dst)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code: 0, 2 bad input, 1 a failed write."""
    return u2o.to_orbax_cli(__doc__, "ZeRO --load root or global_stepN folder", convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
