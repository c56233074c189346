"""DeepSpeed universal checkpoint -> agpt-jax Orbax checkpoint, one tensor at a time.

    python -m converters.universal_to_orbax --load SRC --save DST [--no-optimizer-state]
        [--model-config PRESET_OR_JSON]

SRC is Megatron's `--load` root (the `latest_universal` tag is followed) or a
`global_stepN_universal` folder. DST gets the layout of `agpt_jax.checkpoint`: fp32 params,
Adam's raw first and second moments (torch exp_avg, exp_avg_sq) with the checkpoint's step, and
metadata (source, iteration, model config, vocab sizes, param groups, Megatron args).

Peak memory is a small multiple of the largest Megatron tensor: each tensor is read (memory-mapped),
laid out and written as whole chunks before the next one is read. Everything is written to
`DST.tmp-<host>-<pid>` and renamed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np
from absl import logging

from agpt_jax import checkpoint
from agpt_jax.model import GPTConfig, get_preset
from converters import megatron_layout as ml
from converters import universal as uv
from converters import write_atomically, run_cli, ConversionError


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Options of universal -> Orbax.

    Attributes:
        optimizer_state: also write Adam moments and step (`adam/`).
        expected_config: a config to check the checkpoint's args against, or None.
        max_inflight_bytes: cap on source bytes held by pending asynchronous writes; None picks
            twice the largest tensor.
        progress: show a tqdm bar over tensors and bytes.
    """

    optimizer_state: bool = True
    expected_config: GPTConfig | None = None
    max_inflight_bytes: int | None = None
    progress: bool = True


def parse_model_config(value: str) -> GPTConfig:
    """A preset name (agpt_jax.model.PRESETS) or a JSON file / string of GPTConfig fields."""
    if os.path.isfile(value):
        with open(value) as f:
            text = f.read()
    elif value.lstrip().startswith("{"):
        text = value
    else:
        return get_preset(value)
    try:
        fields = json.loads(text)
        return GPTConfig(**fields)
    except (json.JSONDecodeError, TypeError) as e:
        raise ConversionError(f"--model-config {value!r}: not a preset or GPTConfig JSON ({e})")


def _state_plan(optimizer_state: bool) -> list[tuple[str, tuple[str, ...], str]]:
    """(universal file, leaf prefix, item) for each state converted."""
    plan = [("fp32", (), checkpoint.ITEM_PARAMS)]
    if optimizer_state:
        plan += [("exp_avg", ("mu",), checkpoint.ITEM_ADAM), ("exp_avg_sq", ("nu",), checkpoint.ITEM_ADAM)]
    return plan


def _saved_lr(groups: list[dict]) -> float | None:
    """The LR the optimizer last used (its first param group's), as DeepSpeed saved it."""
    lrs = [g.get("lr") for g in groups if isinstance(g, dict) and g.get("lr") is not None]
    return float(lrs[0]) if lrs else None


def build_metadata(ckpt: uv.UniversalCheckpoint, step: float | None) -> dict:
    """The agpt-jax metadata of a converted checkpoint (all JSON-safe)."""
    cfg = ckpt.config
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "created_by": "converters.universal_to_orbax",
        "source": ckpt.folder,
        "iteration": ckpt.iteration,
        "adam_step": step,
        "has_optimizer_state": step is not None,
        "model": dataclasses.asdict(cfg),
        "original_vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "name_scheme": ckpt.scheme.value,
        "param_groups": uv.to_jsonable(ckpt.param_groups),
        "last_lr": _saved_lr(ckpt.param_groups),
        "megatron_args": uv.to_jsonable(ckpt.args),
        "checkpoint_version": uv.to_jsonable(ckpt.checkpoint_version),
        "universal_checkpoint_info": uv.to_jsonable(ckpt.universal_info),
        "zero_optimizer_state": uv.to_jsonable(ckpt.optimizer_state),
        "megatron_model_states": ckpt.model_states_extra,
    }


