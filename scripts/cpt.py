"""Continued pretraining (CPT) of AuroraGPT-style models: the command line.

    python scripts/cpt.py --config configs/legacy.py:demo --config.load=CKPT --config.save=RUN
    python scripts/cpt.py --config configs/constant_cooldown.py:agpt_7b --dry_run

The launcher's environment variables (DATA_FILE_LIST, LOAD, SAVE, TRAIN_TOKENS, GLOBAL_BATCH,
LR, LR_WARMUP_FRAC, ...) are the config's defaults; `--config.<key>=<value>` overrides them.
Multi-process: started by mpiexec (the launcher's rank variables are read), or with
--coordinator_address, --num_processes and --process_id.

Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving), 1 bad input (one line; --debug
shows the traceback), 2 stopped by non-finite updates.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from agpt_jax import hostmem

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


def _fail(message: str, code: int = 1) -> int:
    print(f"cpt.py: error: {message}", file=sys.stderr, flush=True)
    if _DEBUG.value:
        traceback.print_exc()
    return code


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
    from agpt_jax import loop, runtime
    from agpt_jax.data import DataError
    from agpt_jax.init_checkpoint import CheckpointError

    if _CONFIG.value is None:
        return _fail("--config is required, e.g. --config configs/legacy.py:demo")
    cd = _CONFIG.value
    try:
        distributed = None
        if _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
            distributed = runtime.DistributedConfig(
                coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value)
        rt = runtime.initialize(cd.platform, distributed, num_cpu_devices=_NUM_CPU_DEVICES.value)
        logging.info("runtime: %s", rt.describe())
        cfg = config_lib.from_config(cd, rt.device_count)
        if rt.is_main_process:
            print(config_lib.describe(cfg), flush=True)
        if _DRY_RUN.value:
            report = loop.dry_run(cfg, rt)
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
        return 1
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    except loop.NonFiniteError as e:
        return _fail(str(e), code=2)
    except RuntimeError as e:
        if _rt_started(runtime) and runtime._runtime.process_count > 1:
            return _fail(f"a collective with the other processes failed ({str(e)[:300]}); "
                         "another process of the job probably died")
        raise
    if rt.is_main_process:
        how = "stopped by signal" if result.stopped_by_signal else "done"
        print(f"{how}: iterations {result.start_iteration + 1}..{result.last_iteration}, "
              f"{result.seconds_per_iteration:.3f} s/iteration; checkpoint "
              f"{result.checkpoint}; metrics {result.run_dir}/metrics.jsonl", flush=True)
    return 0


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
    import importlib.util

    spec_text = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            spec_text = argv[i + 1]
        elif arg.startswith("--config="):
            spec_text = arg.split("=", 1)[1]
    if not spec_text:
        return None
    path, _, arg = spec_text.partition(":")
    if not os.path.isfile(path):
        return None  # absl's message names the missing file
    spec = importlib.util.spec_from_file_location("cpt_config_check", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.get_config(arg or None)
    except ValueError as err:
        return f"{path}: {err}"
    return None


if __name__ == "__main__":
    # First: glibc reads its tunables only at start-up (agpt_jax/hostmem.py); this may re-execute.
    hostmem.reexec_with_huge_pages()
    if "--debug" not in sys.argv:
        problem = _config_file_error(sys.argv)
        if problem is not None:
            print(f"cpt.py: config error: {problem}", file=sys.stderr)
            sys.exit(1)
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except (AttributeError, KeyError) as err:
        # A locked ConfigDict rejects unknown `--config.<key>` overrides while flags are parsed,
        # before main() runs.
        flag = _unknown_override(sys.argv)
        if flag is None or "--debug" in sys.argv:
            raise
        print(f"cpt.py: config error: unknown config key in {flag.split('=', 1)[0]} ({err}); "
              "the keys are those of configs/common.py", file=sys.stderr)
        sys.exit(1)
