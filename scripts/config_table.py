"""Writes docs/config.md: every config key, its type, default, launcher variables and Megatron flag.

    python scripts/config_table.py --out docs/config.md

The page is generated from the one schema (agpt_jax/recipes.py: SCHEMA) joined with the Megatron
flags cpt.py accepts (agpt_jax/megatron_flags.py: ACCEPTED); tests/test_config_table.py fails when
the committed page differs from what this writes.

Exit codes: 0 written; 2 bad input (an --out that is a folder or lies under a file).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags

from agpt_jax import megatron_flags, paths, recipes

_OUT = flags.DEFINE_string("out", "docs/config.md", "the page to write")

HEADER = """# Configuration

Every key of a run's config: `--config.<key>=<value>` sets it, the launcher's environment
variables (as `train_alcf.sh` reads them) default it, and the Megatron flags cpt.py accepts set
it last (precedence: recipe < env < `--config.<key>` < Megatron flag). Generated from
`agpt_jax/recipes.py` (`SCHEMA`) and `agpt_jax/megatron_flags.py` by
`python scripts/config_table.py`; do not edit by hand.

"the scale's" defaults differ per scale (agpt_7b / demo / smoke); "the recipe's" are set by the
recipe file (configs/*.py).

| key | type | default | environment | Megatron flag | meaning |
|---|---|---|---|---|---|
"""


def table() -> str:
    """The page's text."""
    flags_of: dict[str, list[str]] = {}
    for f in megatron_flags.ACCEPTED:
        flags_of.setdefault(f.key, []).append(f"`--{f.name}`")
    rows = []
    for f in recipes.SCHEMA:
        default = f.default if f.default in (recipes.SCALE, recipes.RECIPE) else f"`{f.default!r}`"
        env = ", ".join(f"`{e}`" for e in f.env)
        doc = f.doc.replace("|", "\\|")
        rows.append(f"| `{f.key}` | {f.kind.__name__} | {default} | {env} | "
                    f"{', '.join(flags_of.get(f.key, []))} | {doc} |")
    return HEADER + "\n".join(rows) + "\n"


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        print(f"config_table.py: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    problem = paths.output_file_problem(_OUT.value)
    if problem:
        print(f"config_table.py: --out: {problem}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        f.write(table())
    print(f"wrote {_OUT.value} ({len(recipes.SCHEMA)} keys)")
    return 0


if __name__ == "__main__":
    app.run(main)
