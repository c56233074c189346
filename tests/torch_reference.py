"""torch and transformers for the reference tests, imported on first use.

Test modules that compare against torch import these names at the top and mark themselves (or
their tests) with ``pytest.mark.torch``; collecting them needs no torch, so the Python 3.12 leg,
which has none, deselects them with ``-m "not torch"`` and runs everything else.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    """A module that is imported the first time one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


torch = _LazyModule("torch")
transformers = _LazyModule("transformers")
