"""DeepSpeed universal checkpoint -> agpt-jax Orbax checkpoint, one tensor at a time.

    python -m converters.universal_to_orbax --load SRC --save DST [--no-optimizer-state]
        [--model-config PRESET_OR_JSON]

SRC is Megatron's `--load` root (the `latest_universal` tag is followed) or a
`global_stepN_universal` folder. DST gets the layout of `agpt_jax.checkpoint`: fp32 params,
Adam's raw first and second moments (torch exp_avg, exp_avg_sq) with the checkpoint's step, and
metadata (source, iteration, model config, vocab sizes, param groups, Megatron args).

Peak memory is a few times the largest Megatron tensor: the states are converted one after the
other; each tensor is read memory-mapped (its pages leave RSS once it is laid out), laid out (the
output layer's transpose block by block) and written in chunks of at most 32 MiB with at most
INFLIGHT_BYTES pending. Everything is written to
`DST.tmp-<host>-<pid>` and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import flags, logging

from agpt_jax import checkpoint, cli
from agpt_jax.model import GPTConfig, get_preset
from converters import megatron_layout
from converters import pt_archive
from converters import universal
from converters import write_atomically, run_cli, ConversionError


#: Default cap on the bytes pending writes hold: four chunks (agpt_jax.checkpoint.stream's
#: CHUNK_BYTES), enough to keep both cores busy encoding and writing. It was twice the largest
#: tensor, which held 0.5 GB more at the 1.3B benchmark for the same time.
INFLIGHT_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Options of universal -> Orbax.

    Attributes:
        optimizer_state: also write Adam moments and step (`adam/`).
        expected_config: a config to check the checkpoint's args against, or None.
        max_inflight_bytes: cap on source bytes held by pending asynchronous writes; None picks
            INFLIGHT_BYTES.
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


def state_plan(optimizer_state: bool) -> list[tuple[str, tuple[str, ...], str]]:
    """(DeepSpeed state, leaf prefix, item) for each state converted."""
    plan = [("fp32", (), checkpoint.ITEM_PARAMS)]
    if optimizer_state:
        plan += [("exp_avg", ("mu",), checkpoint.ITEM_ADAM), ("exp_avg_sq", ("nu",), checkpoint.ITEM_ADAM)]
    return plan


def _saved_lr(groups: list[dict]) -> float | None:
    """The LR the optimizer last used (its first param group's), as DeepSpeed saved it."""
    lrs = [g.get("lr") for g in groups if isinstance(g, dict) and g.get("lr") is not None]
    return float(lrs[0]) if lrs else None


def build_metadata(ckpt: universal.SourceCheckpoint, step: float | None,
                   created_by: str = "converters.universal_to_orbax") -> dict:
    """The agpt-jax metadata of a converted checkpoint (all JSON-safe).

    Args:
        ckpt: an opened universal or ZeRO checkpoint.
        step: the Adam step, or None without optimizer state.
        created_by: the converter's module.
    """
    cfg = ckpt.config
    return {
        "format": checkpoint.FORMAT,
        "format_version": checkpoint.FORMAT_VERSION,
        "created_by": created_by,
        "source": ckpt.folder,
        "iteration": ckpt.iteration,
        "adam_step": step,
        "has_optimizer_state": step is not None,
        "model": dataclasses.asdict(cfg),
        "original_vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "name_scheme": ckpt.scheme.value,
        "param_groups": universal.to_jsonable(ckpt.param_groups),
        "last_lr": _saved_lr(ckpt.param_groups),
        "megatron_args": universal.to_jsonable(ckpt.args),
        "checkpoint_version": universal.to_jsonable(ckpt.checkpoint_version),
        "universal_checkpoint_info": universal.to_jsonable(ckpt.universal_info),
        "zero_optimizer_state": universal.to_jsonable(ckpt.optimizer_state),
        "megatron_model_states": ckpt.model_states_extra,
    }


#: (Megatron tensor, DeepSpeed state, its full fp32 value with V_pad rows for vocab tensors).
Tensors = Iterable[tuple[megatron_layout.MegatronTensor, str, np.ndarray]]


def write_checkpoint(dst: str, cfg: GPTConfig, step: float | None, tensors: Callable[[], Tensors],
                     metadata: dict, max_inflight_bytes: int, init_ns: int) -> None:
    """Write the agpt-jax checkpoint DST (atomically) from Megatron tensors as they come.

    Args:
        dst: the checkpoint directory to create.
        cfg: the model.
        step: the Adam step (written as adam/count), or None for params only.
        tensors: called once inside the write; yields every tensor of every state in
            `state_plan(step is not None)` exactly once, in any order; state by state keeps
            one item's writes in flight at a time (the previous item's are waited for when
            the next item starts), so memory stays at one cap, not one per item.
        metadata: the metadata item (build_metadata).
        max_inflight_bytes: cap on source bytes held by pending asynchronous writes.
        init_ns: when the conversion started (the step metadata's init timestamp).
    """
    plan = state_plan(step is not None)
    items = {state: (prefix, item) for state, prefix, item in plan}
    shapes = megatron_layout.flax_shapes(cfg)

    def write(tmp: str) -> None:
        writers = {item: checkpoint.PyTreeItemWriter(os.path.join(tmp, item), max_inflight_bytes)
                   for item in {p[2] for p in plan}}
        for _, prefix, item in plan:
            for path, shape in shapes.items():
                writers[item].create(prefix + path, shape, np.float32,
                                     stacked=megatron_layout.is_stacked(path))
        if step is not None:
            writers[checkpoint.ITEM_ADAM].create(("count",), (), np.int32)
            writers[checkpoint.ITEM_ADAM].write(("count",), np.int32(step))
        try:
            current = None
            for t, state, w in tensors():
                prefix, item = items[state]
                if item != current:
                    if current is not None:
                        writers[current].drain()
                    current = item
                rows = writers[item].chunk_rows(prefix + megatron_layout.LM_HEAD)
                for path, start, part in megatron_layout.to_flax_rows(t, w, cfg, rows):
                    index = t.layer if megatron_layout.is_stacked(path) else None
                    writers[item].write(prefix + path, part, index, start)
            for writer in writers.values():
                writer.finalize()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        checkpoint.write_metadata_item(tmp, metadata)
        checkpoint.write_step_metadata(tmp, list(writers) + [checkpoint.ITEM_METADATA], init_ns)

    write_atomically(dst, write)


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
    ckpt = universal.open_universal(src, options.expected_config)
    cfg = ckpt.config
    step = ckpt.read_step() if options.optimizer_state else None
    if step is not None and step != int(step):
        raise universal.UniversalCheckpointError(f"{ckpt.folder}: step.pt holds {step}, not a "
                                                 "whole number of Adam steps")
    plan = state_plan(options.optimizer_state)
    files = [(t, state) for state, _, _ in plan for t in ckpt.tensors]  # state by state
    for t, state in files:  # fail before writing anything when a file is missing
        path = os.path.join(ckpt.param_dir(t.name), f"{state}.pt")
        if not os.path.isfile(path):
            raise universal.UniversalCheckpointError(f"{path}: missing")
    sizes = [os.path.getsize(os.path.join(ckpt.param_dir(t.name), f"{s}.pt")) for t, s in files]
    logging.info("converting %s (%d tensors, %.2f GB) -> %s", ckpt.folder, len(files),
                 sum(sizes) / 1e9, dst)

    def tensors() -> Tensors:
        # disable=None: a bar on a terminal only, so logs and captured stderr stay clean.
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="universal->orbax",
                  disable=None if options.progress else True) as bar:
            for n, ((t, state), size) in enumerate(zip(files, sizes)):
                w = ckpt.read(t, state)
                yield t, state, w
                pt_archive.release_pages(w)  # its file pages leave RSS (see pt_archive)
                del w
                bar.update(size)
                bar.set_postfix_str(f"{n + 1}/{len(files)} tensors")

    write_checkpoint(dst, cfg, step, tensors, build_metadata(ckpt, step),
                     options.max_inflight_bytes or INFLIGHT_BYTES, init_ns)
    logging.info("wrote %s", dst)
    return os.path.abspath(dst)


