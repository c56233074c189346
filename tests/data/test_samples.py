"""Per-file GPTDataset index against loop references of Megatron's algorithms (spec §5.4)."""

import os

import numpy as np
import pytest
from reference_megatron import ref_index, ref_sample_tokens, ref_split

from agpt_jax.data.indexed import DataError, IndexedDataset, write_indexed_dataset
from agpt_jax.data.samples import GPTDataset, build_sample_index, num_epochs_for, split_document_ranges


def _check_file(tmp_path, docs, dtype, num_samples, seq, seed=1234, lo=0, hi=None):
    prefix = str(tmp_path / f"f{len(docs)}_{seq}_{num_samples}")
    write_indexed_dataset(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    hi = len(docs) if hi is None else hi
    documents = np.arange(lo, hi, dtype=np.int32)
    ours = build_sample_index(ds.sizes, documents, num_samples, seq, seed)
    doc_idx, sample_idx, shuffle_idx, epochs, separate = ref_index(ds.sizes, documents, num_samples, seq, seed)
    np.testing.assert_array_equal(ours.doc_idx, doc_idx)
    assert ours.doc_idx.dtype == np.int32
    np.testing.assert_array_equal(ours.sample_idx, sample_idx)
    np.testing.assert_array_equal(ours.shuffle_idx, shuffle_idx)
    assert ours.shuffle_idx.dtype == shuffle_idx.dtype == np.uint32
    assert (ours.num_epochs, ours.separate_last_epoch) == (epochs, separate)
    gpt = GPTDataset(ds, "train", documents, num_samples, seq, seed)
    for i in range(min(len(gpt), 60)):
        np.testing.assert_array_equal(gpt[i], ref_sample_tokens(docs, doc_idx, shuffle_idx, seq, i))
        assert gpt[i].dtype == np.int64 and gpt[i].shape == (seq + 1,)
    return ours


def test_random_documents_uint16(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 32000, int(rng.integers(1, 40))) for _ in range(50)]
    _check_file(tmp_path, docs, np.uint16, num_samples=30, seq=16)


def test_document_longer_than_several_samples_int32(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 100000, n) for n in (200, 3, 97, 1, 150)]
    _check_file(tmp_path, docs, np.int32, num_samples=20, seq=8)


def test_one_token_documents(tmp_path):
    docs = [[i] for i in range(40)]
    _check_file(tmp_path, docs, np.uint16, num_samples=10, seq=3)


def test_many_epochs_with_separate_last_epoch(tmp_path):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 500, int(rng.integers(1, 10))) for _ in range(7)]
    tpe = sum(len(d) for d in docs)
    seq = 4
    n = (9 * tpe - 1) // seq + 1  # one sample more than 9 epochs hold: 10 epochs, the last separated
    ours = _check_file(tmp_path, docs, np.uint16, num_samples=n, seq=seq)
    assert ours.num_epochs == 10 and ours.separate_last_epoch


def test_many_epochs_without_separate_last_epoch(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 500, int(rng.integers(2, 10))) for _ in range(9)]
    tpe = sum(len(d) for d in docs)
    seq = 5
    n = ((3 * tpe - 1) // seq)  # exactly three full epochs
    ours = _check_file(tmp_path, docs, np.uint16, num_samples=n, seq=seq)
    assert ours.num_epochs == 3 and not ours.separate_last_epoch


def test_split_subrange_and_empty_documents(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 50, int(rng.integers(0, 6))) for _ in range(30)]
    docs[10] = []
    _check_file(tmp_path, docs, np.uint16, num_samples=7, seq=4, lo=5, hi=25)


def test_num_epochs_closed_form_matches_loop():
    from reference_megatron import ref_num_epochs
    for tpe in (2, 3, 17, 1000):
        for seq in (1, 2, 7, 64):
            for n in (0, 1, 5, 99, 1000):
                assert num_epochs_for(tpe, seq, n) == ref_num_epochs(tpe, seq, n)


@pytest.mark.parametrize("split", ["969, 30, 1", "990,10,0", "98,2,0", "1,1,1", "7,2,1"])
@pytest.mark.parametrize("n", [1, 3, 50, 250, 1001, 12345])
def test_split_boundaries_round_half_even(split, n):
    assert split_document_ranges(split, n) == ref_split(split, n)


def test_split_half_to_even_differs_from_half_up():
    # 250 documents under 990,10,0: valid = 2.5 -> Python round gives 2, not 3 (spec §8).
    b = split_document_ranges("990,10,0", 250)
    assert b == [0, 248, 250, 250]


def test_single_one_token_document_is_a_clear_error(tmp_path):
    write_indexed_dataset(str(tmp_path / "one"), [[5]], np.uint16)
    ds = IndexedDataset(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"one \(valid split\).*at least 2 tokens"):
        GPTDataset(ds, "valid", np.arange(0, 1, dtype=np.int32), 3, 4, 1234)


def test_cache_reused_and_rebuilt_when_inputs_change(tmp_path):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 50, int(rng.integers(1, 20))) for _ in range(20)]
    prefix = str(tmp_path / "c")
    write_indexed_dataset(prefix, docs, np.uint16)
    cache = str(tmp_path / "cache")
    documents = np.arange(20, dtype=np.int32)
    a = GPTDataset(IndexedDataset(prefix), "train", documents, 10, 8, 1234, cache)
    files = sorted(os.listdir(cache))
    b = GPTDataset(IndexedDataset(prefix), "train", documents, 10, 8, 1234, cache)
    assert sorted(os.listdir(cache)) == files  # reused, nothing new written
    assert isinstance(b.index.doc_idx, np.memmap)
    np.testing.assert_array_equal(a.index.shuffle_idx, b.index.shuffle_idx)
    # A different seq_length, seed, or file content must not reuse the entry. The expected index
    # is the loop reference of Megatron's algorithm (reference_megatron.ref_index, spec §5.4) on
    # the document lengths as written, not the module's own build_sample_index.
    def check(got, sizes, seq):
        doc_idx, sample_idx, shuffle_idx, _, _ = ref_index(np.asarray(sizes, np.int32), documents,
                                                           10, seq, 1234)
        np.testing.assert_array_equal(got.index.doc_idx, doc_idx)
        np.testing.assert_array_equal(got.index.sample_idx, sample_idx)
        np.testing.assert_array_equal(got.index.shuffle_idx, shuffle_idx)

    c = GPTDataset(IndexedDataset(prefix), "train", documents, 10, 4, 1234, cache)
    check(c, [len(x) for x in docs], 4)
    docs[3] = list(docs[3]) + [1, 2, 3]
    write_indexed_dataset(prefix, docs, np.uint16)
    d = GPTDataset(IndexedDataset(prefix), "train", documents, 10, 8, 1234, cache)
    check(d, [len(x) for x in docs], 8)
    assert not any(f.endswith(".tmp") for f in os.listdir(cache))
