"""docs/config.md is the schema's page, and the schema is the one table the config reads."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from agpt_jax import config, megatron_flags, recipes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_committed_page_is_the_schemas(tmp_path):
    out = tmp_path / "config.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_table.py"),
                           f"--out={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: python scripts/config_table.py --out docs/config.md")


def test_every_key_and_flag_is_in_the_one_schema():
    cd = recipes.base_config("legacy", "smoke", lr=1e-4, min_lr=0.0, lr_decay_style="cosine",
                             lr_warmup_frac=0.05, environ={})
    assert set(cd.keys()) == set(recipes.FIELDS)
    assert config.KEYS == tuple(f.key for f in recipes.SCHEMA)
    for f in recipes.SCHEMA:
        assert isinstance(cd[f.key], f.kind), (f.key, cd[f.key], f.kind)
    assert {flag.key for flag in megatron_flags.ACCEPTED} <= set(recipes.FIELDS)


def test_an_env_variable_of_the_schema_sets_its_key():
    # Each variable of the table, set alone, changes its key (the first one of several).
    for f in recipes.SCHEMA:
        if not f.env or f.key == "lr_warmup_frac":
            continue
        text, value = {int: ("7", 7), float: ("0.25", 0.25), str: ("x.txt", "x.txt")}[f.kind]
        cd = recipes.base_config("legacy", "smoke", lr=1e-4, min_lr=0.0, lr_decay_style="cosine",
                                 lr_warmup_frac=0.05, environ={f.env[0]: text})
        assert cd[f.key] == value, (f.key, cd[f.key])
