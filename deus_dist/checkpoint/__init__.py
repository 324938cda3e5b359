"""Checkpoint IO: lazy reading through the shard index, streaming sharded writing, atomic finalize."""

from deus_dist.checkpoint.reader import CheckpointReader, TensorInfo
from deus_dist.checkpoint.writer import ShardedWriter, TensorSpec, atomic_output_dir, copy_aux_files

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_output_dir",
    "copy_aux_files",
]
