"""Corpus-level blending of a DATA_FILE_LIST, exactly as the ALCF Megatron-DeepSpeed fork does it.

spec/megatron-deepspeed.md §5.5 and §8; upstream `megatron/data/gpt_dataset.py:
build_train_valid_test_datasets` (DatasetBuilder, BuildCorpusDataset), `dataset_utils.py:
get_datasets_weights_and_num_samples`, `blendable_dataset.py` and `helpers.cpp:
build_blending_indices / build_concat_indices`.

1. File weights are normalised; file i gets `ceil(N_split * w_i * 1.005)` samples per split.
2. Files are grouped by corpus; corpora are taken in sorted name order, files in list order.
3. Within a corpus the files are concatenated (default) or greedily blended with weights
   `n_i / n_c` (`--blend-sample-in-corpus`), then optionally shuffled with a fresh
   `RandomState(seed)` (`--shuffle-sample-in-corpus`).
4. Corpora are greedily blended with weights `n_c / train_num_samples`, renormalised.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
from absl import logging

from agpt_jax.data.file_list import FileListEntry
from agpt_jax.data.indexed import DataError, IndexedDataset
from agpt_jax.data.samples import (
    SPLIT_NAMES,
    GPTDataset,
    cache_key,
    load_cached_arrays,
    parse_split,
    save_arrays_atomically,
    split_document_ranges,
)

__all__ = [
    "BlendConfig",
    "BlendedDataset",
    "CorpusDataset",
    "build_blended_splits",
    "build_blending_indices",
    "file_num_samples",
    "split_num_samples",
]


@dataclasses.dataclass(frozen=True)
class BlendConfig:
    """The Megatron flags that shape the blended datasets, with Megatron's defaults.

    Attributes:
        seq_length: `--seq-length` (S; samples hold S+1 tokens).
        global_batch_size: `--global-batch-size`.
        train_iters: `--train-iters`.
        eval_interval: `--eval-interval` (Megatron default 1000).
        eval_iters: `--eval-iters` (default 100).
        seed: `--seed` (default 1234).
        split: `--split`; Megatron's default "969, 30, 1" (arguments.py); AuroraGPT passes 990,10,0.
        shuffle_sample_in_corpus: `--shuffle-sample-in-corpus`.
        blend_sample_in_corpus: `--blend-sample-in-corpus`.
        cache_dir: where index arrays are cached (Megatron's `--data-cache-path`); None: no cache.
    """

    seq_length: int
    global_batch_size: int
    train_iters: int
    eval_interval: int = 1000
    eval_iters: int = 100
    seed: int = 1234
    split: str = "969, 30, 1"
    shuffle_sample_in_corpus: bool = False
    blend_sample_in_corpus: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("seq_length", "global_batch_size", "train_iters", "eval_interval"):
            if getattr(self, name) <= 0:
                raise DataError(f"BlendConfig.{name} = {getattr(self, name)} must be positive")
        if self.seq_length < 2:
            raise DataError(f"BlendConfig.seq_length = {self.seq_length} must be at least 2")
        if self.eval_iters < 0:
            raise DataError(f"BlendConfig.eval_iters = {self.eval_iters} must be >= 0")
        parse_split(self.split)


def split_num_samples(cfg: BlendConfig) -> tuple[int, int, int]:
    """(train, valid, test) sample targets as `megatron/training.py:build_train_valid_test_datasets`."""
    train = cfg.train_iters * cfg.global_batch_size
    valid = (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * cfg.global_batch_size
    test = cfg.eval_iters * cfg.global_batch_size
    return train, valid, test


def file_num_samples(weights: list[float], split_samples: tuple[int, int, int]) -> tuple[list[float], list[list[int]]]:
    """Normalised file weights and per-file [train, valid, test] sample counts.

    As `get_datasets_weights_and_num_samples`: a running Python sum normalises the weights; each
    count is `int(math.ceil(val * weight * 1.005))` in that order of operations.
    """
    weight_sum = 0.0
    for w in weights:
        weight_sum += w
    norm = [w / weight_sum for w in weights]
    counts = [[int(math.ceil(val * w * 1.005)) for val in split_samples] for w in norm]
    return norm, counts


def _greedy_loop(weights: list[float], size: int) -> np.ndarray:
    """The exact loop of `helpers.cpp:build_blending_indices` on Python floats (IEEE doubles)."""
    k = len(weights)
    out = np.empty(size, dtype=np.int64)
    if k == 1:
        out[:] = 0
        return out
    counts = [0] * k
    chosen = [0] * size
    rng_k = range(1, k)
    w0 = weights[0]
    for s in range(size):
        x = float(s) if s > 1 else 1.0
        best, best_err = 0, w0 * x - counts[0]
        for d in rng_k:
            err = weights[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        chosen[s] = best
        counts[best] += 1
    out[:] = chosen
    return out


def _sample_index_of(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """For every position, how many earlier positions chose the same dataset (vectorised)."""
    order = np.argsort(dataset_index, kind="stable")
    counts = np.bincount(dataset_index, minlength=num_datasets)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sample_index = np.empty_like(dataset_index)
    sample_index[order] = np.arange(dataset_index.size, dtype=np.int64) - np.repeat(starts, counts)
    return sample_index


def build_blending_indices(
    weights: np.ndarray | list[float], size: int, cache_dir: str | None = None, cache_tag: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: at step s pick the first d maximising `w_d * max(s, 1) - count_d`.

    Args:
        weights: float64[K] blending weights (used as given; callers normalise as Megatron does).
        size: number of blended samples.
        cache_dir: cache the result there under a key of (weights bit patterns, size).
        cache_tag: free text stored with the cache entry (for humans).

    Returns:
        dataset_index int64[size] and dataset_sample_index int64[size].
    """
    w = [float(x) for x in np.asarray(weights, dtype=np.float64)]
    description = {"kind": "blending_indices", "format": 1, "weights": [x.hex() for x in w],
                   "size": int(size), "tag": cache_tag}
    if cache_dir is not None:
        key = cache_key(description)
        cached = load_cached_arrays(cache_dir, key, description, ("index", "sample_index"))
        if cached is not None:
            return cached["index"], cached["sample_index"]
    index = _greedy_loop(w, int(size))
    sample_index = _sample_index_of(index, len(w))
    if cache_dir is not None:
        save_arrays_atomically(cache_dir, key, description, {"index": index, "sample_index": sample_index})
    return index, sample_index


class CorpusDataset:
    """The samples of one corpus in one split (`BuildCorpusDataset`).

    Attributes:
        name: corpus name.
        files: per-file `GPTDataset`s in list order.
        file_num_samples: int64[F] samples taken from every file.
        dataset_index, dataset_sample_index: int64[n_c] file and sample of every corpus sample.
        shuffle_index: int64[n_c] corpus sample order (identity unless shuffled).
    """

    def __init__(self, name: str, files: list[GPTDataset], file_num_samples: list[int],
                 blend: bool, shuffle: bool, seed: int, cache_dir: str | None):
        self.name = name
        self.files = files
        self.file_num_samples = np.asarray(file_num_samples, dtype=np.int64)
        self.num_samples = int(self.file_num_samples.sum())
        if blend:
            # helpers.build_blending_indices with weights num_samples_list / num_samples (not renormalised).
            weights = self.file_num_samples / self.num_samples
            tag = f"corpus {name}: " + ",".join(f.dataset.prefix for f in files)
            self.dataset_index, self.dataset_sample_index = build_blending_indices(
                weights, self.num_samples, cache_dir, tag)
        else:
            # helpers.build_concat_indices: file 0 samples 0..n0-1, then file 1, ...
            self.dataset_index = np.repeat(np.arange(len(files), dtype=np.int64), self.file_num_samples)
            starts = np.concatenate(([0], np.cumsum(self.file_num_samples)[:-1]))
            self.dataset_sample_index = (np.arange(self.num_samples, dtype=np.int64)
                                         - np.repeat(starts, self.file_num_samples))
        self.shuffle_index = np.arange(self.num_samples)
        if shuffle:
            np.random.RandomState(seed=seed).shuffle(self.shuffle_index)
        over = np.bincount(self.dataset_index, minlength=len(files)) > self.file_num_samples
        if over.any():
            raise DataError(f"corpus {name}: in-corpus blending drew more samples from a file than it has")

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, k: int) -> tuple[int, int]:
        """(file position in `files`, sample index in that file) of corpus sample k."""
        j = self.shuffle_index[k]
        return int(self.dataset_index[j]), int(self.dataset_sample_index[j])

    def __getitem__(self, k: int) -> np.ndarray:
        f, j = self.locate(k)
        return self.files[f][j]


