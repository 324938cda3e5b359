"""Streaming sharded writer: shards laid out up front, each header first, tensors streamed after it.

The output's names, shapes and dtypes are known before any weight is computed, so the writer lays
out every shard (``model-0000i-of-0000N.safetensors``, each at most ``max_shard_bytes`` unless one
tensor is larger) up front, writes each shard's header first and streams tensors after it: memory
stays at the tensor being written, whatever the shard size.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from deus_dist.checkpoint.reader import INDEX_NAME
from deus_dist.checkpoint.safetensors_format import NAMES, encode_header, nbytes
from deus_dist.errors import UserError

AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
AUX_DIRS = ("additional_chat_templates",)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def parse_size(text: str, option: str = "--out_shard_size") -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"``, ``"1024"`` (bytes) also accepted."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"{option}: cannot read size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise UserError(f"{option}: size must be positive, got {text!r}")
    return int(value)


class ShardedWriter:
    """Writes tensors, in the order of ``specs``, into size-capped safetensors shards + index."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.specs = specs
        self.shards: list[list[TensorSpec]] = []
        size = 0
        for spec in specs:
            if not self.shards or (size + spec.nbytes > max_shard_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(spec)
            size += spec.nbytes
        n = len(self.shards)
        self.shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into specs
        self._shard = -1
        self._file = None
        self._left_in_shard = 0

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def _open_next_shard(self) -> None:
        self._shard += 1
        entries, offset = {}, 0
        for spec in self.shards[self._shard]:
            entries[spec.name] = {
                "dtype": NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        self._file = open(self.out_dir / self.shard_names[self._shard], "wb")
        self._file.write(encode_header(entries, {"format": "pt"}))
        self._left_in_shard = len(self.shards[self._shard])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"writer expected {spec.name} next, got {name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._left_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"writer got {self._next} of {len(self.specs)} tensors")
        weight_map = {spec.name: self.shard_names[i] for i, shard in enumerate(self.shards) for spec in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, generation config and chat templates; returns the names copied."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for name in AUX_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
            copied.append(name)
    return copied
