"""Test set-up: 8 simulated CPU devices, set before jax initialises its backend."""

import os

from agpt_jax import hostmem

# Test workers and the scripts the tests start inherit the huge-page tunable the scripts give
# themselves (agpt_jax/hostmem.py); glibc reads it when those processes start.
os.environ.update(hostmem.environment())

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from agpt_jax import runtime  # noqa: E402

# The XLA CPU flags the runtime adds when it starts jax in one process; tests that touch jax
# before calling runtime.initialize() run under the same ones.
runtime.apply_cpu_xla_flags()


# --------------------------------------------------------------------------- no silent skips
# A skipped test checks nothing. Tests that need torch are deselected by their marker on a stack
# without torch (pytest -m "not torch"), never skipped; any skip fails the run.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: {len(_skipped)} test(s) skipped; skips are not allowed "
                                f"(deselect with -m instead): {', '.join(_skipped[:5])}")
        session.exitstatus = 1
