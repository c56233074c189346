"""Data: Megatron indexed datasets, DATA_FILE_LIST, Megatron-exact samples and blending, grain pipeline."""

from agpt_jax.data.blend import BlendConfig, BlendedDataset, CorpusDataset, build_blended_splits
from agpt_jax.data.file_list import FileListEntry, mix_file_lists, read_file_list
from agpt_jax.data.indexed import DataError, IndexedDataset, IndexedDatasetBuilder, write_indexed_dataset
from agpt_jax.data.samples import GPTDataset

__all__ = [
    "BlendConfig",
    "BlendedDataset",
    "CorpusDataset",
    "DataError",
    "FileListEntry",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "build_blended_splits",
    "mix_file_lists",
    "read_file_list",
    "write_indexed_dataset",
]

from agpt_jax.data.pipeline import BatchIterator, make_batch_iterator, read_iterator_state  # noqa: E402

__all__ += ["BatchIterator", "make_batch_iterator", "read_iterator_state"]
