"""Straightforward loop versions of Megatron's data algorithms, written from the spec (§5.4-5.5)."""

import math

import numpy as np


def ref_split(split, size):
    parts = [float(s) for s in split.split(",")]
    while len(parts) < 3:
        parts.append(0.0)
    total = sum(parts)
    parts = [p / total for p in parts]
    idx = [0]
    for i, p in enumerate(parts):
        idx.append(idx[i] + int(round(p * float(size))))
    diff = idx[-1] - size
    return [idx[0]] + [v - diff for v in idx[1:]]


def ref_num_epochs(tpe, seq, n):
    e, total = 0, 0
    while True:
        e += 1
        total += tpe
        if (total - 1) // seq >= n:
            return e


def ref_doc_idx(documents, epochs, rng, separate):
    if not separate or epochs == 1:
        d = np.mgrid[0:epochs, 0:len(documents)][1]
        d[:] = documents
        d = d.reshape(-1).astype(np.int32)
        rng.shuffle(d)
        return d
    return np.concatenate((ref_doc_idx(documents, epochs - 1, rng, False),
                           ref_doc_idx(documents, 1, rng, False)))


def ref_sample_idx(sizes, doc_idx, seq, epochs, tpe):
    n = (epochs * tpe - 1) // seq
    out = np.zeros((n + 1, 2), dtype=np.int64)
    s, di, off = 1, 0, 0
    while s <= n:
        remaining = seq + 1
        while remaining != 0:
            length = int(sizes[doc_idx[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                di += 1
                off = 0
        out[s] = (di, off)
        s += 1
    return out


def ref_shuffle_idx(n, total, rng):
    dt = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    a = np.arange(n, dtype=dt)
    rng.shuffle(a)
    if n == total:
        return a
    b = np.arange(n, total, dtype=dt)
    rng.shuffle(b)
    return np.concatenate((a, b))


def ref_index(sizes, documents, num_samples, seq, seed):
    tpe = int(np.sum(sizes[documents]))
    epochs = ref_num_epochs(tpe, seq, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate = False
    if epochs > 1:
        prev = ((epochs - 1) * tpe - 1) // seq
        separate = (num_samples - prev) < int(0.80 * ((tpe - 1) // seq))
    doc_idx = ref_doc_idx(documents, epochs, rng, separate)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq, epochs, tpe)
    total = sample_idx.shape[0] - 1
    n = ((epochs - 1) * tpe - 1) // seq if separate else total
    shuffle_idx = ref_shuffle_idx(n, total, rng)
    return doc_idx, sample_idx, shuffle_idx, epochs, separate


def ref_sample_tokens(docs, doc_idx, shuffle_idx, seq, i):
    """Sample i read from the concatenated token stream of the documents in doc_idx order."""
    j = int(shuffle_idx[i])
    stream = np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in doc_idx])
    return stream[j * seq:(j + 1) * seq + 1]


def ref_greedy(weights, size):
    counts = [0] * len(weights)
    idx, sidx = [], []
    for s in range(size):
        x = max(float(s), 1.0)
        errs = [weights[d] * x - counts[d] for d in range(len(weights))]
        best = 0
        for d in range(1, len(weights)):
            if errs[d] > errs[best]:
                best = d
        idx.append(best)
        sidx.append(counts[best])
        counts[best] += 1
    return np.array(idx), np.array(sidx)


def ref_file_counts(weights, split_samples):
    total = sum(weights)
    return [[int(math.ceil(v * (w / total) * 1.005)) for v in split_samples] for w in weights]
