"""DATA_FILE_LIST parsing and blendcorpus-style mixing of several lists.

A DATA_FILE_LIST line is `weight prefix corpus` (spec/megatron-deepspeed.md §5.1, read by
`pretrain_gpt_alcf.py:train_valid_test_datasets_provider`). Mixing follows
`blendcorpus/utils/mix_datasets.py` (§5.2).
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
    entries: list[FileListEntry] = []
    problems: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()  # also cuts CRLF line ends
    except UnicodeDecodeError as e:
        raise DataError(f"DATA_FILE_LIST {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                        "save it as UTF-8 'weight prefix corpus' lines") from None
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) != 3:
            problems.append(
                f"line {lineno}: expected 3 fields 'weight prefix corpus', got {len(parts)}: {text!r}"
            )
            continue
        w_text, prefix, corpus = parts
        try:
            weight = float(w_text)
        except ValueError:
            problems.append(f"line {lineno}: weight {w_text!r} is not a number")
            continue
        if not math.isfinite(weight) or weight <= 0:
            problems.append(f"line {lineno}: weight {w_text} must be a positive finite number")
            continue
        prefix = strip_bin_suffix(prefix)
        if not os.path.isabs(prefix):
            prefix = os.path.normpath(os.path.join(base, prefix))
        if check_files:
            missing = [p for p in (data_file_path(prefix), index_file_path(prefix)) if not os.path.isfile(p)]
            if missing:
                problems.append(f"line {lineno}: missing {' and '.join(missing)}")
                continue
        entries.append(FileListEntry(weight=weight, prefix=prefix, corpus=corpus, line=lineno))
    if not entries and not problems:
        problems.append("no entries; a DATA_FILE_LIST needs at least one 'weight prefix corpus' line")
    if problems:
        raise DataError(
            f"DATA_FILE_LIST {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
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
    their input order; prefixes are copied as written (not resolved).

    Args:
        inputs: (global weight, list path) pairs.

    Returns:
        One `MixedLine` per input line.

    Raises:
        DataError: every problem at once (non-positive global weight, missing list, bad line).
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
        entries: list[tuple[str, float, str]] = []
        file_sum = 0.0
        try:
            with open(list_path, encoding="utf-8") as f:
                list_lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            problems.append(f"{list_path}: not UTF-8 text (byte {e.start}: {e.reason}); save it "
                            "as UTF-8")
            continue
        for lineno, raw in enumerate(list_lines, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) < 3:
                problems.append(f"{list_path}:{lineno}: need 'weight prefix corpus', got {text!r}")
                continue
            try:
                w = float(parts[0])
            except ValueError:
                problems.append(f"{list_path}:{lineno}: weight {parts[0]!r} is not a number")
                continue
            entries.append((parts[1], w, parts[2]))
            file_sum += w
        if entries and file_sum <= 0:
            problems.append(f"{list_path}: sum of weights is non-positive ({file_sum})")
            continue
        for prefix, w, corpus in entries:
            out.append(MixedLine((w / file_sum) * file_fraction, prefix, corpus, list_path))
    if problems:
        raise DataError(f"mix inputs: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return out
