"""scripts/mutation_check.py stays runnable: every deliberate bug still applies to the code, and
its tests exist. (Running the mutations themselves takes minutes; docs/testing.md has the table.)"""

from __future__ import annotations

import os

import pytest

from script_modules import load_script

mc = load_script("mutation_check")


@pytest.mark.parametrize("m", mc.MUTATIONS, ids=[m.name for m in mc.MUTATIONS])
def test_each_mutation_applies_once_and_names_existing_tests(m, tmp_path):
    text = mc.checked_text(mc.ROOT, m)  # raises unless the text occurs exactly once
    assert m.new != m.old and text.count(m.new) == 0
    for t in m.tests:
        assert os.path.isfile(os.path.join(mc.ROOT, t.split("::")[0])), t
    # Applied to a copy, the file changes exactly there.
    copy = tmp_path / m.path
    copy.parent.mkdir(parents=True)
    copy.write_text(text)
    mc.apply_to(str(tmp_path), m)
    assert copy.read_text() == text.replace(m.old, m.new) != text


def test_a_mutation_that_no_longer_applies_is_an_error(tmp_path):
    m = mc.MUTATIONS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("nothing of it\n")
    with pytest.raises(mc.MutationError, match="expects its text once, found 0 times"):
        mc.apply_to(str(tmp_path), m)
