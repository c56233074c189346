"""Megatron's memory-mapped indexed dataset (MMIDIDX): reader and writer.

The layout follows `megatron/data/indexed_dataset.py` (spec/megatron-deepspeed.md §5.3). The `.idx`
file is little-endian:

    offset 0   magic b"MMIDIDX\\x00\\x00" (9 bytes)
    offset 9   <Q version (1)
    offset 17  <B dtype code
    offset 18  <Q number of sequences (len)
    offset 26  <Q number of doc_idx entries (doc_count)
    offset 34  int32[len] sizes, int64[len] pointers (byte offsets into `.bin`), int64[doc_count] doc_idx

The `.bin` file is the raw concatenation of the token arrays. Reads are zero-copy views of a memory map.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

__all__ = [
    "DTYPES",
    "DataError",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "best_fitting_dtype",
    "data_file_path",
    "dtype_code",
    "index_file_path",
    "write_indexed_dataset",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # 9 magic + 8 version + 1 dtype + 8 len + 8 doc_count

# Megatron's dtype codes (indexed_dataset.py: `dtypes`).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}


class DataError(ValueError):
    """Bad data input: the message names the file, the field and the fix."""


def index_file_path(prefix: str) -> str:
    """Returns the `.idx` path of a dataset prefix."""
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    """Returns the `.bin` path of a dataset prefix."""
    return prefix + ".bin"


def dtype_code(dtype: np.dtype | type) -> int:
    """Returns Megatron's dtype code for a numpy dtype.

    Raises:
        DataError: the dtype has no MMIDIDX code.
    """
    dt = np.dtype(dtype)
    for code, candidate in DTYPES.items():
        if candidate == dt:
            return code
    raise DataError(
        f"dtype {dt} has no MMIDIDX code; use one of {sorted(str(d) for d in DTYPES.values())}"
    )


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron's builder picks: uint16 if `vocab_size < 65500`, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Header:
    dtype: np.dtype
    length: int
    doc_count: int


def _read_header(idx_path: str, file_size: int) -> _Header:
    """Reads and validates the fixed-size header of an `.idx` file."""
    if file_size < HEADER_BYTES:
        raise DataError(
            f"{idx_path}: file is {file_size} bytes, shorter than the {HEADER_BYTES}-byte MMIDIDX "
            "header; the file is truncated or not a Megatron index, rebuild it with preprocess_data.py"
        )
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    magic = raw[:9]
    if magic != MAGIC:
        raise DataError(
            f"{idx_path}: magic is {magic!r}, expected {MAGIC!r}; this is not an MMIDIDX (mmap) index "
            "(the old 'lazy'/'cached' formats are not supported), re-tokenize with preprocess_data.py"
        )
    (version,) = struct.unpack("<Q", raw[9:17])
    if version != VERSION:
        raise DataError(f"{idx_path}: version is {version}, only version {VERSION} is supported")
    (code,) = struct.unpack("<B", raw[17:18])
    if code not in DTYPES:
        raise DataError(
            f"{idx_path}: dtype code is {code}, expected one of {sorted(DTYPES)} "
            "(1 uint8 .. 8 uint16); the index is corrupt"
        )
    length, doc_count = struct.unpack("<QQ", raw[18:34])
    expected = HEADER_BYTES + 4 * length + 8 * length + 8 * doc_count
    if file_size != expected:
        raise DataError(
            f"{idx_path}: file is {file_size} bytes but its header (len={length}, "
            f"doc_count={doc_count}) implies {expected}; the index is truncated or corrupt"
        )
    return _Header(DTYPES[code], int(length), int(doc_count))


class IndexedDataset:
    """Read-only, memory-mapped view of one Megatron `.bin/.idx` pair.

    Attributes:
        prefix: path without the `.bin`/`.idx` suffix.
        dtype: token dtype of the `.bin` file.
        sizes: int32[len] tokens per sequence (zero-copy view of the index).
        pointers: int64[len] byte offset of every sequence in `.bin`.
        doc_idx: int64[doc_count] sequence index where every document starts (plus the end).
    """

    def __init__(self, prefix: str, *, validate: bool = True):
        """Opens `prefix.idx` and `prefix.bin`.

        Args:
            prefix: dataset path prefix.
            validate: check that sizes, pointers and doc_idx agree and fit in `.bin` (vectorised,
                a few milliseconds per million sequences).

        Raises:
            DataError: a file is missing, or the index is malformed or inconsistent with `.bin`.
        """
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"dataset prefix {prefix!r}: missing {', '.join(missing)}; a Megatron dataset needs "
                "both .bin and .idx (give the prefix without suffix)"
            )
        idx_size = os.path.getsize(idx_path)
        header = _read_header(idx_path, idx_size)
        self.dtype: np.dtype = header.dtype
        self._idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = memoryview(self._idx_map)
        n, d = header.length, header.doc_count
        self.sizes: np.ndarray = np.frombuffer(buf, dtype=np.int32, count=n, offset=HEADER_BYTES)
        self.pointers: np.ndarray = np.frombuffer(
            buf, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n
        )
        self.doc_idx: np.ndarray = np.frombuffer(
            buf, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * n
        )
        bin_size = os.path.getsize(bin_path)
        if bin_size % self.dtype.itemsize:
            raise DataError(
                f"{bin_path}: size {bin_size} bytes is not a multiple of the {self.dtype} item size "
                f"{self.dtype.itemsize} given in {idx_path}; the .bin is truncated or mismatched"
            )
        # np.memmap cannot map an empty file; an empty dataset simply has no tokens.
        if bin_size:
            self._bin_map = np.memmap(bin_path, mode="r", dtype=self.dtype)
        else:
            self._bin_map = np.zeros(0, dtype=self.dtype)
        if validate:
            self._validate(idx_path, bin_path, bin_size)

    def _validate(self, idx_path: str, bin_path: str, bin_size: int) -> None:
        sizes = self.sizes.astype(np.int64)
        if sizes.size and sizes.min() < 0:
            bad = int(np.argmax(sizes < 0))
            raise DataError(f"{idx_path}: sizes[{bad}] = {sizes[bad]} is negative; the index is corrupt")
        # The builder writes pointers as the exclusive cumsum of sizes * itemsize
        # (indexed_dataset.py: get_pointers_with_total).
        expected = np.zeros_like(sizes)
        if sizes.size:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=expected[1:])
        if not np.array_equal(expected, self.pointers):
            bad = int(np.argmax(expected != self.pointers))
            raise DataError(
                f"{idx_path}: pointers[{bad}] = {self.pointers[bad]} but the sizes imply {expected[bad]}; "
                "sizes and pointers are inconsistent, rebuild the index"
            )
        end = int(expected[-1] + sizes[-1] * self.dtype.itemsize) if sizes.size else 0
        if bin_size < end:
            raise DataError(
                f"{bin_path}: {bin_size} bytes but {idx_path} says {end} bytes "
                f"({end // self.dtype.itemsize} {self.dtype} tokens); the .bin is truncated, re-tokenize it"
            )
        if bin_size > end:
            # Megatron-DeepSpeed's preprocess_data.py appends EOD without counting it in sizes
            # (spec §8); Megatron follows the index as written, so do we.
            logging.warning(
                "%s: %d bytes beyond what %s indexes (%d); reading the index as written",
                bin_path, bin_size - end, idx_path, end,
            )
        doc_idx = self.doc_idx
        if doc_idx.size:
            if doc_idx[0] != 0 or np.any(np.diff(doc_idx) < 0) or doc_idx[-1] > sizes.size:
                raise DataError(
                    f"{idx_path}: doc_idx must start at 0, never decrease and end at most at len(sizes)"
                    f"={sizes.size}; got first={doc_idx[0]}, last={doc_idx[-1]}; the index is corrupt"
                )

    def __len__(self) -> int:
        """Number of sequences (Megatron's GPTDataset treats each one as a document)."""
        return int(self.sizes.shape[0])

    @property
    def num_tokens(self) -> int:
        """Total tokens the index covers."""
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Zero-copy view of `length` tokens of sequence `i` from `offset` (as Megatron's `get`).

        Args:
            i: sequence index.
            offset: first token within the sequence.
            length: number of tokens; default: to the end of the sequence.

        Returns:
            [length] array of `self.dtype` (read-only view of the memory map).
        """
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin_map[start : start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence `i` as a zero-copy view."""
        return self.get(i)


class IndexedDatasetBuilder:
    """Writes a `.bin/.idx` pair byte-identical to Megatron's `MMapIndexedDatasetBuilder`.

    Usage: `add_item` per sequence and `end_document` after each document, or `add_document`
    for both at once; then `finalize(idx_path)`.
    """

    def __init__(self, bin_path: str, dtype: np.dtype | type = np.int64):
        self._bin_path = bin_path
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # fail early on an unsupported dtype
        self._file = open(bin_path, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Appends one sequence of tokens."""
        arr = np.asarray(tokens, dtype=self._dtype)
        self._file.write(arr.tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        """Marks the end of a document in doc_idx."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int]) -> None:
        """Appends a document's tokens with its sequence lengths (Megatron's `add_doc`).

        The lengths are written as given; agpt-jax's preprocessing passes lengths that count every
        token written (unlike the fork's, which leaves the EOD out, spec §8).
        """
        arr = np.asarray(tokens, dtype=self._dtype)
        self._file.write(arr.tobytes(order="C"))
        self._sizes.extend(int(n) for n in lengths)
        self._doc_idx.append(len(self._sizes))

    def finalize(self, idx_path: str) -> None:
        """Closes `.bin` and writes the `.idx` file."""
        self._file.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        if sizes.size and (sizes.max() > np.iinfo(np.int32).max or sizes.min() < 0):
            raise DataError(f"{idx_path}: a sequence length does not fit the int32 sizes field")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size:
            np.cumsum(sizes[:-1] * self._dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", dtype_code(self._dtype)))
            f.write(struct.pack("<Q", sizes.size))
            f.write(struct.pack("<Q", len(self._doc_idx)))
            f.write(sizes.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self._doc_idx, dtype=np.int64).tobytes(order="C"))


def write_indexed_dataset(
    prefix: str, documents: Iterable[Sequence[int] | np.ndarray], dtype: np.dtype | type
) -> None:
    """Writes `prefix.bin/.idx` with one sequence per document.

    Args:
        prefix: output path without suffix.
        documents: token arrays, one per document.
        dtype: token dtype (see `best_fitting_dtype`).
    """
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype)
    for doc in documents:
        arr = np.asarray(doc, dtype=builder.dtype)
        builder.add_document(arr, [arr.size])
    builder.finalize(index_file_path(prefix))
