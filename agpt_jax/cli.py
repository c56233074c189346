"""What the command lines share: their exit codes and absl flag parsing that exits 2 on bad input.

Every command line of agpt-jax parses absl flags and exits 0 when done, :data:`EXIT_USAGE` (2) on
bad input with one line on stderr naming it, and :data:`EXIT_FAILED` (1) on a failure while
running. absl's own parser exits 1 on a bad flag; :func:`parse_flags_exit_usage` (for
``app.run(main, flags_parser=...)`` over the global ``flags.FLAGS``) and :func:`parse` exit 2.

The scripts, converters and benchmarks define their flags on a ``flags.FlagValues`` of their own,
made anew by each ``main(argv)`` call, and parse it with :func:`parse` or :func:`parse_args`:
tests and scripts/demo.py import several of them into one process and call ``main(argv)`` many
times, where the global ``flags.FLAGS`` would refuse a second definition of a name (``--save``,
``--out``, ``--platform``) and carry one call's values into the next. Both also accept what these
command lines accepted before they were absl's: ``--no-NAME`` for a boolean flag NAME, and several
words after one flag (``--inputs 0.9 a.txt 0.1 b.txt``) for the flags a script names.

Imports: absl only, no jax: a script's ``--help`` and its flag checks start no backend.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Collection, Sequence

from absl import flags

# Exit codes of the command lines: 1 a failure while running, 2 bad input.
EXIT_FAILED, EXIT_USAGE = 1, 2

# A word that starts with "-" but is a value, not a flag: a negative number.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def parse_flags_exit_usage(argv: Sequence[str],
                           flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl flag parsing for ``app.run(..., flags_parser=parse_flags_exit_usage)``.

    A bad flag (unknown, or an illegal value) prints one line and exits EXIT_USAGE (2), as
    argparse does; absl's own parser exits 1, which the command lines keep for failures.

    Args:
        argv: the program name, then its arguments.
        flag_values: the flags to parse (the global ``flags.FLAGS`` by default).

    Returns:
        The program name, then the positional arguments.
    """
    try:
        return flag_values(list(argv))
    except (flags.Error, ValueError) as err:  # ValueError: a value given to --noNAME
        more = "--helpfull" if flag_values is flags.FLAGS else "--help"
        message = " ".join(str(err).split()).rstrip(".")
        print(f"error: {message}; see {more} for the flags", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _HelpFlag(flags.BooleanFlag):
    """``--help`` / ``-h``: prints the command's docstring and its flags, then exits 0."""

    def __init__(self, flag_values: flags.FlagValues, doc: str):
        super().__init__("help", False, "show this help and exit", short_name="h")
        self._flag_values, self._doc = flag_values, doc

    def parse(self, argument: str) -> None:
        super().parse(argument)
        if self.value:  # before the required flags are checked, as argparse does
            text = self._flag_values.get_help(include_special_flags=False)
            lines = [line for line in text.splitlines() if line.startswith("  ")]  # no modules
            print("\n".join([self._doc.rstrip(), "", "flags:", *lines]))
            sys.exit(0)


def _absl_spellings(argv: Sequence[str], flag_values: flags.FlagValues,
                    multiword: Collection[str]) -> list[str]:
    """argv with ``--no-NAME`` as ``--noNAME`` and ``--FLAG W1 W2`` as ``--FLAG=W1 --FLAG=W2``.

    ``--no-NAME`` is rewritten only where NAME is a boolean flag and ``no-NAME`` is no flag of
    its own. A FLAG of ``multiword`` takes the words up to the next flag (a negative number is a
    word), as argparse's ``nargs="+"`` did.
    """
    out: list[str] = []
    words = iter(argv)
    multi, values = None, []  # the multiword flag that is reading words, and its words so far
    for word in words:
        is_flag = word.startswith("-") and word != "-" and not _NEGATIVE_NUMBER.match(word)
        if multi is not None:
            if not is_flag:
                values.append(word)
                continue
            out += [f"--{multi}={w}" for w in values] or [f"--{multi}"]
            multi = None
        if word == "--":
            out += [word, *words]
            break
        if not is_flag:
            out.append(word)
            continue
        name, eq, value = word.lstrip("-").partition("=")
        if (name.startswith("no-") and name not in flag_values and name[3:] in flag_values
                and flag_values[name[3:]].boolean):
            word = f"--no{name[3:]}{eq}{value}"
        elif name in multiword and not eq:
            multi, values = name, []
            continue
        out.append(word)
    if multi is not None:
        out += [f"--{multi}={w}" for w in values] or [f"--{multi}"]
    return out


def parse_args(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str,
               multiword: Collection[str] = ()) -> tuple[types.SimpleNamespace, list[str]]:
    """Parses a command line's own flags; a bad flag is one line on stderr and exit code 2.

    Args:
        flag_values: the command's flags, on a ``flags.FlagValues`` made for this call.
        argv: the arguments after the program name (``sys.argv[1:]`` when None).
        doc: what ``--help`` prints before the flags (the script's docstring).
        multiword: multi-string flags that take every word up to the next flag.

    Returns:
        The flags' values, as attributes named with underscores for hyphens
        (``--data-file-list`` is ``data_file_list``), and the positional arguments in order.
    """
    own = next(iter(flag_values.flags_by_module_dict()), None)  # listed with the command's flags
    flags.DEFINE_flag(_HelpFlag(flag_values, doc), flag_values, module_name=own)
    argv = sys.argv[1:] if argv is None else argv
    rest = parse_flags_exit_usage(
        [sys.argv[0], *_absl_spellings(argv, flag_values, multiword)], flag_values)[1:]
    values = {name.replace("-", "_"): value
              for name, value in flag_values.flag_values_dict().items()
              if flag_values[name].name == name != "help"}
    return types.SimpleNamespace(**values), rest


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str,
          multiword: Collection[str] = ()) -> types.SimpleNamespace:
    """:func:`parse_args` for a command line that takes no positional arguments (bad input)."""
    args, rest = parse_args(flag_values, argv, doc, multiword)
    if rest:
        print(f"error: unexpected arguments {' '.join(rest)}; pass flags only, see --help",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return args
