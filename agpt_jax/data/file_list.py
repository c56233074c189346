"""DATA_FILE_LIST parsing and blendcorpus-style mixing of several lists.

A DATA_FILE_LIST line is `weight prefix corpus` (spec/megatron-deepspeed.md §5.1, read by
`pretrain_gpt_alcf.py:train_valid_test_datasets_provider`). Mixing follows
`blendcorpus/utils/mix_datasets.py` (§5.2).

Both readers here, `read_file_list` (a list to train on) and `mix_file_lists` (lists to mix into
a new one), parse lines with `_parse_lines`, so a line one of them accepts the other accepts too:
UTF-8 text; blank lines and lines starting with `#` skipped; every other line exactly 3
whitespace-separated fields `weight prefix corpus` with a positive finite weight; at least one
such line. This is stricter than blendcorpus' mix_datasets.py in two ways: it takes the first 3
fields of a line with more and ignores the rest, and any number as a weight (only the list's sum
must be positive). A 4th field is most often a path with a space in it, which blendcorpus would
split into a wrong prefix and a wrong corpus without a word, and the list it writes goes to
Megatron's reader, which refuses anything but exactly 3 fields (§5.1); a weight that is not
positive is refused by `read_file_list` when the mix is trained on. Both errors name the list and
the line here, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os

from agpt_jax.data.indexed import DataError, data_file_path, index_file_path

__all__ = ["FileListEntry", "MixedLine", "mix_file_lists", "read_file_list", "strip_bin_suffix"]


@dataclasses.dataclass(frozen=True)
class FileListEntry:
    """One line of a DATA_FILE_LIST.

    Attributes:
        weight: relative sampling weight (positive; normalised over the list later).
        prefix: absolute dataset prefix (no `.bin`/`.idx` suffix).
        corpus: corpus name; files of one corpus are blended together (§5.5).
        line: 1-based line number in the list file.
    """

    weight: float
    prefix: str
    corpus: str
    line: int


def strip_bin_suffix(prefix: str) -> str:
    """Drops a trailing `.bin` (Megatron strips it; we strip only a suffix, not a mid-path match)."""
    return prefix[: -len(".bin")] if prefix.endswith(".bin") else prefix


# A problem found in a list: (1-based line number, or 0 for the whole list; the message).
_Problem = tuple[int, str]


def _parse_lines(path: str) -> tuple[list[FileListEntry], list[_Problem]]:
    """The `weight prefix corpus` lines of an existing list file, and what is wrong with the rest.

    The one set of rules both public functions apply (see the module docstring). Prefixes are
    returned as written (no `.bin` stripped, not resolved); the caller decides.

    Returns:
        (entries in file order, problems in line order). Every problem's message starts with
        `line N: `, except "no entries" (line 0): the list has neither an entry nor a bad line.

    Raises:
        DataError: the file is not UTF-8 text (one message, no line: nothing else can be read).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()  # also cuts CRLF line ends
    except UnicodeDecodeError as e:
        raise DataError(f"DATA_FILE_LIST {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                        "save it as UTF-8 'weight prefix corpus' lines") from None
    entries: list[FileListEntry] = []
    problems: list[_Problem] = []
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 3:
            problems.append((lineno, f"line {lineno}: expected 3 fields 'weight prefix corpus', "
                                     f"got {len(parts)}: {text!r}"))
            continue
        w_text, prefix, corpus = parts
        try:
            weight = float(w_text)
        except ValueError:
            problems.append((lineno, f"line {lineno}: weight {w_text!r} is not a number"))
            continue
        if not math.isfinite(weight) or weight <= 0:
            problems.append((lineno, f"line {lineno}: weight {w_text} must be a positive finite "
                                     "number"))
            continue
        entries.append(FileListEntry(weight=weight, prefix=prefix, corpus=corpus, line=lineno))
    if not entries and not problems:
        problems.append((0, "no entries; a DATA_FILE_LIST needs at least one 'weight prefix "
                            "corpus' line"))
    return entries, problems


def read_file_list(path: str, *, check_files: bool = True) -> list[FileListEntry]:
    """Reads and validates a DATA_FILE_LIST.

    Blank lines are skipped. Unlike Megatron, lines starting with `#` are comments (Megatron would
    fail on them). Relative prefixes resolve against the folder of the list file.

    Args:
        path: the list file.
        check_files: also require that every prefix has its `.bin` and `.idx`.

    Returns:
        The entries in file order.

    Raises:
        DataError: listing every problem at once (line numbers, what is wrong, how to fix it).
    """
    if not os.path.isfile(path):
        raise DataError(f"DATA_FILE_LIST {path!r} does not exist; pass an existing list file")
    base = os.path.dirname(os.path.abspath(path))
    parsed, problems = _parse_lines(path)
    entries: list[FileListEntry] = []
    for e in parsed:
        prefix = strip_bin_suffix(e.prefix)
        if not os.path.isabs(prefix):
            prefix = os.path.normpath(os.path.join(base, prefix))
        if check_files:
            missing = [p for p in (data_file_path(prefix), index_file_path(prefix)) if not os.path.isfile(p)]
            if missing:
                problems.append((e.line, f"line {e.line}: missing {' and '.join(missing)}"))
                continue
        entries.append(dataclasses.replace(e, prefix=prefix))
    if problems:
        problems.sort(key=lambda p: p[0])  # stable: one problem per line, in file order
        raise DataError(f"DATA_FILE_LIST {path}: {len(problems)} problem(s):\n  "
                        + "\n  ".join(text for _, text in problems))
    return entries


@dataclasses.dataclass(frozen=True)
class MixedLine:
    """One output line of a mix: the exact weight, and the text as fields."""

    weight: float
    prefix: str
    corpus: str
    source: str  # the list file it came from


def mix_file_lists(inputs: list[tuple[float, str]]) -> list[MixedLine]:
    """Mixes DATA_FILE_LISTs with global weights, as blendcorpus' `mix_datasets.py` does.

    Each list's weights are normalised within the list, then scaled by `gw / sum(gw)`. Lines keep
    their input order; prefixes are copied as written (not resolved). Lines are read by the
    rules of `read_file_list` (see the module docstring).

    Args:
        inputs: (global weight, list path) pairs.

    Returns:
        One `MixedLine` per input line.

    Raises:
        DataError: every problem at once (non-positive global weight, missing list, bad line:
            `DATA_FILE_LIST <list>: line N: ...`, as `read_file_list` words it).
    """
    problems: list[str] = []
    for gw, list_path in inputs:
        if not math.isfinite(gw) or gw <= 0:
            problems.append(f"global weight {gw} for {list_path} must be positive")
    if problems:
        raise DataError("mix inputs: " + "; ".join(problems))
    sum_global = sum(gw for gw, _ in inputs)
    out: list[MixedLine] = []
    for gw, list_path in inputs:
        file_fraction = gw / sum_global
        if not os.path.isfile(list_path):
            problems.append(f"{list_path}: cannot open the list")
            continue
        try:
            entries, line_problems = _parse_lines(list_path)
        except DataError as e:  # not UTF-8
            problems.append(str(e))
            continue
        if line_problems:
            problems += [f"DATA_FILE_LIST {list_path}: {text}" for _, text in line_problems]
            continue
        # Every weight is positive and finite and there is at least one: the sum is positive.
        file_sum = sum(e.weight for e in entries)
        for e in entries:
            out.append(MixedLine((e.weight / file_sum) * file_fraction, e.prefix, e.corpus,
                                 list_path))
    if problems:
        raise DataError(f"mix inputs: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return out
