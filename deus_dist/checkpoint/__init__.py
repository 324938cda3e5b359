"""Checkpoint IO: lazy reading through the shard index, streaming sharded writing."""

from deus_dist.checkpoint.reader import CheckpointReader, TensorInfo
from deus_dist.checkpoint.writer import ShardedWriter, TensorSpec, copy_aux_files

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "copy_aux_files",
]
