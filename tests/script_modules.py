"""Import the command-line scripts of scripts/ as modules, so tests call their main(argv)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a module named <name>, registered in sys.modules.

    Registration matters: dataclasses look their module up while the class is created.
    """
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
