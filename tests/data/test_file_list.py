"""DATA_FILE_LIST parsing (spec §5.1) and blendcorpus mixing (§5.2)."""

import numpy as np
import pytest

from agpt_jax.data.file_list import mix_file_lists, read_file_list
from agpt_jax.data.indexed import DataError, write_indexed_dataset


def test_parse_strips_bin_and_resolves_relative(tmp_path):
    (tmp_path / "d").mkdir()
    write_indexed_dataset(str(tmp_path / "d" / "a_text_document"), [[1, 2]], np.uint16)
    write_indexed_dataset(str(tmp_path / "b"), [[3]], np.uint16)
    lst = tmp_path / "list.txt"
    lst.write_text(f"0.25 d/a_text_document.bin web\n\n# replay\n0.75 {tmp_path / 'b'} papers\n")
    entries = read_file_list(str(lst))
    assert [(e.weight, e.prefix, e.corpus, e.line) for e in entries] == [
        (0.25, str(tmp_path / "d" / "a_text_document"), "web", 1),
        (0.75, str(tmp_path / "b"), "papers", 4),
    ]


def test_every_problem_reported_at_once(tmp_path):
    write_indexed_dataset(str(tmp_path / "ok"), [[1, 2]], np.uint16)
    lst = tmp_path / "list.txt"
    lst.write_text("1.0 ok web\n0 ok web\nabc ok web\n1.0 missing web\n1.0 ok\n-2 ok web\n")
    with pytest.raises(DataError) as err:
        read_file_list(str(lst))
    msg = str(err.value)
    assert "5 problem(s)" in msg
    for needle in ("line 2: weight 0", "line 3: weight 'abc'", "line 4: missing", "line 5: expected 3 fields",
                   "line 6: weight -2"):
        assert needle in msg
    assert str(lst) in msg


def test_missing_list():
    with pytest.raises(DataError, match="does not exist"):
        read_file_list("/nonexistent/list.txt")


