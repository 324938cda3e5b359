"""Lazy checkpoint reader: tensors are read one at a time through the shard index."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from deus_dist.checkpoint.safetensors_format import DTYPES, nbytes, read_header
from deus_dist.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in ``file``."""
    nbytes: int


class CheckpointReader:
    """An HF checkpoint directory (``config.json`` + safetensors, single file or sharded).

    Every shard's header is parsed and checked against the file size when the reader is made, so a
    missing or truncated shard is reported before any work starts. ``option`` names the flag the
    path came from, for error messages.
    """

    def __init__(self, path: str | os.PathLike, option: str = "--model"):
        self.path = Path(path)
        self.option = option
        if not self.path.exists():
            raise CheckpointError(f"{option}: {self.path} does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{option}: {self.path} is not a directory (expected an HF checkpoint)")
        self.config = self._read_json(self.path / "config.json", "config.json")
        self.tensors: dict[str, TensorInfo] = {}
        self._files: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.renamed: dict[str, str] = {}
        """Stored name -> the name the tensors are presented under (``adopt_names``)."""
        self.dropped: list[str] = []
        """Stored tensors left out (``adopt_names``)."""
        for shard, names in self._weight_map().items():
            self._scan_shard(shard, names)

    # -- construction ---------------------------------------------------------------------------

    def _read_json(self, path: Path, what: str) -> dict:
        if not path.is_file():
            raise CheckpointError(f"{self.option}: {self.path} has no {what}; is it an HF checkpoint?")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.option}: cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.option}: {path} is not a JSON object")
        return data

    def _weight_map(self) -> dict[Path, set[str] | None]:
        """Shard file -> names the index says it holds (None: a single file, names from its header)."""
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = self._read_json(index_path, INDEX_NAME)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{self.option}: {index_path} has no weight_map")
            shards: dict[Path, set[str]] = {}
            for name, file in weight_map.items():
                shards.setdefault(self.path / file, set()).add(name)
            return shards
        if (self.path / SINGLE_NAME).is_file():
            return {self.path / SINGLE_NAME: None}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.option}: {self.path} holds PyTorch .bin weights; only safetensors is read. "
                "Convert it first: AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir)"
            )
        raise CheckpointError(f"{self.option}: {self.path} has neither {INDEX_NAME} nor {SINGLE_NAME}")

    def _scan_shard(self, shard: Path, names: set[str] | None) -> None:
        where = f"{self.option}: shard {shard.name} of {self.path}"
        if not shard.is_file():
            raise CheckpointError(f"{where} is listed in {INDEX_NAME} but missing")
        size = shard.stat().st_size
        try:
            with open(shard, "rb") as f:
                header, data_start = read_header(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{where} is corrupt: {e}") from None
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if names is not None and name not in names:
                continue  # the index is the source of truth for which shard holds what
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{where} is corrupt: bad header entry for {name}") from None
            if end - begin != nbytes(shape, dtype):
                raise CheckpointError(f"{where} is corrupt: {name} has {end - begin} bytes for shape {shape}")
            if data_start + end > size:
                raise CheckpointError(
                    f"{where} is truncated: {name} ends at byte {data_start + end}, file has {size}"
                )
            self.tensors[name] = TensorInfo(name, shard, dtype, shape, data_start + begin, end - begin)
        missing = sorted((names or set()) - header.keys())
        if missing:
            raise CheckpointError(f"{where} lacks {len(missing)} tensors the index lists, e.g. {missing[0]}")

    def adopt_names(self, renamed: dict[str, str], dropped) -> None:
        """Present the tensors under the names transformers loads them as: ``renamed`` maps a
        stored name to its loaded name, ``dropped`` are left out (``layout.read_as_loaded``)."""
        dropped = set(dropped)
        self.tensors = {renamed.get(n, n): info for n, info in self.tensors.items() if n not in dropped}
        self.renamed, self.dropped = dict(renamed), sorted(dropped)

    # -- reading --------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into its own buffer (no memory map: only this tensor is resident)."""
        info = self.tensors[name]
        with self._lock:
            f = self._files.get(info.file)
            if f is None:
                f = self._files[info.file] = open(info.file, "rb", buffering=0)
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            # Positional reads share no file offset: threads may read the same shard at once.
            n = os.preadv(f.fileno(), [view[got:]], info.start + got)
            if not n:
                raise CheckpointError(f"{self.option}: shard {info.file.name} ended while reading {name}")
            got += n
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
