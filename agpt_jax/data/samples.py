"""Megatron-exact GPT sample index of one file and split (spec/megatron-deepspeed.md §5.4).

Mirrors `megatron/data/gpt_dataset.py:_build_index_mappings` and the C++ `helpers.build_sample_idx`
of argonne-lcf/Megatron-DeepSpeed, with the sample index computed by vectorised numpy instead of the
C++ loop. One `np.random.RandomState(seed)` per file drives, in this order: the doc_idx shuffle(s),
then the shuffle_idx shuffle(s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np
from absl import logging

from agpt_jax.data.indexed import DataError, IndexedDataset

__all__ = [
    "GPTDataset",
    "SampleIndex",
    "build_doc_idx",
    "build_sample_idx",
    "build_sample_index",
    "build_shuffle_idx",
    "num_epochs_for",
    "split_document_ranges",
]

SPLIT_NAMES = ("train", "valid", "test")
_CACHE_FORMAT = 1


def parse_split(split: str) -> list[float]:
    """Parses `--split` ("969,30,1", "990/10/0" or "1") into 3 normalised fractions.

    Raises:
        DataError: not numbers, negative, or all zero.
    """
    sep = "," if "," in split else ("/" if "/" in split else None)
    parts = split.split(sep) if sep else [split]
    try:
        values = [float(s) for s in parts]
    except ValueError:
        raise DataError(f"--split {split!r}: expected numbers separated by ',' or '/', e.g. 969,30,1") from None
    while len(values) < 3:
        values.append(0.0)
    values = values[:3]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"--split {split!r}: parts must be non-negative with a positive sum")
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(split: str, num_documents: int) -> list[int]:
    """Document boundaries [0, a, b, num_documents] of the train/valid/test splits.

    As `dataset_utils.get_train_valid_test_split_`: Python `round` (half to even) of each fraction
    times the count, accumulated, then every boundary shifted so the last equals the count.
    """
    fractions = parse_split(split)
    bounds = [0]
    for i, frac in enumerate(fractions):
        bounds.append(bounds[i] + int(round(frac * float(num_documents))))
    diff = bounds[-1] - num_documents
    for i in range(1, len(bounds)):
        bounds[i] -= diff
    return bounds


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E >= 1 with (E * tokens_per_epoch - 1) // seq_length >= num_samples (`_num_epochs`)."""
    # (E*T - 1)//S >= n  <=>  E*T - 1 >= n*S  <=>  E >= (n*S + 1)/T.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool
) -> np.ndarray:
    """`documents` tiled `num_epochs` times and shuffled (`_build_doc_idx`).

    Returns:
        int32[num_epochs * len(documents)]. With `separate_last_epoch`, the first E-1 epochs are
        shuffled together, then the last epoch on its own, in that rng order.
    """
    if not separate_last_epoch or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int, tokens_per_epoch: int
) -> np.ndarray:
    """Start of every sample as (position in doc_idx, token offset), vectorised `build_sample_idx`.

    Sample k covers tokens [k*S, (k+1)*S] of the concatenation of the documents in doc_idx order
    (S+1 tokens; consecutive samples share one boundary token). Entry k is the document holding
    token k*S and the offset of that token in it. Entry 0 is (0, 0) as in the C++ loop.

    Args:
        sizes: int32[num_sequences] tokens per sequence of the file.
        doc_idx: int32[E * num_documents] shuffled document order.
        seq_length: S.
        num_epochs: E.
        tokens_per_epoch: tokens of one pass over the split's documents.

    Returns:
        int64[N + 1, 2] with N = (E * tokens_per_epoch - 1) // S.
    """
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)  # exclusive end of every doc in the stream
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # The document holding token p is the first one whose end exceeds p (empty documents never do).
    which = np.searchsorted(doc_ends, positions, side="right")
    starts = doc_ends[which] - sizes[doc_idx[which]].astype(np.int64)
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = which
    out[:, 1] = positions - starts
    out[0] = (0, 0)
    return out


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffled [0, num_samples) followed by a separately shuffled [num_samples, total_size).

    uint32 unless `total_size >= 2**32 - 2` (then int64), as `_build_shuffle_idx`.
    """
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


@dataclasses.dataclass(frozen=True)
class SampleIndex:
    """The three index arrays of one GPTDataset and how they were shaped.

    Attributes:
        doc_idx: int32[E * num_documents] document order.
        sample_idx: int64[N + 1, 2] sample starts (position in doc_idx, offset).
        shuffle_idx: uint32|int64[N] sample order.
        num_epochs: E.
        separate_last_epoch: whether the last epoch was shuffled separately.
        tokens_per_epoch: tokens in one pass over the documents.
    """

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    num_epochs: int
    separate_last_epoch: bool
    tokens_per_epoch: int


def build_sample_index(
    sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> SampleIndex:
    """Builds doc_idx, sample_idx and shuffle_idx exactly as `_build_index_mappings`.

    Args:
        sizes: int32[num_sequences] of the file.
        documents: int32[D] sequence indices of this split (a contiguous range).
        num_samples: samples requested from this file and split.
        seq_length: S.
        seed: Megatron's `--seed` (the same for every file).

    Raises:
        DataError: the split has fewer than 2 tokens (upstream trips an assert in the C++ helper).
    """
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise DataError(
            f"{len(documents)} document(s) with {tokens_per_epoch} token(s) in total; a split needs "
            "at least 2 tokens to form a sample"
        )
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate_last_epoch = False
    n_prev = 0
    if num_epochs > 1:
        n_prev = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - n_prev
        per_epoch = (tokens_per_epoch - 1) // seq_length
        assert 0 <= last_epoch_samples <= per_epoch + 1, (last_epoch_samples, per_epoch)
        separate_last_epoch = last_epoch_samples < int(0.80 * per_epoch)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(n_prev if separate_last_epoch else total, total, rng)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx, num_epochs, separate_last_epoch, tokens_per_epoch)


def _sizes_digest(sizes: np.ndarray, documents: np.ndarray) -> str:
    lo, hi = (int(documents[0]), int(documents[-1]) + 1) if len(documents) else (0, 0)
    return hashlib.sha256(np.ascontiguousarray(sizes[lo:hi]).tobytes()).hexdigest()


def cache_key(parts: dict) -> str:
    """sha256 of a JSON description (sorted keys) of every input that shapes an index."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def save_arrays_atomically(directory: str, key: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
    """Writes `<key>_<name>.npy` for every array, then `<key>.json` last (its presence = complete).

    Each file goes to a temporary name in the same folder first and is renamed into place, so a
    reader never sees a half-written file.
    """
    os.makedirs(directory, exist_ok=True)
    for name, arr in arrays.items():
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, os.path.join(directory, f"{key}_{name}.npy"))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(description, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, f"{key}.json"))


