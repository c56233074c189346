"""agpt-jax checkpoints: one package, one metadata schema, one namespace.

    layout   the checkpoint layout (items, metadata schema) and its readers: resolve a directory,
             read the metadata, restore params and Adam (what converters write, what runs save)
    stream   the streaming writer and reader of one PyTree item (the converters' peak-memory path)
    manager  the run's Orbax CheckpointManager: SAVE/checkpoints/<iteration>/, async and atomic
             saves, the newest complete step, damaged steps

Callers use `from agpt_jax import checkpoint` and the names below.
"""

from agpt_jax.checkpoint.layout import (CHECKPOINTS_SUBDIR, FORMAT, FORMAT_VERSION, ITEM_ADAM,
                                        ITEM_METADATA, ITEM_PARAMS, CheckpointError, has_adam,
                                        model_config, read_metadata, resolve_checkpoint_dir,
                                        restore_adam, restore_arrays, restore_params)
from agpt_jax.checkpoint.manager import (ITEM_DATA, ITEM_TRAIN, ITEMS, CheckpointWriteError,
                                         Restored, RunCheckpointer, TrainProgress, read_progress)
from agpt_jax.checkpoint.stream import (PyTreeItemReader, PyTreeItemWriter, leaf_key,
                                        write_metadata_item, write_step_metadata)

__all__ = [
    "CHECKPOINTS_SUBDIR", "FORMAT", "FORMAT_VERSION", "ITEM_ADAM", "ITEM_DATA", "ITEM_METADATA",
    "ITEM_PARAMS", "ITEM_TRAIN", "ITEMS", "CheckpointError", "CheckpointWriteError",
    "PyTreeItemReader", "PyTreeItemWriter", "Restored", "RunCheckpointer", "TrainProgress",
    "has_adam", "leaf_key", "model_config", "read_metadata", "read_progress",
    "resolve_checkpoint_dir", "restore_adam", "restore_arrays", "restore_params",
    "write_metadata_item", "write_step_metadata",
]
