"""The bad-input tests share the fault suite's helpers (tests/faults/fault_helpers.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "faults"))
