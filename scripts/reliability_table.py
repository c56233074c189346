"""Regenerates docs/reliability.md from the records the fault and bad-input tests write.

    RELIABILITY_RESULTS=/tmp/reliability python -m pytest -q tests/faults tests/bad_input
    python scripts/reliability_table.py --results /tmp/reliability --out docs/reliability.md

Every record is one JSON file (tests/faults/fault_helpers.py: `record`) with "kind" ("fault" or
"bad_input"), "title", "how", "trials", "observed" and optionally "message", "entry", "order".

Exit codes: 0 written; 2 bad input (no records in --results, a record that is not JSON or lacks a
field, an --out that is a folder or in a folder that does not exist); 1 writing --out failed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Sequence

from absl import flags

from agpt_jax import cli

HEADER = """# Reliability: faults and bad input

What happens when a CPT run is killed, preempted, given a full disk or a damaged checkpoint, loses
a peer process, or is fed a malformed input. Every row is a test in `tests/faults/` or
`tests/bad_input/`; this page is generated from the results of one run of those tests
(`scripts/reliability_table.py`), not written by hand:

    RELIABILITY_RESULTS=/tmp/reliability python -m pytest -q tests/faults tests/bad_input
    python scripts/reliability_table.py --results /tmp/reliability --out docs/reliability.md

All runs are at the smoke scale on CPU (a 0.1M-parameter Llama, one simulated device per process
unless stated).
"""


# The tests' temporary folders and log prefixes: machine noise, not part of a message.
_TMP = re.compile(r"/(?:tmp|var)/\S*?pytest-\d+/(?:popen-gw\d+/)?[^/\s'\"]+")
# A temporary path cut off where a record's message was shortened.
_TMP_CUT = re.compile(r"/(?:tmp|var)/\S*$")
_LOG_PREFIX = re.compile(r"^(?:\d{4}-\d\d-\d\d [\d:.]+: |[IWEF]\d{4} [\d:.]+ +\d+ \S+\] )")


def _cell(text: object) -> str:
    """A markdown table cell: one line, pipes escaped, temporary folders as <tmp>."""
    text = _TMP.sub("<tmp>", " ".join(str(text).split()))
    text = _LOG_PREFIX.sub("", _TMP_CUT.sub("<tmp>", text))
    return text.replace("|", "\\|")


def load_records(folder: str) -> list[dict]:
    """The records of `folder` (sorted by file name).

    Raises:
        ValueError: the folder has no records, or a record lacks a field.
    """
    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not paths:
        raise ValueError(f"{folder}: no result records (*.json); run the tests with "
                         "RELIABILITY_RESULTS set to this folder first")
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                r = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e}); run the tests again") from e
        missing = [k for k in ("kind", "title", "how", "trials", "observed") if k not in r]
        if missing:
            raise ValueError(f"{path}: record lacks {missing}")
        records.append(r)
    return records


def render(records: Sequence[dict]) -> str:
    """The markdown page of `records`."""
    faults = sorted((r for r in records if r["kind"] == "fault"),
                    key=lambda r: (r.get("order", 99), r["title"]))
    bad = sorted((r for r in records if r["kind"] == "bad_input"),
                 key=lambda r: (r.get("entry", ""), r["title"]))
    out = [HEADER]
    out.append(f"## Faults ({len(faults)} classes, "
               f"{sum(int(r['trials']) for r in faults)} trials)\n")
    out.append("| Fault | How it is tested | Trials | Observed | Message shown |")
    out.append("|---|---|---|---|---|")
    for r in faults:
        out.append(f"| {_cell(r['title'])} | {_cell(r['how'])} | {r['trials']} | "
                   f"{_cell(r['observed'])} | {_cell(r.get('message', '')) or '-'} |")
    kill = [r for r in faults if r.get("trials_detail")]
    for r in kill:
        out.append(f"\n### Kill trials (seed {r.get('seed')})\n")
        out.append("| Restart | Kill moment | Resumed from step | Last iteration logged | "
                   "Async write cut | Lost iterations |")
        out.append("|---|---|---|---|---|---|")
        for t in r["trials_detail"]:
            if not t.get("killed"):
                moment = "not killed: ran to the end"
            elif t["mode"] == "after_async_save":
                moment = f"right after async save #{t['nth_save']}"
            elif t["mode"] == "during_training":
                moment = f"{t['delay_s']} s after its first iteration"
            else:
                moment = f"{t['delay_s']} s after spawn"
            out.append(f"| {t['restart']} | {moment} | {t.get('resumed_from') or '-'} | "
                       f"{t.get('last_iteration_logged') or '-'} | "
                       f"{'yes' if t.get('write_interrupted') else 'no'} | "
                       f"{t.get('lost_iterations', '-')} |")
    out.append(f"\n## Bad input ({len(bad)} cases)\n")
    out.append("Each case: exit code 2, one error line naming the input and the fix, no Python "
               "traceback unless `--debug`, and no file created, changed or removed (sizes and "
               "SHA-256 of the whole input folder compared before and after).\n")
    out.append("| Entry point | Input | Observed | Message shown |")
    out.append("|---|---|---|---|")
    for r in bad:
        out.append(f"| {_cell(r.get('entry', ''))} | {_cell(r['title'])} | "
                   f"{_cell(r['observed'])} | `{_cell(r.get('message', ''))}` |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("results", None, "folder of the tests' JSON records", required=True,
                        flag_values=fv)
    flags.DEFINE_string("out", "docs/reliability.md", "markdown file to write", flag_values=fv)
    args = cli.parse(fv, argv, __doc__)
    try:
        text = render(load_records(args.results))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        print(f"error: --out {args.out}: the folder {folder} does not exist; create it or choose "
              "another --out", file=sys.stderr)
        return 2
    if os.path.isdir(args.out):
        print(f"error: --out {args.out} is a folder; pass the markdown file to write",
              file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"error: writing {args.out} failed ({e}); {args.out} is unchanged", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
