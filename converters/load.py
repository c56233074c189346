"""The checkpoint border: a run's LOAD becomes an agpt-jax checkpoint before the loop starts.

scripts/cpt.py calls :func:`prepare` once, after the config is resolved and before
``agpt_jax.loop.run`` (or ``dry_run``). The loop only ever sees agpt-jax checkpoints; every
DeepSpeed / Megatron name and layout stays on this side (converters/), and no module of
``agpt_jax`` imports ``converters``.

A DeepSpeed universal LOAD (converters/universal_to_orbax.py) or a DeepSpeed ZeRO stage-1 LOAD
(a save root with ``latest``, or its ``global_stepN`` folder: converters/zero_to_orbax.py, TP = PP
= 1) is converted once into ``SAVE/converted_init/``. A root holding both (``latest_universal``
next to ``latest``, after ds_to_universal) is read as universal. The conversion records what it
was made from in ``converted_init/source.json``: the universal or ZeRO tag folder, the name, size
and modification time of every file in it, and whether Adam state was converted. A
later start of the same run reuses the conversion when that record still matches LOAD (a
restart after a crash, a second phase in the same SAVE), and refuses, naming both, when LOAD
has changed since (re-converting silently would hide which weights the run started from).
Names, sizes and times rather than a hash of the bytes: a 7B universal checkpoint is ~80 GB,
and hashing it would cost minutes at every start. Megatron's ``--universal-checkpoint`` insists
on a universal LOAD, so a ZeRO LOAD is converted only without that flag.

May import: agpt_jax (config, checkpoint, start's input checks) and converters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging

from agpt_jax import config as config_lib
from agpt_jax import checkpoint
from agpt_jax import start
from agpt_jax.config import ConfigError, RunConfig
from converters import universal
from converters import zero

#: The conversion of a universal LOAD inside the run directory.
CONVERTED_INIT = "converted_init"
#: What the conversion was made from, inside CONVERTED_INIT.
SOURCE_RECORD = "source.json"


def is_universal(path: str) -> bool:
    """Whether `path` is a DeepSpeed universal checkpoint: a root with latest_universal, or a
    global_stepN_universal folder (mp_rank_00_model_states.pt and zero/)."""
    if os.path.isfile(os.path.join(path, universal.LATEST_UNIVERSAL)):
        return True
    return os.path.isfile(os.path.join(path, universal.MODEL_STATES)) and os.path.isdir(
        os.path.join(path, universal.ZERO))


def is_zero(path: str) -> bool:
    """Whether `path` is a DeepSpeed ZeRO checkpoint (and not a universal one): a root whose
    `latest` names a global_stepN folder of *_optim_states.pt files, or such a folder."""
    return not is_universal(path) and zero.is_zero_dir(path)


def _check_kind(cfg: RunConfig) -> None:
    """Megatron's --universal-checkpoint: LOAD must be a universal checkpoint (spec §2.6)."""
    load = cfg.checkpoint.load
    if cfg.checkpoint.universal_checkpoint and not is_universal(load):
        raise ConfigError([
            f"--universal-checkpoint (config.universal_checkpoint): "
            f"{config_lib.field_name('load')}={load!r} is not a DeepSpeed universal checkpoint "
            "(no latest_universal file, and not a global_stepN_universal folder with "
            "mp_rank_00_model_states.pt and zero/); give the universal checkpoint, or drop "
            "--universal-checkpoint to load an agpt-jax checkpoint"
            + (" or to convert this ZeRO checkpoint directly" if is_zero(load) else "")])


def fingerprint(load: str, optimizer_state: bool) -> dict:
    """What a conversion of `load` is made from: its universal (or ZeRO) tag folder and every
    file's name, size and modification time (sha256 of those), and whether Adam state is
    converted. The folder's key names its kind: universal_folder or zero_folder."""
    if is_universal(load):
        key, folder = "universal_folder", universal.resolve_universal_dir(load)
    else:
        key, folder = "zero_folder", zero.resolve_zero_dir(load)
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                          .encode())
            count += 1
    return {key: folder, "files": count, "files_sha256": digest.hexdigest(),
            "optimizer_state": bool(optimizer_state)}


def _folder(record: dict) -> str | None:
    return record.get("universal_folder", record.get("zero_folder"))