def test_mix_follows_blendcorpus_formula(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("2 /x/p1 papers\n# c\n6 /x/p2 papers\n")
    b.write_text("1 /y/d1 dolma\n1 /y/d2 dolma\n2 /y/d3 dolma\n")
    lines = mix_file_lists([(0.9, str(a)), (0.1, str(b))])
    got = [(m.prefix, m.corpus, m.weight) for m in lines]
    expect = [("/x/p1", "papers", 0.25 * 0.9), ("/x/p2", "papers", 0.75 * 0.9),
              ("/y/d1", "dolma", 0.25 * 0.1), ("/y/d2", "dolma", 0.25 * 0.1), ("/y/d3", "dolma", 0.5 * 0.1)]
    for (p, c, w), (ep, ec, ew) in zip(got, expect):
        assert (p, c) == (ep, ec) and w == pytest.approx(ew, rel=1e-15)
    assert sum(m.weight for m in lines) == pytest.approx(1.0)


def test_mix_rejects_nonpositive_global_weight(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("1 /x/p papers\n")
    with pytest.raises(DataError, match="must be positive"):
        mix_file_lists([(0.0, str(a))])


def test_crlf_line_ends_read_as_lf(tmp_path):
    """A list saved on Windows (CRLF) gives the same entries as with LF line ends."""
    write_indexed_dataset(str(tmp_path / "a"), [[1, 2]], np.uint16)
    write_indexed_dataset(str(tmp_path / "b"), [[3]], np.uint16)
    text = "0.3 a web\n\n0.7 b papers\n"
    (tmp_path / "lf.txt").write_bytes(text.encode())
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    lf, crlf = (read_file_list(str(tmp_path / n)) for n in ("lf.txt", "crlf.txt"))
    assert [(e.weight, e.prefix, e.corpus, e.line) for e in crlf] == [
        (0.3, str(tmp_path / "a"), "web", 1), (0.7, str(tmp_path / "b"), "papers", 3)]
    assert crlf == lf
    mixed_lf, mixed_crlf = (mix_file_lists([(1.0, str(tmp_path / n))])
                            for n in ("lf.txt", "crlf.txt"))
    assert [(m.weight, m.prefix, m.corpus) for m in mixed_crlf] == [
        (m.weight, m.prefix, m.corpus) for m in mixed_lf] == [(0.3, "a", "web"), (0.7, "b", "papers")]


def test_duplicate_paths_are_separate_entries_as_megatron_reads_them(tmp_path):
    """Megatron's list reader keeps every line (spec §5.1): a path listed twice is two datasets,
    so its corpus gets both weights."""
    from agpt_jax.data import BlendConfig, build_blended_splits

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_indexed_dataset(str(tmp_path / name), [rng.integers(3, 90, size=40)
                                                    for _ in range(30)], np.uint16)
    (tmp_path / "dup.txt").write_text("1.0 a web\n1.0 a web\n2.0 b papers\n")
    entries = read_file_list(str(tmp_path / "dup.txt"))
    assert [(e.prefix, e.line) for e in entries] == [
        (str(tmp_path / "a"), 1), (str(tmp_path / "a"), 2), (str(tmp_path / "b"), 3)]
    train = build_blended_splits(entries, BlendConfig(
        seq_length=8, global_batch_size=4, train_iters=50, eval_interval=1000, eval_iters=1,
        split="100,0,0"))["train"]
    shares = dict(zip(train.corpora, np.bincount(train.dataset_index) / len(train)))
    assert shares == pytest.approx({"web": 0.5, "papers": 0.5}, abs=0.01)  # (1 + 1) : 2


def test_a_list_that_is_not_utf8_is_one_clear_error(tmp_path):
    lst = tmp_path / "latin1.txt"
    lst.write_bytes("1.0 caf\u00e9 web\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt' is not UTF-8 text .*save it as UTF-8"):
        read_file_list(str(lst))
    with pytest.raises(DataError, match=r"latin1\.txt' is not UTF-8 text .*save it as UTF-8"):
        mix_file_lists([(1.0, str(lst))])


# One parser, one set of rules: every line read_file_list refuses, mix_file_lists refuses with the
# same words, naming the list and the line (blendcorpus' mix_datasets.py would take the first 3
# fields of the 4-field line and print the negative weight).
@pytest.mark.parametrize("bad, needle", [
    ("0.5 /x/my file papers", "line 2: expected 3 fields 'weight prefix corpus', got 4: "
                              "'0.5 /x/my file papers'"),
    ("-0.5 /x/p2 papers", "line 2: weight -0.5 must be a positive finite number"),
    ("0 /x/p2 papers", "line 2: weight 0 must be a positive finite number"),
    ("nan /x/p2 papers", "line 2: weight nan must be a positive finite number"),
    ("inf /x/p2 papers", "line 2: weight inf must be a positive finite number"),
    ("heavy /x/p2 papers", "line 2: weight 'heavy' is not a number"),
    ("1.0 /x/p2", "line 2: expected 3 fields 'weight prefix corpus', got 2: '1.0 /x/p2'"),
])
def test_both_readers_refuse_the_same_lines_naming_file_and_line(tmp_path, bad, needle):
    lst = tmp_path / "list.txt"
    lst.write_text(f"1.0 /x/p1 papers\n{bad}\n")
    with pytest.raises(DataError) as read_err:
        read_file_list(str(lst), check_files=False)
    assert str(read_err.value) == f"DATA_FILE_LIST {lst}: 1 problem(s):\n  {needle}"
    good = tmp_path / "good.txt"
    good.write_text("1.0 /y/d dolma\n")
    with pytest.raises(DataError) as mix_err:
        mix_file_lists([(0.5, str(good)), (0.5, str(lst))])
    assert str(mix_err.value) == f"mix inputs: 1 problem(s):\n  DATA_FILE_LIST {lst}: {needle}"


def test_both_readers_skip_the_same_lines_and_read_the_same_fields(tmp_path):
    """Comments, blank and whitespace-only lines, tabs and CRLF: the same entries from both."""
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"# header\r\n\r\n  \t \r\n 2\t/x/p1.bin  papers \r\n#0 /x/no web\r\n"
                    b"6 rel/p2 web\r\n")
    read = read_file_list(str(lst), check_files=False)
    assert [(e.weight, e.corpus, e.line) for e in read] == [(2.0, "papers", 4), (6.0, "web", 6)]
    assert [e.prefix for e in read] == ["/x/p1", str(tmp_path / "rel" / "p2")]  # resolved
    mixed = mix_file_lists([(1.0, str(lst))])
    assert [(m.weight, m.prefix, m.corpus) for m in mixed] == [  # prefixes kept as written
        (0.25, "/x/p1.bin", "papers"), (0.75, "rel/p2", "web")]


def test_a_list_without_entries_is_refused_by_both(tmp_path):
    """blendcorpus exits on such a list too (its weights sum to 0)."""
    lst = tmp_path / "empty.txt"
    lst.write_text("# nothing yet\n\n")
    needle = "no entries; a DATA_FILE_LIST needs at least one 'weight prefix corpus' line"
    with pytest.raises(DataError) as read_err:
        read_file_list(str(lst))
    assert str(read_err.value) == f"DATA_FILE_LIST {lst}: 1 problem(s):\n  {needle}"
    with pytest.raises(DataError) as mix_err:
        mix_file_lists([(1.0, str(lst))])
    assert str(mix_err.value) == f"mix inputs: 1 problem(s):\n  DATA_FILE_LIST {lst}: {needle}"


def test_mix_reports_every_bad_line_of_every_list_at_once(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1 /x/p papers\n0 /x/q papers\n")
    b.write_text("1 /y/d dolma extra\n-1 /y/e dolma\n")
    with pytest.raises(DataError) as err:
        mix_file_lists([(0.5, str(a)), (0.5, str(b)), (1.0, str(tmp_path / "none.txt"))])
    assert str(err.value).splitlines() == [
        "mix inputs: 4 problem(s):",
        f"  DATA_FILE_LIST {a}: line 2: weight 0 must be a positive finite number",
        f"  DATA_FILE_LIST {b}: line 1: expected 3 fields 'weight prefix corpus', got 4: "
        "'1 /y/d dolma extra'",
        f"  DATA_FILE_LIST {b}: line 2: weight -1 must be a positive finite number",
        f"  {tmp_path / 'none.txt'}: cannot open the list"]


def test_read_file_list_reports_problems_in_line_order(tmp_path):
    """A missing file is found after the line checks, but listed in its line's place."""
    write_indexed_dataset(str(tmp_path / "ok"), [[1, 2]], np.uint16)
    lst = tmp_path / "list.txt"
    lst.write_text("1.0 missing web\n0 ok web\n1.0 gone web\n1.0 ok web x\n")
    with pytest.raises(DataError) as err:
        read_file_list(str(lst))
    assert [line.split(":")[0] for line in str(err.value).splitlines()[1:]] == [
        "  line 1", "  line 2", "  line 3", "  line 4"]
