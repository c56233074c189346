"""``python -m agpt_jax.runtime --check [--json]``: the environment check of a node.

Run it first on a new node: it prints versions, platform, devices and work-arounds, runs an
all-reduce across every device and exits 1 if anything fails, 2 on bad input.
"""

# This docstring is the command's --help text (absl prints the main module's). The report and the
# exit codes are in agpt_jax/runtime/check.py. The flags are defined here, when the command runs,
# and not in check.py: importing agpt_jax.runtime must define no flags (scripts/cpt.py and
# agpt_jax/plan.py define flags of the same names). Imports: absl, agpt_jax.runtime.check and
# agpt_jax.runtime.platform.

from __future__ import annotations

import sys

from agpt_jax.cli import parse_flags_exit_usage
from agpt_jax.runtime.check import _main
from agpt_jax.runtime.platform import PLATFORMS

if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_bool("check", False, "Run the environment check.")
    flags.DEFINE_bool("json", False, "Print the report as one JSON object per process.")
    flags.DEFINE_enum("platform", "auto", list(PLATFORMS), "Platform to start.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
    flags.DEFINE_integer("process_id", None, "This process's rank (multi-process).")
    flags.DEFINE_integer("cpu_devices", None, "Number of simulated CPU devices.")
    app.run(lambda argv: sys.exit(_main(argv)), flags_parser=parse_flags_exit_usage)
