"""Continued pretraining (CPT) of AuroraGPT-style models: the command line.

    python scripts/cpt.py --config configs/legacy.py:demo --config.load=CKPT --config.save=RUN
    LOAD=... TRAIN_TOKENS=$((22*10**9)) GRAD_ACC_STEPS=16 LR=0.0002 NHOSTS=2 \
      python scripts/cpt.py --config configs/constant_cooldown.py:agpt_7b --dry_run \
      --universal-checkpoint --finetune --lr_constant_plus_cooldown

Where a setting comes from, the last winning: the recipe (configs/<recipe>.py); the launcher's
environment variables (DATA_FILE_LIST, LOAD, SAVE, TRAIN_TOKENS, GRAD_ACC_STEPS, LR,
LR_WARMUP_FRAC, ..., with Megatron-DeepSpeed's meaning); `--config.<key>=<value>`; the Megatron
flags of agpt_jax/megatron_flags.py (`--lr`, `--min-lr`, `--universal-checkpoint`, `--finetune`,
`--lr_constant_plus_cooldown`, ...), spelled and meaning as in Megatron. Any other Megatron flag
is refused with the config field to use instead. The start-up log names the source of every
setting that is not the recipe's default (also kept in config.json).

--dry_run checks the inputs and writes config.json and lr_schedule.csv/png for the target job:
its world size comes from --world_size, NGPUS, NHOSTS x NGPU_PER_HOST or PBS_NODEFILE, not from
the devices of the machine it runs on (a login node).

Multi-process: started by mpiexec (the launcher's rank variables are read), or with
--coordinator_address, --num_processes and --process_id.

Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving); 2 usage error or bad input (one
line naming the file or field; --debug shows the traceback); 1 a failure while running (non-finite
updates, a failed collective, ...).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from agpt_jax import hostmem, megatron_flags
from agpt_jax.cli import EXIT_FAILED, EXIT_USAGE

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<recipe>.py:<agpt_7b|demo|smoke>", lock_config=True)
_DRY_RUN = flags.DEFINE_boolean(
    "dry_run", False, "print the resolved config and derived numbers, check the inputs, write "
    "config.json and lr_schedule.csv/png into the run directory, and exit")
_DEBUG = flags.DEFINE_boolean("debug", False, "show tracebacks of input errors")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process without a launcher)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's rank")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "multi-process: seconds without a heartbeat after which a "
    "process counts as dead and the others stop with an error instead of waiting")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None,
                                        "simulated devices per process on CPU (tests)")
_WORLD_SIZE = flags.DEFINE_integer(
    "world_size", None, "--dry_run only: devices (Megatron ranks) of the job to plan; default "
    "NGPUS, NHOSTS x NGPU_PER_HOST, the hosts of PBS_NODEFILE x NGPU_PER_HOST, else this machine's")
_MEGATRON = megatron_flags.define()

def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"cpt.py: error: {message}", file=sys.stderr, flush=True)
    if _DEBUG.value:
        traceback.print_exc()
    return code


def _collective_failed(e: Exception) -> int:
    why = ("another process did not join in time (it was too slow or died)"
           if "DEADLINE_EXCEEDED" in str(e) else "another process of the job probably died")
    return _fail(f"a collective with the other processes failed ({str(e)[:300]}); {why}",
                 code=EXIT_FAILED)


def _rt_started(runtime) -> bool:
    """Whether agpt_jax.runtime.initialize() has returned in this process."""
    return runtime._runtime is not None


def _quiet_orbax(record) -> bool:
    """Drops Orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps its warnings.

    Without --debug, Orbax's error records lose their traceback (a failed background write logs
    one): the driver reports the error itself in one line.
    """
    if "orbax" not in record.pathname:
        return True
    if record.exc_info and not _DEBUG.value:
        record.exc_info, record.exc_text = None, None
    return record.levelno > 20


def main(argv: list[str]) -> int:
    del argv
    from agpt_jax import compat

    sys.unraisablehook = compat.quiet_known_unraisables(sys.unraisablehook)
    code = _main()
    from agpt_jax import runtime

    rt = runtime._runtime  # set once initialize() succeeded
    if code != 0 and rt is not None and rt.process_count > 1:
        # Another process of the job may be dead (a collective failed): jax's exit handler would
        # wait for it at a shutdown barrier and then abort. The error is reported; leave now.
        print(f"cpt.py: process {rt.process_index} of {rt.process_count} stops with exit code "
              f"{code}; if another process died, its log has the first error", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(code)
    return code


def _main() -> int:
    logging.get_absl_handler().addFilter(_quiet_orbax)
    from agpt_jax import config as config_lib
    from agpt_jax import loop, run_files, runtime
    from agpt_jax.data import DataError
    from agpt_jax.checkpoint import CheckpointWriteError
    from agpt_jax.checkpoint import CheckpointError
    from converters import load

    if _CONFIG.value is None:
        return _fail("--config is required, e.g. --config configs/legacy.py:demo")
    cd = _CONFIG.value
    try:
        if _WORLD_SIZE.value is not None and not _DRY_RUN.value:
            return _fail("--world_size plans another job's size and is for --dry_run only; a run "
                         "trains on the devices it has")
        given = {name: holder.value for name, holder in _MEGATRON.items() if holder.present}
        recipe_defaults, env_values = _recipe_baselines(sys.argv)
        explicit = megatron_flags.config_overrides(sys.argv) | {
            key for key, names in config_lib.ENV_OF_KEY.items()
            if any(os.environ.get(n, "").strip() for n in names)}
        applied = megatron_flags.apply(cd, given, explicit)
        distributed = None
        if _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
            distributed = runtime.DistributedConfig(
                coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value)
        rt = runtime.initialize(cd.platform, distributed, num_cpu_devices=_NUM_CPU_DEVICES.value)
        logging.info("runtime: %s", rt.describe())
        world, notes = rt.device_count, []
        if _DRY_RUN.value:
            world, hosts, counted = runtime.target_world_size(os.environ, _WORLD_SIZE.value,
                                                              rt.device_count)
            notes.append(f"dry run: world size {world} from {counted}")
            notes += _aurora_grad_acc_note(hosts, explicit)
        cfg = config_lib.from_config(cd, world)
        where = megatron_flags.sources(cd, recipe_defaults, env_values, config_lib.ENV_OF_KEY,
                                       os.environ, sys.argv, applied)
        notes += list(applied.notes) + megatron_flags.source_lines(cd, where, cfg.recipe)
        cfg = dataclasses.replace(cfg, notes=cfg.notes + tuple(notes))
        if rt.is_main_process:
            print(config_lib.describe(cfg), flush=True)
        # The checkpoint border: from here on LOAD is an agpt-jax checkpoint (a universal LOAD
        # is converted once into SAVE/converted_init; the dry run converts nothing).
        cfg = load.prepare(cfg, rt, dry_run=_DRY_RUN.value)
        if _DRY_RUN.value:
            described = load.describe(cfg.checkpoint.load) if cfg.checkpoint.load else None
            report = run_files.dry_run(cfg, rt, load_description=described)
            if rt.is_main_process:
                print(report.summary.split("\n", len(config_lib.describe(cfg).splitlines()))[-1],
                      flush=True)
            return 0
        result = loop.run(cfg, rt)
    except config_lib.ConfigError as e:
        for line in e.problems:
            print(f"cpt.py: config error: {line}", file=sys.stderr)
        if _DEBUG.value:
            traceback.print_exc()
        return EXIT_USAGE
    except CheckpointWriteError as e:  # disk full or I/O error while saving: a run failure
        return _fail(str(e), code=EXIT_FAILED)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        # megatron_flags.FlagError is a ValueError. jax 0.11 reports a collective that lost its
        # peer (Gloo) as a plain ValueError: in a job of several processes that is a failure of
        # the job, not bad input.
        if (type(e) is ValueError and _rt_started(runtime)
                and runtime._runtime.process_count > 1):
            return _collective_failed(e)
        return _fail(str(e))
    except loop.NonFiniteError as e:
        return _fail(str(e), code=EXIT_FAILED)
    except RuntimeError as e:
        if _rt_started(runtime) and runtime._runtime.process_count > 1:
            return _collective_failed(e)
        raise
    if rt.is_main_process:
        how = "stopped by signal" if result.stopped_by_signal else "done"
        print(f"{how}: iterations {result.start_iteration + 1}..{result.last_iteration}, "
              f"{result.seconds_per_iteration:.3f} s/iteration; checkpoint "
              f"{result.checkpoint}; metrics {result.run_dir}/metrics.jsonl", flush=True)
    return 0


def _config_spec(argv: list[str]) -> str | None:
    """The `--config` argument (`configs/<recipe>.py:<scale>`) of argv, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _load_recipe(argv: list[str]):
    """(the config file's module, its argument), loaded by path as config_flags loads it; or
    (None, None) when argv names no existing config file."""
    import importlib.util

    spec_text = _config_spec(argv)
    if not spec_text:
        return None, None
    path, _, arg = spec_text.partition(":")
    if not os.path.isfile(path):
        return None, None  # absl's message names the missing file
    spec = importlib.util.spec_from_file_location("cpt_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, arg or None


def _recipe_baselines(argv: list[str]) -> tuple[dict, dict]:
    """The recipe's config without any environment, and with this one (no flags): the baselines
    that tell a recipe default from a launcher variable."""
    module, arg = _load_recipe(argv)
    return (dict(module.get_config(arg, environ={}).items()),
            dict(module.get_config(arg, environ=os.environ).items()))


def _aurora_grad_acc_note(hosts: int | None, explicit: set[str]) -> list[str]:
    """Megatron's launcher on Aurora picks GRAD_ACC_STEPS by host count when it is unset
    (spec megatron-deepspeed.md §1.2); agpt-jax keeps its recipe's value and says so."""
    if hosts is None or "grad_acc_steps" in explicit:
        return []
    steps = 1 if hosts >= 256 else 2 if hosts >= 128 else 4 if hosts >= 33 else (
        8 if hosts >= 16 else 16)
    return [f"GRAD_ACC_STEPS is not set: the recipe's value applies; Megatron's launcher on "
            f"Aurora would pick {steps} for {hosts} host(s); set GRAD_ACC_STEPS to match a "
            "Megatron run"]


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.<key>` flag whose key the configs do not have, if any."""
    from agpt_jax.config import KEYS

    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key.split(".")[0] not in KEYS:
                return arg
    return None


def _config_file_error(argv: list[str]) -> str | None:
    """The ValueError the config file raises for this environment (a malformed variable such as
    TRAIN_ITERS=many), or None. absl would report it as a flag-parsing traceback."""
    try:
        if _load_recipe(argv)[0] is not None:
            _recipe_baselines(argv)
    except ValueError as err:
        return f"{_config_spec(argv).partition(':')[0]}: {err}"
    return None


if __name__ == "__main__":
    # First: glibc reads its tunables only at start-up (agpt_jax/hostmem.py); this may re-execute.
    hostmem.reexec_with_huge_pages()
    problem = megatron_flags.refusal(sys.argv)
    if problem is not None:
        print(f"cpt.py: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if "--debug" not in sys.argv:
        problem = _config_file_error(sys.argv)
        if problem is not None:
            print(f"cpt.py: config error: {problem}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (AttributeError, KeyError) as err:
        # A locked ConfigDict rejects unknown `--config.<key>` overrides while flags are parsed,
        # before main() runs.
        flag = _unknown_override(sys.argv)
        if flag is None or "--debug" in sys.argv:
            raise
        print(f"cpt.py: config error: unknown config key in {flag.split('=', 1)[0]} ({err}); "
              "the keys are those of agpt_jax/recipes.py", file=sys.stderr)
        sys.exit(EXIT_USAGE)
