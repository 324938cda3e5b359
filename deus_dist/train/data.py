"""Training data: load with ``datasets``, tokenize once, pack into ``seq_len`` blocks, order by seed.

Documents are tokenized without special tokens, each followed by EOS, concatenated and cut into
blocks of ``seq_len`` tokens (the remainder is dropped), as in the paper's recipe. The packed
blocks are cached as raw int32 files under a key of (source files, text field, tokenizer, seq_len,
split), built by one process and memory-mapped by all. The held-out split is chosen by document
with a fixed seed, so it does not change with ``--seed``.

Order: epoch ``e`` visits the training blocks in ``permutation(seed + e)``; a run's data position
is the number of blocks consumed so far (``consumed``), which is all a resume needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deus_dist.checkpoint.writer import build_once
from deus_dist.errors import UserError

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".csv": "csv",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SPLIT_SEED = 1234  # fixed: the held-out documents do not move with --seed
EMBEDDED = "embedded:wikipedia"


def _local_files(path: Path, option: str) -> tuple[str, list[Path]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise UserError(f"{option}: {path} holds no {'/'.join(sorted(BUILDERS))} files")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise UserError(f"{option}: {path} is not one of {', '.join(sorted(BUILDERS))}")
    if len(kinds) > 1:
        raise UserError(f"{option}: {path} mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    return kinds.pop(), files


def source_identity(source: str | None, option: str) -> dict:
    """What the cache key depends on: the files' names, sizes and times, or the hub name."""
    if source is None:
        return {"source": EMBEDDED, "split": "train" if option == "--data" else "heldout"}
    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path, option)
        return {
            "source": str(path.resolve()),
            "builder": builder,
            "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    if "/" in source and not source.startswith((".", "/", "~")):
        return {"source": source, "builder": "hub"}
    raise UserError(f"{option}: {source} does not exist")


def open_source(identity: dict, text_field: str, option: str, scratch: Path) -> tuple[int, Iterator[list]]:
    """(number of records, batches of their texts in source order), streamed: a corpus larger than
    memory is never held whole. Local files are converted under ``scratch`` (deleted after
    packing); hub datasets use the user's datasets cache."""
    if identity["source"] == EMBEDDED:
        from deus_dist.embedded import wikipedia_split

        texts = [a["text"] for a in wikipedia_split(identity["split"])]
        return len(texts), iter([texts])
    import datasets

    datasets.disable_progress_bars()
    try:
        if identity["builder"] == "hub":
            ds = datasets.load_dataset(identity["source"], split="train")
        else:
            files = [f[0] for f in identity["files"]]
            # plain text: a paragraph (up to a blank line) is a document, followed by EOS
            extra = {"sample_by": "paragraph"} if identity["builder"] == "text" else {}
            ds = datasets.load_dataset(
                identity["builder"], data_files=files, split="train", cache_dir=str(scratch), **extra
            )
    except Exception as e:  # datasets raises many types for unreadable input
        raise UserError(f"{option}: cannot load {identity['source']}: {type(e).__name__}: {e}") from None
    if text_field not in ds.column_names:
        raise UserError(
            f"--text_field: {identity['source']} has no column {text_field!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    batches = (b[text_field] for b in ds.select_columns([text_field]).iter(batch_size=1000))
    return len(ds), batches


class Packer:
    """Tokenizes documents, appends EOS, concatenates, and writes whole ``seq_len`` blocks (int32)."""

    def __init__(self, path: Path, tokenizer, seq_len: int):
        if tokenizer.eos_token_id is None:
            raise UserError("--model: the tokenizer has no EOS token to separate documents")
        self.file = open(path, "wb")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.carry: list[int] = []
        self.blocks = self.documents = 0

    def add(self, texts: list[str]) -> None:
        if not texts:
            return
        self.documents += len(texts)
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            self.carry.extend(ids)
            self.carry.append(self.tokenizer.eos_token_id)
        whole = len(self.carry) // self.seq_len * self.seq_len
        if whole:
            self.file.write(np.asarray(self.carry[:whole], dtype=np.int32).tobytes())
            self.blocks += whole // self.seq_len
            self.carry = self.carry[whole:]

    def close(self) -> int:
        self.file.close()
        return self.blocks


def _usable(texts) -> list[str]:
    return [t for t in texts if isinstance(t, str) and t.strip()]


def pack_source(
    identity: dict,
    text_field: str,
    option: str,
    scratch: Path,
    train: Packer,
    held: Packer | None,
    eval_fraction: float,
    progress: bool,
) -> None:
    """Stream a source into ``train`` (and, with ``held``, a fixed-seed share of its records into
    ``held``)."""
    from tqdm import tqdm

    total, batches = open_source(identity, text_field, option, scratch)
    chosen = np.zeros(total, dtype=bool)
    if held is not None and total > 1:
        n_eval = max(1, math.ceil(total * eval_fraction))
        chosen[np.random.default_rng(SPLIT_SEED).permutation(total)[:n_eval]] = True
    seen = 0
    with tqdm(total=total, desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for texts in batches:
            mask = chosen[seen : seen + len(texts)]
            train.add(_usable(t for t, m in zip(texts, mask, strict=True) if not m))
            if held is not None:
                held.add(_usable(t for t, m in zip(texts, mask, strict=True) if m))
            seen += len(texts)
            bar.update(len(texts))
    if train.documents + (held.documents if held else 0) == 0:
        raise UserError(f"{option}: {identity['source']} has no non-empty {text_field!r} texts")


@dataclass
class PackedData:
    train: np.ndarray
    """[blocks, seq_len] int32, memory-mapped."""
    eval: np.ndarray
    seed: int

    def __post_init__(self):
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(len(self.train))}
        return self._perms[epoch]

    def blocks(self, position: int, count: int) -> torch.Tensor:
        """``count`` training blocks starting at global position ``position`` of the ordered stream."""
        rows = []
        for p in range(position, position + count):
            epoch, i = divmod(p, len(self.train))
            rows.append(self.train[self._perm(epoch)[i]])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def tokenizer_identity(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


def prepare_data(
    *,
    data: str | None,
    eval_data: str | None,
    eval_fraction: float,
    text_field: str,
    seq_len: int,
    model_dir: Path,
    cache_root: Path,
    seed: int,
    log=print,
    progress: bool = False,
) -> PackedData:
    """Tokenize and pack (once per key), then memory-map. Errors name the option to fix."""
    train_id = source_identity(data, "--data")
    eval_id = source_identity(eval_data, "--eval_data") if eval_data else None
    if data is None and eval_data is None:
        eval_id = source_identity(None, "--eval_data")
    key = {
        "train": train_id,
        "eval": eval_id,
        "eval_fraction": None if eval_id else eval_fraction,
        "text_field": text_field,
        "seq_len": seq_len,
        "tokenizer": tokenizer_identity(model_dir),
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        log(f"tokenizing and packing {train_id['source']} into {seq_len}-token blocks (once)")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        scratch = tmp / "scratch"
        train, held = (
            Packer(tmp / "train.bin", tokenizer, seq_len),
            Packer(tmp / "eval.bin", tokenizer, seq_len),
        )
        try:
            split_here = held if eval_id is None else None
            pack_source(train_id, text_field, "--data", scratch, train, split_here, eval_fraction, progress)
            if eval_id is not None:
                pack_source(eval_id, text_field, "--eval_data", scratch, held, None, 0.0, progress)
        finally:
            n_train, n_eval = train.close(), held.close()
            shutil.rmtree(scratch, ignore_errors=True)
        if n_train == 0:
            raise UserError(f"--data: fewer than --seq_len={seq_len} tokens of text; lower --seq_len")
        if n_eval == 0:
            raise UserError(
                f"--eval_data/--eval_fraction: the held-out text has fewer than --seq_len={seq_len} "
                "tokens; raise --eval_fraction or pass a larger --eval_data"
            )
        meta = {**key, "train_blocks": n_train, "eval_blocks": n_eval, "documents": train.documents}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    folder = build_once(cache_root / digest, build)
    meta = json.loads((folder / "meta.json").read_text())

    def mapped(name: str, blocks: int) -> np.ndarray:
        return np.memmap(folder / name, dtype=np.int32, mode="r", shape=(blocks, seq_len))

    return PackedData(
        mapped("train.bin", meta["train_blocks"]), mapped("eval.bin", meta["eval_blocks"]), seed
    )
