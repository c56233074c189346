"""grain batch iterator: batch contents, process sharding, exact resume, per-corpus counts."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

import grain
from agpt_jax.data.blend import BlendConfig, build_blended_splits
from agpt_jax.data.file_list import FileListEntry
from agpt_jax.data.indexed import DataError, write_indexed_dataset
from agpt_jax.data.pipeline import make_batch_iterator, read_iterator_state

GBS = 8
SEQ = 16


def _expected_batch(ds, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's global batch t: rows t*GBS .. t*GBS+GBS-1 of the blended dataset (its samples
    of SEQ + 1 tokens, and their corpus ids), read from the dataset itself rather than through
    the pipeline module under test."""
    rows = [ds[t * GBS + r] for r in range(GBS)]
    return np.stack([tokens for tokens, _ in rows]), np.array([c for _, c in rows])


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    entries = []
    for i, (name, corpus, w) in enumerate([("a", "web", 0.5), ("b", "code", 0.3), ("c", "papers", 0.2)]):
        docs = [rng.integers(0, 32000, int(rng.integers(1, 60))) for _ in range(150)]
        write_indexed_dataset(str(tmp / name), docs, np.uint16)
        entries.append(FileListEntry(w, str(tmp / name), corpus, i + 1))
    cfg = BlendConfig(seq_length=SEQ, global_batch_size=GBS, train_iters=30, eval_iters=0, split="1,0,0")
    return build_blended_splits(entries, cfg)["train"]


def test_batches_are_megatron_get_batch_of_blended_rows(train_ds):
    it = make_batch_iterator(train_ds, global_batch_size=GBS)
    for t in range(3):
        batch = next(it)
        assert batch["tokens"].dtype == batch["labels"].dtype == batch["corpus"].dtype == np.int32
        assert batch["tokens"].shape == (GBS, SEQ)
        for r in range(GBS):
            tokens, c = train_ds[t * GBS + r]
            np.testing.assert_array_equal(batch["tokens"][r], tokens[:-1])
            np.testing.assert_array_equal(batch["labels"][r], tokens[1:])
            assert batch["corpus"][r] == c


def test_two_processes_read_each_sample_once(train_ds):
    its = [make_batch_iterator(train_ds, global_batch_size=GBS, process_index=p, process_count=2) for p in (0, 1)]
    for t in range(4):
        parts = [next(it) for it in its]
        text, corpus = _expected_batch(train_ds, t)
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), text[:, :-1])
        np.testing.assert_array_equal(np.concatenate([p["labels"] for p in parts]), text[:, 1:])
        np.testing.assert_array_equal(np.concatenate([p["corpus"] for p in parts]), corpus)
        assert all(p["tokens"].shape[0] == GBS // 2 for p in parts)


def test_exact_resume_also_with_other_process_count(train_ds):
    straight = make_batch_iterator(train_ds, global_batch_size=GBS, prefetch=3)
    expected = [next(straight)["tokens"] for _ in range(8)]
    first = make_batch_iterator(train_ds, global_batch_size=GBS)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make_batch_iterator(train_ds, global_batch_size=GBS, prefetch=0)
    resumed.set_state(state)
    for t in range(5, 8):
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[t])
    halves = [make_batch_iterator(train_ds, global_batch_size=GBS, process_index=p, process_count=2) for p in (0, 1)]
    for h in halves:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), expected[5])
    bad = make_batch_iterator(train_ds, global_batch_size=GBS // 2)
    with pytest.raises(DataError, match="global_batch_size"):
        bad.set_state(state)


def test_state_saves_in_an_orbax_step(train_ds, tmp_path):
    it = make_batch_iterator(train_ds, global_batch_size=GBS)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = make_batch_iterator(train_ds, global_batch_size=GBS)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["tokens"], _expected_batch(train_ds, 3)[0][:, :-1])
    assert read_iterator_state(str(tmp_path / "ckpt" / "3" / "data"))["next_iteration"] == 3


def test_per_corpus_counts_within_greedy_bound(train_ds):
    # For the greedy blend, w_c*n - count_c(n) lies in (-1, K-1) at every prefix n (its errors sum
    # to zero and the picked corpus always has a non-negative error).
    it = make_batch_iterator(train_ds, global_batch_size=GBS)
    corpus = np.concatenate([b["corpus"] for b in it])
    assert corpus.size == (len(train_ds) // GBS) * GBS
    k = len(train_ds.corpora)
    w = train_ds.weights
    counts = np.cumsum(np.eye(k, dtype=np.int64)[corpus], axis=0)
    n = np.arange(1, corpus.size + 1)[:, None]
    err = w[None, :] * n - counts
    assert err.min() > -1 and err.max() < k - 1
    # and the weights are the corpora's shares of the file weights (0.5 web, 0.3 code, 0.2 papers)
    np.testing.assert_allclose(w, [0.3, 0.2, 0.5], atol=0.02)
