"""Streaming sharded writer and atomic finalize of an output directory.

The output's names, shapes and dtypes are known before any weight is computed, so the writer lays
out every shard (``model-0000i-of-0000N.safetensors``, each at most ``max_shard_bytes`` unless one
tensor is larger) up front, writes each shard's header first and streams tensors after it: memory
stays at the tensor being written, whatever the shard size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Delete temporary directories that killed runs left beside ``final`` (their pid is gone)."""
    for p in final.parent.glob(f".{final.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, flushed to disk and renamed: a reader
    (or a rerun that takes the file as a sign of finished work) sees the old file or the whole new
    one, never a part. Missing parent folders are made, as for an output directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def fsync_tree(root: Path, select=None) -> None:
    """Flush every file under ``root`` (those ``select(path)`` accepts) and the directories to disk,
    so a rename that publishes ``root`` never points at data still in the page cache: after a
    power loss or node crash the renamed directory is complete or absent."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if select is None or select(path):
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is swapped out first and restored if the
    second rename fails, so the old output is never lost. The parent directory is synced after."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_path(final.parent)


@contextlib.contextmanager
def atomic_output_dir(final: Path, force: bool, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``.

    On any exception (Ctrl-C included) the temporary directory is removed. A process killed
    outright leaves only a hidden ``.NAME.partial-PID-XXXX`` directory, never ``final``; the next
    run beside it removes it. An existing ``final`` is refused unless ``force``.
    """
    final = Path(final).absolute()
    if final.exists() and not force:
        raise UserError(f"{option}: {final} already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"{option}: no space left on the device holding {final.parent}; "
                "nothing was written. Free space or choose another --out"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(final: Path, build) -> Path:
    """Make ``final`` (a directory) by ``build(tmp)`` into a temporary sibling, renamed when done.

    An existing ``final`` is returned as is: caches (the embedded model, tokenized data) are built
    by the first process that needs them; a concurrent or interrupted build never leaves a
    half-made ``final``.
    """
    final = Path(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        fsync_tree(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():  # lost a race with another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