def to_orbax_cli(doc: str, load_help: str, convert_fn: Callable[..., str],
                 argv: Sequence[str] | None) -> int:
    """The command line of a DeepSpeed -> agpt-jax converter (this one and zero_to_orbax, whose
    docstring is ``doc``); returns the exit code: 0, 2 bad input, 1 a failed write."""
    fv = flags.FlagValues()
    flags.DEFINE_string("load", None, load_help, required=True, flag_values=fv)
    flags.DEFINE_string("save", None, "agpt-jax checkpoint directory to create", required=True,
                        flag_values=fv)
    flags.DEFINE_bool("no-optimizer-state", False, "write params only (no Adam moments and step)",
                      flag_values=fv)
    flags.DEFINE_string("model-config", None, "preset name or GPTConfig JSON to check the "
                        "checkpoint against", flag_values=fv)
    flags.DEFINE_bool("debug", False, "show tracebacks", flag_values=fv)
    args = cli.parse(fv, argv, doc)

    def body() -> None:
        expected = parse_model_config(args.model_config) if args.model_config else None
        convert_fn(args.load, args.save, ConvertOptions(
            optimizer_state=not args.no_optimizer_state, expected_config=expected))

    return run_cli(body, args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code: 0, 2 bad input, 1 a failed write."""
    return to_orbax_cli(__doc__, "universal --load root or folder", convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