def load_cached_arrays(directory: str, key: str, description: dict, names: tuple[str, ...]) -> dict | None:
    """Loads arrays saved by `save_arrays_atomically` if the stored description matches, else None."""
    desc_path = os.path.join(directory, f"{key}.json")
    try:
        with open(desc_path) as f:
            stored = json.load(f)
        if stored != json.loads(json.dumps(description, sort_keys=True)):
            return None
        return {n: np.load(os.path.join(directory, f"{key}_{n}.npy"), mmap_mode="r") for n in names}
    except (OSError, ValueError):
        return None


def load_or_build_sample_index(
    dataset: IndexedDataset,
    split_name: str,
    documents: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | None,
) -> SampleIndex:
    """`build_sample_index`, cached in `cache_dir` under a hash of all its inputs.

    The key covers the prefix, split name, document range, a digest of the split's sizes, the
    sample count, sequence length and seed, so a changed file or setting never reuses a stale index.
    """
    try:
        if cache_dir is None:
            return build_sample_index(dataset.sizes, documents, num_samples, seq_length, seed)
        description = {
            "kind": "gpt_sample_index",
            "format": _CACHE_FORMAT,
            "prefix": os.path.abspath(dataset.prefix),
            "split": split_name,
            "documents": [int(documents[0]), int(documents[-1]) + 1] if len(documents) else [0, 0],
            "sizes_sha256": _sizes_digest(dataset.sizes, documents),
            "num_samples": int(num_samples),
            "seq_length": int(seq_length),
            "seed": int(seed),
        }
        key = cache_key(description)
        names = ("doc_idx", "sample_idx", "shuffle_idx")
        cached = load_cached_arrays(cache_dir, key, description, names + ("meta",))
        if cached is not None:
            meta = cached["meta"]
            return SampleIndex(cached["doc_idx"], cached["sample_idx"], cached["shuffle_idx"],
                               int(meta[0]), bool(meta[1]), int(meta[2]))
        index = build_sample_index(dataset.sizes, documents, num_samples, seq_length, seed)
        meta = np.array([index.num_epochs, int(index.separate_last_epoch), index.tokens_per_epoch], np.int64)
        save_arrays_atomically(cache_dir, key, description, {
            "doc_idx": index.doc_idx, "sample_idx": index.sample_idx,
            "shuffle_idx": index.shuffle_idx, "meta": meta})
        logging.info("built sample index %s/%s: %d epochs, %d samples", dataset.prefix, split_name,
                     index.num_epochs, index.sample_idx.shape[0] - 1)
        return index
    except DataError as e:
        raise DataError(f"{dataset.prefix} ({split_name} split): {e}") from None


class GPTDataset:
    """Random-access samples of one file and split, as Megatron's `GPTDataset.__getitem__`.

    Attributes:
        dataset: the indexed file.
        split_name: "train", "valid" or "test".
        num_samples: samples requested (the valid indices are `[0, len(self))`, len >= num_samples).
        index: the `SampleIndex`.
    """

    def __init__(self, dataset: IndexedDataset, split_name: str, documents: np.ndarray,
                 num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None):
        self.dataset = dataset
        self.split_name = split_name
        self.documents = documents
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.index = load_or_build_sample_index(dataset, split_name, documents, num_samples,
                                                seq_length, seed, cache_dir)

    def __len__(self) -> int:
        return int(self.index.sample_idx.shape[0] - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i as int64[seq_length + 1] (copy)."""
        j = int(self.index.shuffle_idx[i])
        (d_f, o_f), (d_l, o_l) = self.index.sample_idx[j], self.index.sample_idx[j + 1]
        doc_idx, ds = self.index.doc_idx, self.dataset
        if d_f == d_l:
            return ds.get(int(doc_idx[d_f]), int(o_f), int(o_l - o_f + 1)).astype(np.int64)
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        first = ds.get(int(doc_idx[d_f]), int(o_f))
        out[: first.size] = first
        pos = first.size
        for k in range(int(d_f) + 1, int(d_l)):
            piece = ds.get(int(doc_idx[k]))
            out[pos : pos + piece.size] = piece
            pos += piece.size
        last = ds.get(int(doc_idx[d_l]), 0, int(o_l) + 1)
        out[pos : pos + last.size] = last
        assert pos + last.size == out.size, (pos, last.size, out.size)
        return out
