"""agpt_jax/cli.py: the command lines' absl parsing keeps their spellings and exit codes."""

from __future__ import annotations

import sys

import pytest
from absl import flags

from agpt_jax import cli


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("inputs", None, "weight list pairs", required=True, flag_values=fv)
    flags.DEFINE_integer("precision", 6, "decimals", flag_values=fv)
    flags.DEFINE_bool("shuffle-sample-in-corpus", True, "shuffle", flag_values=fv)
    flags.DEFINE_bool("no-optimizer-state", False, "params only", flag_values=fv)
    return fv


def _parse(*argv: str):
    return cli.parse_args(_flags(), list(argv), "Doc of the command.", multiword=("inputs",))


def test_argparse_spellings_mean_what_they_meant():
    args, rest = _parse("--inputs", "0.9", "a.txt", "-0.1", "b.txt", "--precision=8",
                        "--no-shuffle-sample-in-corpus", "--no-optimizer-state")
    assert (args.inputs, args.precision, rest) == (["0.9", "a.txt", "-0.1", "b.txt"], 8, [])
    assert args.shuffle_sample_in_corpus is False and args.no_optimizer_state is True
    args, rest = _parse("--inputs=1", "--inputs", "x", "--noshuffle-sample-in-corpus",
                        "--shuffle-sample-in-corpus", "--", "--later")
    assert (args.inputs, args.shuffle_sample_in_corpus, rest) == (["1", "x"], True, ["--later"])
    assert _parse("--inputs", "1", "x")[0].no_optimizer_state is False  # defaults, afresh


@pytest.mark.parametrize("argv", [("--inputs", "1", "--bogus"), ("--inputs", "1", "--precision",
                                  "x"), (), ("--inputs",), ("--inputs", "1", "--noprecision=1")])
def test_a_bad_flag_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "see --help" in err[0], err


def test_positional_arguments_are_bad_input_where_none_are_taken(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(_flags(), ["--inputs", "1", "--", "stray"], "Doc.")
    assert e.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err == "error: unexpected arguments stray; pass flags only, see --help\n"


def test_help_prints_the_doc_and_the_flags_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        _parse("-h")  # before the required --inputs is checked
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Doc of the command.\n")
    assert "--inputs: weight list pairs" in out and "--[no]shuffle-sample-in-corpus" in out
