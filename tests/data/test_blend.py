"""Corpus blending against a loop reference of the fork's algorithm (spec §5.5, §8)."""

import numpy as np
import pytest
from reference_megatron import ref_file_counts, ref_greedy, ref_index, ref_sample_tokens, ref_split

from agpt_jax.data.blend import BlendConfig, build_blended_splits, build_blending_indices, split_num_samples
from agpt_jax.data.file_list import FileListEntry
from agpt_jax.data.indexed import DataError, write_indexed_dataset


def _make_files(tmp_path, specs, seed=0):
    """specs: list of (name, n_docs, max_len, dtype). Returns {name: docs}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n, max_len, dtype in specs:
        docs = [rng.integers(0, 30000, int(rng.integers(1, max_len + 1))) for _ in range(n)]
        write_indexed_dataset(str(tmp_path / name), docs, dtype)
        out[name] = docs
    return out


def reference_blend(entries, docs_by_prefix, cfg, split_pos):
    """Expected (tokens, corpus) of every blended sample, from the loop references."""
    iters, gbs = cfg.train_iters, cfg.global_batch_size
    split_samples = [iters * gbs, (iters // cfg.eval_interval + 1) * cfg.eval_iters * gbs, cfg.eval_iters * gbs]
    counts = ref_file_counts([e.weight for e in entries], split_samples)
    corpora = sorted({e.corpus for e in entries})
    train_total = sum(c[0] for c in counts)
    per_corpus = []
    for name in corpora:
        members = [(e, c[split_pos]) for e, c in zip(entries, counts) if e.corpus == name]
        readers = []
        for e, n in members:
            docs = docs_by_prefix[e.prefix]
            b = ref_split(cfg.split, len(docs))
            documents = np.arange(b[split_pos], b[split_pos + 1], dtype=np.int32)
            sizes = np.array([len(d) for d in docs], dtype=np.int32)
            doc_idx, _, shuffle_idx, _, _ = ref_index(sizes, documents, n, cfg.seq_length, cfg.seed)
            readers.append((docs, doc_idx, shuffle_idx))
        ns = np.array([n for _, n in members])
        n_c = int(ns.sum())
        if cfg.blend_sample_in_corpus:
            fidx, fsidx = ref_greedy(list(ns / n_c), n_c)
        else:
            fidx = np.concatenate([[i] * n for i, n in enumerate(ns)]).astype(int)
            fsidx = np.concatenate([np.arange(n) for n in ns])
        order = np.arange(n_c)
        if cfg.shuffle_sample_in_corpus:
            np.random.RandomState(seed=cfg.seed).shuffle(order)
        per_corpus.append((readers, fidx, fsidx, order))
    sizes_c = [len(pc[3]) for pc in per_corpus]
    w = np.array([s / train_total for s in sizes_c], dtype=np.float64)
    w = w / np.sum(w)
    size = sum(c[split_pos] for c in counts)
    cidx, csidx = ref_greedy(list(w), size)

    def sample(i):
        readers, fidx, fsidx, order = per_corpus[cidx[i]]
        k = order[csidx[i]]
        docs, doc_idx, shuffle_idx = readers[fidx[k]]
        return ref_sample_tokens(docs, doc_idx, shuffle_idx, cfg.seq_length, int(fsidx[k])), int(cidx[i])

    return size, corpora, sample


@pytest.mark.parametrize("shuffle,blend", [(False, False), (True, False), (True, True), (False, True)])
def test_blend_matches_reference(tmp_path, shuffle, blend):
    files = _make_files(tmp_path, [("w0", 60, 30, np.uint16), ("c0", 40, 50, np.int32),
                                   ("w1", 30, 20, np.uint16), ("p0", 80, 10, np.uint16)])
    # List order is not sorted: corpora must come out sorted (code, papers, web).
    entries = [FileListEntry(0.4, str(tmp_path / "w0"), "web", 1),
               FileListEntry(0.3, str(tmp_path / "c0"), "code", 2),
               FileListEntry(0.2, str(tmp_path / "w1"), "web", 3),
               FileListEntry(0.1, str(tmp_path / "p0"), "papers", 4)]
    docs = {str(tmp_path / k): v for k, v in files.items()}
    cfg = BlendConfig(seq_length=16, global_batch_size=4, train_iters=25, eval_interval=10, eval_iters=2,
                      split="90,6,4", shuffle_sample_in_corpus=shuffle, blend_sample_in_corpus=blend,
                      cache_dir=str(tmp_path / "cache"))
    splits = build_blended_splits(entries, cfg)
    assert set(splits) == {"train", "valid", "test"}
    for pos, name in enumerate(["train", "valid", "test"]):
        size, corpora, sample = reference_blend(entries, docs, cfg, pos)
        ds = splits[name]
        assert len(ds) == size and ds.corpora == corpora == ["code", "papers", "web"]
        for i in range(size):
            tokens, c = ds[i]
            ref_tokens, ref_c = sample(i)
            assert c == ref_c
            np.testing.assert_array_equal(tokens, ref_tokens)
    # Second build comes from the cache and gives the same samples.
    again = build_blended_splits(entries, cfg)["train"]
    np.testing.assert_array_equal(again.dataset_index, splits["train"].dataset_index)
    np.testing.assert_array_equal(again[7][0], splits["train"][7][0])


def test_one_file_corpus_tiny_weight_many_epochs(tmp_path):
    # A weight far smaller than the others still gets ceil(...) >= 1 sample; a small file loops.
    files = _make_files(tmp_path, [("big", 100, 40, np.uint16), ("tiny", 12, 3, np.int32)], seed=3)
    entries = [FileListEntry(1.0, str(tmp_path / "big"), "a", 1),
               FileListEntry(1e-4, str(tmp_path / "tiny"), "b", 2)]
    docs = {str(tmp_path / k): v for k, v in files.items()}
    cfg = BlendConfig(seq_length=32, global_batch_size=8, train_iters=40, eval_iters=0, split="1,0,0")
    splits = build_blended_splits(entries, cfg)
    assert set(splits) == {"train"}
    size, corpora, sample = reference_blend(entries, docs, cfg, 0)
    ds = splits["train"]
    assert len(ds) == size == int(np.ceil(320 * (1 / 1.0001) * 1.005)) + 1
    for i in range(size):
        t, c = ds[i]
        rt, rc = sample(i)
        assert c == rc
        np.testing.assert_array_equal(t, rt)
    assert ds.corpus_ids(0, size).tolist().count(1) == 1


def test_many_epochs_tiny_file(tmp_path):
    files = _make_files(tmp_path, [("small", 5, 6, np.uint16), ("other", 50, 30, np.uint16)], seed=4)
    entries = [FileListEntry(0.5, str(tmp_path / "small"), "s", 1),
               FileListEntry(0.5, str(tmp_path / "other"), "o", 2)]
    docs = {str(tmp_path / k): v for k, v in files.items()}
    cfg = BlendConfig(seq_length=8, global_batch_size=4, train_iters=30, eval_iters=0, split="1")
    ds = build_blended_splits(entries, cfg)["train"]
    small = ds.corpus_datasets[ds.corpora.index("s")].files[0]
    assert small.index.num_epochs > 5
    size, _, sample = reference_blend(entries, docs, cfg, 0)
    for i in range(size):
        np.testing.assert_array_equal(ds[i][0], sample(i)[0])


def test_greedy_matches_loop_reference_including_ties():
    rng = np.random.default_rng(7)
    cases = [[0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.1], [0.999, 0.0005, 0.0005]]
    cases += [list(w / w.sum()) for w in rng.random((5, 4))]
    for w in cases:
        idx, sidx = build_blending_indices(np.array(w), 500)
        ridx, rsidx = ref_greedy(w, 500)
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(sidx, rsidx)


def test_split_sample_targets():
    cfg = BlendConfig(seq_length=8, global_batch_size=6, train_iters=874, eval_interval=100, eval_iters=20)
    assert split_num_samples(cfg) == (874 * 6, (874 // 100 + 1) * 20 * 6, 20 * 6)
    assert BlendConfig(1 + 1, 1, 1).split == "969, 30, 1"


def test_empty_split_is_a_clear_error(tmp_path):
    _make_files(tmp_path, [("f", 50, 10, np.uint16)])
    entries = [FileListEntry(1.0, str(tmp_path / "f"), "x", 3)]
    cfg = BlendConfig(seq_length=8, global_batch_size=2, train_iters=5, eval_iters=1, split="990,10,0")
    with pytest.raises(DataError, match=r"line 3: .*f has 50 documents.*0 documents to the valid split"):
        build_blended_splits(entries, cfg)


def test_shared_cache_never_mixes_concat_and_blend_modes(tmp_path):
    # The fork keys its corpus cache on (corpus, n_c) only, so a blend run could reuse a concat
    # index (spec §8). Here both modes share one cache folder and each still matches its reference.
    files = _make_files(tmp_path, [("x0", 40, 20, np.uint16), ("x1", 40, 20, np.uint16)], seed=9)
    entries = [FileListEntry(0.6, str(tmp_path / "x0"), "web", 1), FileListEntry(0.4, str(tmp_path / "x1"), "web", 2)]
    docs = {str(tmp_path / k): v for k, v in files.items()}
    for blend in (False, True, False):
        cfg = BlendConfig(seq_length=8, global_batch_size=4, train_iters=10, eval_iters=0, split="1",
                          blend_sample_in_corpus=blend, cache_dir=str(tmp_path / "shared"))
        ds = build_blended_splits(entries, cfg)["train"]
        size, _, sample = reference_blend(entries, docs, cfg, 0)
        for i in range(size):
            np.testing.assert_array_equal(ds[i][0], sample(i)[0])
