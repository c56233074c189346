"""The checkpoint border (converters/load.py): a universal LOAD is converted once, its
conversion is reused while LOAD is unchanged, and a changed LOAD is refused, not silently
mixed with an old conversion."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from agpt_jax import checkpoint
from converters import load
from converters import universal_to_orbax

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "universal_tiny")


@pytest.fixture
def universal(tmp_path):
    root = str(tmp_path / "universal")
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("reference.npz"))
    return root


def _converted(universal: str, dst: str) -> dict:
    """dst as the border leaves it: the conversion and its source record."""
    universal_to_orbax.convert(universal, dst, universal_to_orbax.ConvertOptions())
    want = load.fingerprint(universal, optimizer_state=True)
    with open(os.path.join(dst, load.SOURCE_RECORD), "w") as f:
        json.dump(want, f)
    return want


def test_fingerprint_follows_the_files(universal):
    a = load.fingerprint(universal, optimizer_state=True)
    assert a == load.fingerprint(universal, optimizer_state=True)
    assert a["universal_folder"].endswith("global_step20_universal") and a["files"] > 3
    assert a != load.fingerprint(universal, optimizer_state=False)
    # One tensor file rewritten with other bytes of the same size: another source.
    zero = os.path.join(a["universal_folder"], "zero")
    first = os.path.join(zero, sorted(os.listdir(zero))[0], "fp32.pt")
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load.fingerprint(universal, optimizer_state=True) != a


def test_a_conversion_is_reused_while_load_is_unchanged(universal, tmp_path):
    dst = str(tmp_path / "run" / load.CONVERTED_INIT)
    os.makedirs(os.path.dirname(dst))
    want = _converted(universal, dst)
    assert load._reusable(dst, want)
    assert checkpoint.resolve_checkpoint_dir(dst) == os.path.abspath(dst)


def test_a_changed_load_is_refused_with_both_named(universal, tmp_path):
    dst = str(tmp_path / "run" / load.CONVERTED_INIT)
    os.makedirs(os.path.dirname(dst))
    _converted(universal, dst)
    other = str(tmp_path / "other")
    shutil.copytree(universal, other)
    with pytest.raises(checkpoint.CheckpointError) as e:
        load._reusable(dst, load.fingerprint(other, optimizer_state=True))
    message = str(e.value)
    assert dst in message and other in message and "delete" in message


def test_an_unfinished_conversion_is_refused(tmp_path):
    dst = tmp_path / load.CONVERTED_INIT
    dst.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="unfinished conversion"):
        load._reusable(str(dst), {})
