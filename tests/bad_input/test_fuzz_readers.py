"""Property-based fuzzing of the two readers users feed directly: the `.idx` reader
(agpt_jax.data.indexed.IndexedDataset) and the DATA_FILE_LIST parser (read_file_list).

Property: for any bytes, the reader either returns documents that lie inside the `.bin` (each
exactly as long as the index says) or raises DataError; nothing else escapes, nothing hangs
(a per-example alarm), and no read goes past the end of a file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agpt_jax.data import DataError, read_file_list, write_indexed_dataset
from agpt_jax.data.indexed import MAGIC, IndexedDataset


EXAMPLES = 1000
PER_EXAMPLE_S = 5
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def _alarm(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"reader did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _valid_pair(directory: str) -> bytes:
    prefix = os.path.join(directory, "seed")
    rng = np.random.RandomState(0)
    write_indexed_dataset(prefix, (rng.randint(0, 500, rng.randint(1, 20)) for _ in range(6)),
                          np.uint16)
    with open(prefix + ".idx", "rb") as f:
        return f.read()


with tempfile.TemporaryDirectory() as _d:
    VALID_IDX = _valid_pair(_d)


def _headers():
    """Headers with the right magic and random fields (version, dtype code, counts)."""
    return st.builds(
        lambda version, code, n, docs: MAGIC + struct.pack("<Q", version) + bytes([code])
        + struct.pack("<Q", n) + struct.pack("<Q", docs),
        st.sampled_from([1, 0, 2, 2**63]), st.integers(0, 255),
        st.one_of(st.integers(0, 12), st.integers(0, 2**64 - 1)),
        st.one_of(st.integers(0, 13), st.integers(0, 2**64 - 1)))


def _mutated_valid():
    """The valid index with bytes overwritten, truncated or extended."""
    return st.builds(
        lambda edits, cut, tail: _apply(edits, cut, tail),
        st.lists(st.tuples(st.integers(0, len(VALID_IDX) - 1), st.integers(0, 255)),
                 max_size=6),
        st.integers(0, len(VALID_IDX)), st.binary(max_size=40))


def _apply(edits, cut, tail) -> bytes:
    data = bytearray(VALID_IDX)
    for pos, value in edits:
        data[pos] = value
    return bytes(data[:cut]) + tail


@_SETTINGS
@given(idx=st.one_of(st.binary(max_size=200), _headers().flatmap(
    lambda h: st.binary(max_size=160).map(lambda body: h + body)), _mutated_valid()),
    bin_size=st.integers(0, 300))
def test_idx_reader_raises_only_data_error(tmp_path_factory, idx, bin_size):
    d = tmp_path_factory.mktemp("fuzz_idx", numbered=True)
    prefix = os.path.join(str(d), "x")
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(np.arange(bin_size, dtype=np.uint8).tobytes())
    with _alarm(PER_EXAMPLE_S):
        try:
            ds = IndexedDataset(prefix)
        except DataError as e:
            assert prefix in str(e) or "x.idx" in str(e) or "x.bin" in str(e), str(e)
            return
        itemsize = np.dtype(ds.dtype).itemsize
        total = 0
        for i in range(min(len(ds), 64)):
            doc = ds[i]
            assert doc.ndim == 1
            total += doc.size
        # Documents lie inside the .bin: no read past its end.
        assert ds.num_tokens * itemsize <= bin_size
        assert total * itemsize <= bin_size


_LINE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.builds(lambda w, p, c: f"{w} {p} {c}",
              st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["0", "-1", "1e400", "nan", "1", "0.5", "x"])),
              st.sampled_from(["GOOD", "missing/prefix", "", "GOOD.bin", "/", "GOOD GOOD"]),
              st.text(alphabet="abc_-/ \t#", max_size=6)))


@_SETTINGS
@given(lines=st.lists(_LINE, max_size=8), check=st.booleans())
def test_file_list_parser_raises_only_data_error(tmp_path_factory, lines, check):
    d = tmp_path_factory.mktemp("fuzz_list", numbered=True)
    write_indexed_dataset(os.path.join(str(d), "good"), [np.arange(1, 30)], np.uint16)
    text = "\n".join(lines).replace("GOOD", os.path.join(str(d), "good"))
    path = os.path.join(str(d), "list.txt")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    with _alarm(PER_EXAMPLE_S):
        try:
            entries = read_file_list(path, check_files=check)
        except DataError as e:
            assert "list.txt" in str(e) or "line" in str(e), str(e)
            return
    assert entries
    for e in entries:
        assert e.weight > 0 and np.isfinite(e.weight)
        assert e.prefix and e.corpus