class BlendedDataset:
    """A blended split: random access to int64[seq_length+1] samples and their corpus.

    Attributes:
        split_name: "train", "valid" or "test".
        corpora: corpus names in sorted order; `corpus_id` indexes this list.
        corpus_datasets: one `CorpusDataset` per corpus.
        weights: float64[C] normalised corpus weights given to the greedy blend.
        dataset_index, dataset_sample_index: int64[size] corpus and corpus sample of every sample.
        seq_length: S.
    """

    def __init__(self, split_name: str, corpus_datasets: list[CorpusDataset], weights: np.ndarray,
                 size: int, seq_length: int, cache_dir: str | None):
        self.split_name = split_name
        self.corpus_datasets = corpus_datasets
        self.corpora = [c.name for c in corpus_datasets]
        self.weights = weights
        self.size = int(size)
        self.seq_length = int(seq_length)
        tag = f"{split_name} blend of " + ",".join(self.corpora)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size, cache_dir, tag)
        used = np.bincount(self.dataset_index, minlength=len(corpus_datasets))
        for c, n in zip(corpus_datasets, used):
            if n > len(c):
                raise DataError(f"{split_name} blend draws {n} samples from corpus {c.name} which has {len(c)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """(tokens int64[seq_length+1], corpus id) of blended sample i."""
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} outside the {self.split_name} blend of {self.size} samples")
        c = int(self.dataset_index[i])
        return self.corpus_datasets[c][int(self.dataset_sample_index[i])], c

    def corpus_ids(self, start: int, stop: int) -> np.ndarray:
        """int64[stop-start] corpus id of blended samples [start, stop)."""
        return np.asarray(self.dataset_index[start:stop])


def _split_exists(split: str) -> list[bool]:
    return [f > 0 for f in parse_split(split)]


def build_blended_splits(entries: list[FileListEntry], cfg: BlendConfig) -> dict[str, BlendedDataset]:
    """Builds the train/valid/test blends of a DATA_FILE_LIST as Megatron-DeepSpeed (ALCF) does.

    Args:
        entries: the parsed list (`read_file_list`).
        cfg: the Megatron flags.

    Returns:
        {"train": ..., "valid": ..., "test": ...} for every split whose `--split` part is positive
        and whose sample target is positive.

    Raises:
        DataError: a file has no documents (or fewer than 2 tokens) in a split that is built.
    """
    if not entries:
        raise DataError("build_blended_splits: the DATA_FILE_LIST has no entries")
    split_samples = split_num_samples(cfg)
    weights, counts = file_num_samples([e.weight for e in entries], split_samples)
    del weights
    corpora = sorted({e.corpus for e in entries})
    train_total = sum(c[0] for c in counts)
    opened: dict[str, IndexedDataset] = {}
    for e in entries:
        if e.prefix not in opened:
            try:
                opened[e.prefix] = IndexedDataset(e.prefix)
            except DataError as err:
                raise DataError(f"DATA_FILE_LIST line {e.line}: {err}") from None
    exists = _split_exists(cfg.split)
    out: dict[str, BlendedDataset] = {}
    for s, split_name in enumerate(SPLIT_NAMES):
        split_total = sum(c[s] for c in counts)
        if not exists[s] or split_total == 0:
            continue
        files_by_corpus: dict[str, list[GPTDataset]] = collections.defaultdict(list)
        counts_by_corpus: dict[str, list[int]] = collections.defaultdict(list)
        for e, c in zip(entries, counts):
            ds = opened[e.prefix]
            bounds = split_document_ranges(cfg.split, len(ds))
            lo, hi = bounds[s], bounds[s + 1]
            if hi <= lo:
                raise DataError(
                    f"DATA_FILE_LIST line {e.line}: {e.prefix} has {len(ds)} documents, which gives 0 "
                    f"documents to the {split_name} split under --split {cfg.split!r}; Megatron would "
                    f"fail reading it. Use a larger file, merge it with another, or a split with 0 for {split_name}"
                )
            documents = np.arange(lo, hi, dtype=np.int32)
            try:
                gpt = GPTDataset(ds, split_name, documents, c[s], cfg.seq_length, cfg.seed, cfg.cache_dir)
            except DataError as err:
                raise DataError(f"DATA_FILE_LIST line {e.line}: {err}") from None
            files_by_corpus[e.corpus].append(gpt)
            counts_by_corpus[e.corpus].append(c[s])
        corpus_datasets = [
            CorpusDataset(name, files_by_corpus[name], counts_by_corpus[name], cfg.blend_sample_in_corpus,
                          cfg.shuffle_sample_in_corpus, cfg.seed, cfg.cache_dir)
            for name in corpora
        ]
        # corpus_weights_achieved = n_c / train_num_samples (also for valid/test), then
        # BlendableDataset normalises in float64.
        raw = np.array([float(len(c)) / train_total for c in corpus_datasets], dtype=np.float64)
        blend_weights = raw / np.sum(raw)
        out[split_name] = BlendedDataset(split_name, corpus_datasets, blend_weights, split_total,
                                         cfg.seq_length, cfg.cache_dir)
        logging.info("%s blend: %d samples over corpora %s", split_name, split_total, corpora)
    return out