def convert(src: str, dst: str, options: ConvertOptions = ConvertOptions()) -> str:
    """Convert a universal checkpoint to an agpt-jax checkpoint directory.

    Args:
        src: `--load` root or global_stepN_universal folder.
        dst: the checkpoint directory to create (must not exist).
        options: see ConvertOptions.

    Returns:
        The absolute path of the written checkpoint.

    Raises:
        UniversalCheckpointError / ConversionError: bad input; nothing is left at dst.
    """
    from tqdm import tqdm

    init_ns = time.time_ns()
    ckpt = uv.open_universal(src, options.expected_config)
    cfg = ckpt.config
    step = ckpt.read_step() if options.optimizer_state else None
    if step is not None and step != int(step):
        raise uv.UniversalCheckpointError(f"{ckpt.folder}: step.pt holds {step}, not a whole "
                                          "number of Adam steps")
    plan = _state_plan(options.optimizer_state)
    files = [(t, state, prefix, item) for t in ckpt.tensors for state, prefix, item in plan]
    for t, state, _, _ in files:  # fail before writing anything when a file is missing
        path = os.path.join(ckpt.param_dir(t.name), f"{state}.pt")
        if not os.path.isfile(path):
            raise uv.UniversalCheckpointError(f"{path}: missing")
    total = sum(os.path.getsize(os.path.join(ckpt.param_dir(t.name), f"{s}.pt"))
                for t, s, _, _ in files)
    largest = max(int(np.prod(t.shape)) * 4 for t in ckpt.tensors)
    inflight = options.max_inflight_bytes or 2 * largest
    shapes = ml.flax_shapes(cfg)
    logging.info("converting %s (%d tensors, %.2f GB) -> %s", ckpt.folder, len(files),
                 total / 1e9, dst)

    def write(tmp: str) -> None:
        writers = {item: checkpoint.PyTreeItemWriter(os.path.join(tmp, item), inflight)
                   for item in {p[2] for p in plan}}
        for _, prefix, item in plan:
            for path, shape in shapes.items():
                writers[item].create(prefix + path, shape, np.float32, stacked=ml.is_stacked(path))
        if options.optimizer_state:
            writers[checkpoint.ITEM_ADAM].create(("count",), (), np.int32)
            writers[checkpoint.ITEM_ADAM].write(("count",), np.int32(step))
        try:
            _copy_tensors(writers)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        checkpoint.write_metadata_item(tmp, build_metadata(ckpt, step))
        checkpoint.write_step_metadata(tmp, list(writers) + [checkpoint.ITEM_METADATA], init_ns)

    def _copy_tensors(writers: dict[str, checkpoint.PyTreeItemWriter]) -> None:
        # disable=None: a bar on a terminal only, so logs and captured stderr stay clean.
        with tqdm(total=total, unit="B", unit_scale=True, desc="universal->orbax",
                  disable=None if options.progress else True) as bar:
            for n, (t, state, prefix, item) in enumerate(files):
                w = ckpt.read(t, state)
                for path, part in ml.to_flax(t, w, cfg).items():
                    index = t.layer if ml.is_stacked(path) else None
                    writers[item].write(prefix + path, part, index)
                del w
                bar.update(os.path.getsize(os.path.join(ckpt.param_dir(t.name), f"{state}.pt")))
                bar.set_postfix_str(f"{n + 1}/{len(files)} tensors")
            for writer in writers.values():
                writer.finalize()

    write_atomically(dst, write)
    logging.info("wrote %s", dst)
    return os.path.abspath(dst)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code: 0, 2 bad input, 1 a failed write."""
    parser = argparse.ArgumentParser(prog="python -m converters.universal_to_orbax",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="universal --load root or folder")
    parser.add_argument("--save", required=True, help="agpt-jax checkpoint directory to create")
    parser.add_argument("--no-optimizer-state", action="store_true",
                        help="write params only (no Adam moments and step)")
    parser.add_argument("--model-config", default=None,
                        help="preset name or GPTConfig JSON to check the checkpoint against")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> None:
        expected = parse_model_config(args.model_config) if args.model_config else None
        convert(args.load, args.save, ConvertOptions(optimizer_state=not args.no_optimizer_state,
                                                     expected_config=expected))

    return run_cli(body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
