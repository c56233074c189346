"""MMIDIDX reader/writer against an independent struct-level writer of the spec's layout (§5.3)."""

import os
import struct

import numpy as np
import pytest

from agpt_jax.data.indexed import (
    DataError,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    write_indexed_dataset,
)

# Spec §5.3 dtype codes, written out independently of the module.
SPEC_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
              7: np.float32, 8: np.uint16}


def reference_write(prefix, docs, dtype, code):
    """Byte-level writer of the spec's layout: header, int32 sizes, int64 pointers, int64 doc_idx."""
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            for t in d:
                f.write(np.array([t], dtype=dtype).tobytes())
    sizes = [len(d) for d in docs]
    pointers, acc = [], 0
    for s in sizes:
        pointers.append(acc)
        acc += s * itemsize
    doc_idx = list(range(len(docs) + 1))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        for s in sizes:
            f.write(struct.pack("<i", s))
        for p in pointers:
            f.write(struct.pack("<q", p))
        for d in doc_idx:
            f.write(struct.pack("<q", d))


def _docs(rng, n, high):
    return [list(rng.integers(0, high, size=int(rng.integers(0, 12)))) for _ in range(n)]


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_writer_bytes_equal_reference_and_reader_roundtrips(tmp_path, code):
    dtype = SPEC_CODES[code]
    rng = np.random.default_rng(code)
    docs = _docs(rng, 17, 120)
    write_indexed_dataset(str(tmp_path / "ours"), docs, dtype)
    reference_write(str(tmp_path / "ref"), docs, dtype, code)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("ours" + ext)).read_bytes() == (tmp_path / ("ref" + ext)).read_bytes()
    ds = IndexedDataset(str(tmp_path / "ref"))
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], np.array(d, dtype=dtype))
        if len(d) >= 3:
            np.testing.assert_array_equal(ds.get(i, 1, 2), np.array(d[1:3], dtype=dtype))
            np.testing.assert_array_equal(ds.get(i, 2), np.array(d[2:], dtype=dtype))
    assert ds.num_tokens == sum(len(d) for d in docs)


def test_builder_multi_sequence_documents_match_reference_layout(tmp_path):
    # Megatron's add_item/end_document: several sequences per document -> doc_idx [0, 2, 3].
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32)
    b.add_item([1, 2, 3]); b.add_item([4]); b.end_document()
    b.add_item([5, 6]); b.end_document()
    b.finalize(str(tmp_path / "x.idx"))
    ds = IndexedDataset(str(tmp_path / "x"))
    np.testing.assert_array_equal(ds.sizes, [3, 1, 2])
    np.testing.assert_array_equal(ds.pointers, [0, 12, 16])
    np.testing.assert_array_equal(ds.doc_idx, [0, 2, 3])


def test_best_fitting_dtype_follows_megatron_threshold():
    assert best_fitting_dtype(32000) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.fixture
def good(tmp_path):
    reference_write(str(tmp_path / "d"), [[1, 2, 3], [4, 5], [6]], np.uint16, 8)
    return tmp_path


def test_wrong_magic_names_file(good):
    _corrupt(good / "d.idx", 0, b"XXXX")
    with pytest.raises(DataError, match=r"d\.idx.*magic"):
        IndexedDataset(str(good / "d"))


def test_wrong_version(good):
    _corrupt(good / "d.idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"d\.idx.*version is 2"):
        IndexedDataset(str(good / "d"))


def test_unknown_dtype_code(good):
    _corrupt(good / "d.idx", 17, struct.pack("<B", 9))
    with pytest.raises(DataError, match=r"d\.idx.*dtype code is 9"):
        IndexedDataset(str(good / "d"))


def test_truncated_idx(good):
    (good / "d.idx").write_bytes((good / "d.idx").read_bytes()[:-8])
    with pytest.raises(DataError, match=r"d\.idx.*implies"):
        IndexedDataset(str(good / "d"))


def test_bin_shorter_than_index(good):
    (good / "d.bin").write_bytes((good / "d.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"d\.bin.*truncated"):
        IndexedDataset(str(good / "d"))


def test_inconsistent_pointers(good):
    _corrupt(good / "d.idx", 34 + 3 * 4 + 8, struct.pack("<q", 4))  # pointers[1] = 4, should be 6
    with pytest.raises(DataError, match=r"pointers\[1\]"):
        IndexedDataset(str(good / "d"))


def test_missing_bin_or_idx(good):
    os.remove(good / "d.bin")
    with pytest.raises(DataError, match=r"missing .*d\.bin"):
        IndexedDataset(str(good / "d"))


def test_longer_bin_reads_index_as_written(good):
    # The fork's preprocessing leaves the EOD out of sizes (spec §8): the reader follows the index.
    (good / "d.bin").write_bytes((good / "d.bin").read_bytes() + b"\x02\x00")
    ds = IndexedDataset(str(good / "d"))
    np.testing.assert_array_equal(ds[2], [6])
