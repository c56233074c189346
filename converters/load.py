"""The checkpoint border: a run's LOAD becomes an agpt-jax checkpoint before the loop starts.

scripts/cpt.py calls :func:`prepare` once, after the config is resolved and before
``agpt_jax.loop.run`` (or ``dry_run``). The loop only ever sees agpt-jax checkpoints; every
DeepSpeed / Megatron name and layout stays on this side (converters/), and no module of
``agpt_jax`` imports ``converters``.

A DeepSpeed universal LOAD is converted once into ``SAVE/converted_init/``. The conversion
records what it was made from in ``converted_init/source.json``: the universal folder, the
name, size and modification time of every file in it, and whether Adam state was converted. A
later start of the same run reuses the conversion when that record still matches LOAD (a
restart after a crash, a second phase in the same SAVE), and refuses, naming both, when LOAD
has changed since (re-converting silently would hide which weights the run started from).
Names, sizes and times rather than a hash of the bytes: a 7B universal checkpoint is ~80 GB,
and hashing it would cost minutes at every start.

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
from converters import universal as uv

#: The conversion of a universal LOAD inside the run directory.
CONVERTED_INIT = "converted_init"
#: What the conversion was made from, inside CONVERTED_INIT.
SOURCE_RECORD = "source.json"


def is_universal(path: str) -> bool:
    """Whether `path` is a DeepSpeed universal checkpoint: a root with latest_universal, or a
    global_stepN_universal folder (mp_rank_00_model_states.pt and zero/)."""
    if os.path.isfile(os.path.join(path, uv.LATEST_UNIVERSAL)):
        return True
    return os.path.isfile(os.path.join(path, uv.MODEL_STATES)) and os.path.isdir(
        os.path.join(path, uv.ZERO))


def _check_kind(cfg: RunConfig) -> None:
    """Megatron's --universal-checkpoint: LOAD must be a universal checkpoint (spec §2.6)."""
    load = cfg.checkpoint.load
    if cfg.checkpoint.universal_checkpoint and not is_universal(load):
        raise ConfigError([
            f"--universal-checkpoint (config.universal_checkpoint): "
            f"{config_lib.field_name('load')}={load!r} is not a DeepSpeed universal checkpoint "
            "(no latest_universal file, and not a global_stepN_universal folder with "
            "mp_rank_00_model_states.pt and zero/); give the universal checkpoint, or drop "
            "--universal-checkpoint to load an agpt-jax checkpoint"])


def fingerprint(load: str, optimizer_state: bool) -> dict:
    """What a conversion of `load` is made from: its universal folder and every file's name,
    size and modification time (sha256 of those), and whether Adam state is converted."""
    folder = uv.resolve_universal_dir(load)
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
    return {"universal_folder": folder, "files": count, "files_sha256": digest.hexdigest(),
            "optimizer_state": bool(optimizer_state)}


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
            f"{dst} was converted from {have.get('universal_folder')} "
            f"({have.get('files')} files, optimizer_state={have.get('optimizer_state')}), but "
            f"LOAD is now {want['universal_folder']} ({want['files']} files, "
            f"optimizer_state={want['optimizer_state']}) or its files changed since; use a new "
            f"SAVE, or delete {dst} to convert LOAD again")
    return True


def _convert(cfg: RunConfig, dst: str) -> None:
    from converters import universal_to_orbax

    load = cfg.checkpoint.load
    want = fingerprint(load, cfg.checkpoint.load_optimizer_state)
    if _reusable(dst, want):
        logging.info("using %s, converted earlier from %s", dst, want["universal_folder"])
        return
    logging.info("converting universal checkpoint %s -> %s", load, dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    universal_to_orbax.convert(load, dst, universal_to_orbax.ConvertOptions(
        optimizer_state=cfg.checkpoint.load_optimizer_state))
    tmp = os.path.join(dst, SOURCE_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(want, f, indent=1)
    os.replace(tmp, os.path.join(dst, SOURCE_RECORD))


def describe(load: str) -> str:
    """One line on what LOAD is, for the dry run (converts nothing)."""
    if is_universal(load):
        return f"{load}: DeepSpeed universal checkpoint (converted once into SAVE/{CONVERTED_INIT})"
    directory = checkpoint.resolve_checkpoint_dir(load)
    checkpoint.read_metadata(directory)
    return f"{directory}: agpt-jax checkpoint" + (
        " with Adam state" if checkpoint.has_adam(directory) else " (params only)")


def prepare(cfg: RunConfig, rt, *, dry_run: bool = False) -> RunConfig:
    """`cfg` with LOAD as the loop reads it: an agpt-jax checkpoint.

    An agpt-jax LOAD is returned as it is. Unless this is a dry run (which reads nothing of LOAD
    beyond its kind) or SAVE already holds a step to resume from, a universal LOAD is checked
    against the configured model and converted into SAVE/converted_init by the main process
    (the others wait); the returned config loads that conversion and keeps the universal path
    in `checkpoint.origin`, which the run's metadata records as its source.

    Raises:
        ConfigError: --universal-checkpoint with another kind of LOAD; LOAD of another model.
        DataError: the data inputs are bad (checked before any file is written).
        UniversalCheckpointError / CheckpointError: LOAD is malformed, or SAVE holds the
            conversion of another LOAD.
    """
    load = cfg.checkpoint.load
    if not load:
        return cfg
    _check_kind(cfg)
    if not is_universal(load):
        return cfg
    if dry_run:
        return cfg
    dst = os.path.join(cfg.run_dir, CONVERTED_INIT)
    resuming = start.has_complete_step(cfg.run_dir)
    if not resuming:
        start.check_inputs(cfg)  # bad data changes no file, not even the conversion
        # A checkpoint of another model size fails here, before anything is written.
        config_lib.check_model(cfg, uv.open_universal(load).config, load)
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
