"""Mix DATA_FILE_LISTs with global weights, as blendcorpus' `utils/mix_datasets.py` does.

    python scripts/mix_datasets.py --inputs 0.9 papers.txt 0.1 dolma.txt > mix.txt

Every list's weights are normalised within the list and scaled by its share of the global weights;
lines are printed as `weight prefix corpus` in input order with 6 decimals, as blendcorpus prints
them. Beyond blendcorpus: a warning (on stderr) for weights that print as 0 at that precision, and
`--precision N` to print more digits.

Exit codes: 0 printed; 2 bad input (an odd number of --inputs, a global weight that is not a
positive number, a missing or malformed list; the message names the list and line). Nothing fails
after the inputs are read, so it never exits 1.
"""

from __future__ import annotations

import sys
import types

from absl import flags

from agpt_jax import cli
from agpt_jax.data.indexed import DataError
from agpt_jax.data.file_list import mix_file_lists


def parse_args(argv: list[str] | None) -> types.SimpleNamespace:
    """The flags of `argv` (sys.argv[1:] when None); a bad flag exits 2 (agpt_jax/cli.py)."""
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("inputs", None, "pairs of global weight and file list: W1 LIST1 W2 "
                              "LIST2 ...", required=True, flag_values=fv)
    flags.DEFINE_integer("precision", 6, "decimals of the printed weights", flag_values=fv)
    return cli.parse(fv, argv, __doc__, multiword=("inputs",))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inp = args.inputs
    if len(inp) % 2:
        print("error: --inputs needs pairs 'weight list' (an even number of arguments)", file=sys.stderr)
        return 2
    pairs = []
    for i in range(0, len(inp), 2):
        try:
            pairs.append((float(inp[i]), inp[i + 1]))
        except ValueError:
            print(f"error: global weight must be a number, got {inp[i]!r} (the weight comes before its list)",
                  file=sys.stderr)
            return 2
    try:
        lines = mix_file_lists(pairs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    zero = 0
    for m in lines:
        text = f"{m.weight:.{args.precision}f}"
        if float(text) == 0.0:
            zero += 1
            print(f"warning: {m.prefix} ({m.corpus}, from {m.source}) has weight {m.weight:.3e}, printed as {text}; "
                  f"that file would get no samples (agpt-jax rejects a 0 weight); use --precision {args.precision + 4}", file=sys.stderr)
        print(f"{text} {m.prefix} {m.corpus}")
    if zero:
        print(f"warning: {zero} weight(s) round to 0 at {args.precision} decimals", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
