"""The two Intel GPU plugins for jax, as their wheels define them; which one is installed.

Read from the wheels themselves (``jax_plugins/<module>/__init__.py`` and the dist-info):

| | intel-extension-for-openxla 0.7.0 | jax-oneapi-plugin + jax-oneapi-pjrt 0.11.2 |
|---|---|---|
| stack | Python 3.11, jax 0.5.0 (``constraints.txt``) | Python 3.12, jax 0.11 (``constraints-jax011.txt``) |
| plugin module | ``jax_plugins.intel_extension_for_openxla`` | ``jax_plugins.xla_oneapi`` (in jax-oneapi-pjrt) |
| backend registered | ``xb.register_plugin("sycl", priority=500, options={"platform_name": "sycl"})`` | ``xb.register_plugin("oneapi", priority=500, options={"platform_name": "SYCL", ...})`` |
| visible devices | ``jax_cuda_visible_devices`` (set by ``local_device_ids``) | ``jax_oneapi_visible_devices`` |
| buffer donation | not in jax 0.5.0's allow-list: the runtime adds ``sycl`` | ``oneapi`` is in jax 0.11's allow-list |
| host callbacks in jit | "EmitPythonCallback not supported on sycl backend" | jax 0.11 lowers them for ``oneapi`` |
| ``jax.devices("gpu")`` | no ``sycl`` -> ``gpu`` alias | ``oneapi`` is a ``gpu`` alias |
| Pallas | no lowering for ``sycl`` | no lowering for ``oneapi`` (jax/_src/pallas/pallas_call.py lowers cpu, tpu, cuda, rocm) |

Nothing here imports jax or a plugin: :func:`installed` asks the package metadata only, so it
is safe before jax starts and on a machine without an Intel GPU. Which plugin is behind a backend
jax reports is the runtime's to say (``agpt_jax.runtime.plugin_for_backend``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util


@dataclasses.dataclass(frozen=True)
class XpuPlugin:
    """One Intel GPU plugin for jax.

    Attributes:
        name: the distribution users install (and ``runtime --check`` reports).
        distributions: every distribution of the plugin, for the version report.
        module: the ``jax_plugins`` module the distribution provides.
        backend: the backend name the module registers with jax (what ``jax_platforms`` takes).
        stack: the Python and jax versions the plugin is built for.
        install: the command that installs the plugin with its stack.
        donation_in_jax: whether stock jax already donates buffers on this backend.
        host_callbacks: whether jax lowers host callbacks (``jax.debug.print``...) on it.
    """

    name: str
    distributions: tuple[str, ...]
    module: str
    backend: str
    stack: str
    install: str
    donation_in_jax: bool
    host_callbacks: bool


EXTENSION = XpuPlugin(
    name="intel-extension-for-openxla",
    distributions=("intel-extension-for-openxla",),
    module="jax_plugins.intel_extension_for_openxla",
    backend="sycl",
    stack="Python 3.11 + jax 0.5.0",
    install="python3.11 -m pip install -c constraints.txt -e '.[xpu]'",
    donation_in_jax=False,
    host_callbacks=False,
)

ONEAPI = XpuPlugin(
    name="jax-oneapi-plugin",
    distributions=("jax-oneapi-plugin", "jax-oneapi-pjrt"),
    module="jax_plugins.xla_oneapi",
    # The plugin asks for platform_name "SYCL"; jax 0.11 knows the backend as "oneapi" (an alias
    # of "gpu"). Which name the devices report was not seen on a device:
    # agpt_jax.runtime.plugin_for_backend accepts each.
    backend="oneapi",
    stack="Python 3.12 + jax 0.11",
    install="python3.12 -m pip install -c constraints-jax011.txt -e '.[oneapi]'",
    donation_in_jax=True,
    host_callbacks=True,
)

PLUGINS: tuple[XpuPlugin, ...] = (EXTENSION, ONEAPI)


def version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def installed() -> list[XpuPlugin]:
    """The plugins whose distribution and ``jax_plugins`` module are both present."""
    return [p for p in PLUGINS if version(p.name) is not None and _module_present(p.module)]


def missing_message(current_stack: str) -> str:
    """What to install when no plugin is found, for the stack that is running."""
    lines = [f"no Intel GPU plugin is installed (running {current_stack}); install the one of "
             "your stack:"]
    lines += [f"  {p.stack}: {p.install}   # {p.name}" for p in PLUGINS]
    return "\n".join(lines)