def _reusable(dst: str, want: dict) -> bool:
    """Whether dst holds a finished conversion of `want` (raises when it holds another one)."""
    if not os.path.exists(dst):
        return False
    if not os.path.isfile(os.path.join(dst, "_CHECKPOINT_METADATA")):
        raise checkpoint.CheckpointError(f"{dst}: an unfinished conversion is in the way; delete it "
                                 "and start again")
    record = os.path.join(dst, SOURCE_RECORD)
    if not os.path.isfile(record):
        logging.warning("%s has no %s (an older agpt-jax, or a stop right after converting); "
                        "using it as the conversion of LOAD", dst, SOURCE_RECORD)
        return True
    with open(record) as f:
        have = json.load(f)
    if have != want:
        raise checkpoint.CheckpointError(
            f"{dst} was converted from {_folder(have)} "
            f"({have.get('files')} files, optimizer_state={have.get('optimizer_state')}), but "
            f"LOAD is now {_folder(want)} ({want['files']} files, "
            f"optimizer_state={want['optimizer_state']}) or its files changed since; use a new "
            f"SAVE, or delete {dst} to convert LOAD again")
    return True


def _convert(cfg: RunConfig, dst: str) -> None:
    from converters import universal_to_orbax, zero_to_orbax

    load = cfg.checkpoint.load
    want = fingerprint(load, cfg.checkpoint.load_optimizer_state)
    if _reusable(dst, want):
        logging.info("using %s, converted earlier from %s", dst, _folder(want))
        return
    kind, converter = (("universal", universal_to_orbax) if "universal_folder" in want
                       else ("ZeRO", zero_to_orbax))
    logging.info("converting %s checkpoint %s -> %s", kind, load, dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    converter.convert(load, dst, universal_to_orbax.ConvertOptions(
        optimizer_state=cfg.checkpoint.load_optimizer_state))
    tmp = os.path.join(dst, SOURCE_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(want, f, indent=1)
    os.replace(tmp, os.path.join(dst, SOURCE_RECORD))


def describe(load: str) -> str:
    """One line on what LOAD is, for the dry run (converts nothing)."""
    if is_universal(load):
        return f"{load}: DeepSpeed universal checkpoint (converted once into SAVE/{CONVERTED_INIT})"
    if is_zero(load):
        return (f"{zero.resolve_zero_dir(load)}: DeepSpeed ZeRO checkpoint (converted once into "
                f"SAVE/{CONVERTED_INIT})")
    directory = checkpoint.resolve_checkpoint_dir(load)
    checkpoint.read_metadata(directory)
    return f"{directory}: agpt-jax checkpoint" + (
        " with Adam state" if checkpoint.has_adam(directory) else " (params only)")


def prepare(cfg: RunConfig, rt, *, dry_run: bool = False) -> RunConfig:
    """`cfg` with LOAD as the loop reads it: an agpt-jax checkpoint.

    An agpt-jax LOAD is returned as it is. Unless this is a dry run (which reads nothing of LOAD
    beyond its kind) or SAVE already holds a step to resume from, a universal or ZeRO LOAD is
    checked against the configured model and converted into SAVE/converted_init by the main
    process (the others wait); the returned config loads that conversion and keeps the LOAD path
    in `checkpoint.origin`, which the run's metadata records as its source.

    Raises:
        ConfigError: --universal-checkpoint with another kind of LOAD; LOAD of another model.
        DataError: the data inputs are bad (checked before any file is written).
        UniversalCheckpointError / ZeroCheckpointError / CheckpointError: LOAD is malformed, or
            SAVE holds the conversion of another LOAD.
    """
    load = cfg.checkpoint.load
    if not load:
        return cfg
    _check_kind(cfg)
    from_universal = is_universal(load)
    if not from_universal and not is_zero(load):
        return cfg
    if dry_run:
        return cfg
    dst = os.path.join(cfg.run_dir, CONVERTED_INIT)
    resuming = start.has_complete_step(cfg.run_dir)
    if not resuming:
        start.check_inputs(cfg)  # bad data changes no file, not even the conversion
        # A checkpoint of another model size fails here, before anything is written.
        found = (universal.open_universal(load).config if from_universal
                 else zero.read_model_states(zero.resolve_zero_dir(load)).config)
        config_lib.check_model(cfg, found, load)
        if rt.is_main_process:
            _convert(cfg, dst)
        if rt.process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("agpt_jax converted_init")
    elif not os.path.isfile(os.path.join(dst, "_CHECKPOINT_METADATA")):
        # A resume reads SAVE, never LOAD: nothing to convert.
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(
            cfg.checkpoint, origin=load))
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, load=checkpoint.resolve_checkpoint_dir(dst), origin=load,
        universal_checkpoint=False))
