"""Training data: load with ``datasets``, tokenize once, pack into ``seq_len`` blocks, order by seed.

Documents are tokenized without special tokens (``datasets.map`` with ``num_proc`` worker
processes), each followed by EOS, concatenated and cut into blocks of ``seq_len`` tokens (the
remainder is dropped), as in the paper's recipe. The packed blocks are cached as raw int32 files
under a key of (source content, text field, tokenizer, seq_len, held-out split), built by one
process per filesystem and memory-mapped by all. The key holds each file's name relative to the
source, its size and a digest of samples of its bytes, never its absolute path or time: a corpus
copied to another scratch path has the same key, so its cache is reused and a run resumes on it.
The held-out split is chosen by document with a fixed seed, so it does not change with ``--seed``.

Order: epoch ``e`` visits the training blocks in ``permutation(seed + e)``; a run's data position
is the number of blocks consumed so far (``consumed``), which is all a resume needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deus_dist.atomic import build_once
from deus_dist.data_sources import Source, open_dataset, source_identity
from deus_dist.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SPLIT_SEED = 1234  # fixed: the held-out documents do not move with --seed
FORMAT = 2
AUTO_PROC_RECORDS = 20_000
"""Sources with fewer records are tokenized in this process: starting workers costs more."""


class Packer:
    """Appends documents (token ids, each followed by EOS) and writes whole ``seq_len`` blocks (int32)."""

    def __init__(self, path: Path, seq_len: int, eos: int):
        self.file = open(path, "wb")
        self.seq_len, self.eos = seq_len, eos
        self.carry = np.zeros(0, dtype=np.int32)
        self.blocks = self.documents = self.tokens = 0

    def add(self, values: np.ndarray, offsets: np.ndarray, select: np.ndarray) -> None:
        """Documents ``values[offsets[i]:offsets[i+1]]`` for every i where ``select[i]``."""
        lengths = np.diff(offsets)[select]
        if not len(lengths):
            return
        starts = offsets[:-1][select]
        # gather the chosen documents' tokens, then put EOS after each
        index = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        tokens = values[index + np.arange(lengths.sum())]
        tokens = np.insert(tokens, np.cumsum(lengths), self.eos).astype(np.int32)
        self.documents += len(lengths)
        self.tokens += len(tokens)
        stream = np.concatenate((self.carry, tokens))
        whole = len(stream) // self.seq_len * self.seq_len
        if whole:
            self.file.write(stream[:whole].tobytes())
            self.blocks += whole // self.seq_len
        self.carry = stream[whole:]

    def close(self) -> int:
        self.file.close()
        return self.blocks


def _num_proc(requested: int | None, records: int) -> int:
    if requested is not None:
        return max(1, requested)
    return 1 if records < AUTO_PROC_RECORDS else max(1, min(8, os.cpu_count() or 1))


def pack_source(
    src: Source,
    text_field: str,
    option: str,
    scratch: Path,
    tokenizer,
    train: Packer,
    held: Packer | None,
    eval_fraction: float,
    num_proc: int | None,
    progress: bool,
) -> None:
    """Tokenize ``src`` and stream it into ``train`` (and, with ``held``, a fixed-seed share of its
    records into ``held``). Empty and non-string texts are skipped."""
    import datasets
    from tqdm import tqdm

    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    ds = open_dataset(src, text_field, option, scratch).select_columns([text_field])
    total = len(ds)
    chosen = np.zeros(total, dtype=bool)
    if held is not None and total > 1:
        n_eval = max(1, math.ceil(total * eval_fraction))
        chosen[np.random.default_rng(SPLIT_SEED).permutation(total)[:n_eval]] = True

    def tokenize(batch, indices):
        texts = batch[text_field]
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        ids = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
        return {"ids": ids, "held": [bool(chosen[indices[i]]) for i in keep]}

    procs = _num_proc(num_proc, total)
    try:
        tokenized = ds.map(
            tokenize,
            batched=True,
            batch_size=1000,
            with_indices=True,
            num_proc=procs if procs > 1 else None,
            remove_columns=[text_field],
            features=datasets.Features(
                {"ids": datasets.Sequence(datasets.Value("int32")), "held": datasets.Value("bool")}
            ),
            desc="tokenizing",
            load_from_cache_file=False,
        )
    finally:
        datasets.disable_progress_bars()
    with tqdm(total=len(tokenized), desc="packing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for table in tokenized.with_format("arrow").iter(batch_size=10_000):
            ids = table.column("ids").combine_chunks()
            offsets = np.asarray(ids.offsets, dtype=np.int64)
            values = np.asarray(ids.flatten(), dtype=np.int32)
            offsets = offsets - offsets[0]
            is_held = np.asarray(table.column("held"), dtype=bool)
            train.add(values, offsets, ~is_held)
            if held is not None:
                held.add(values, offsets, is_held)
            bar.update(len(is_held))
    if len(tokenized) == 0:
        raise UserError(f"{option}: {src.label} has no non-empty {text_field!r} texts")


IGNORE = -100
"""Label of a token that is not a target (transformers' ignore index)."""


@dataclass
class Split:
    """Memory-mapped training rows of one split: ``ids`` [rows, seq_len] and, for instruction data,
    which tokens are targets and where each packed conversation starts."""

    ids: np.ndarray
    labels: np.ndarray | None = None
    """Targets (IGNORE where not trained on); None: every token is one (continual pre-training)."""
    positions: np.ndarray | None = None
    """Position ids restarting at every packed conversation (no attention across them); None: one
    document or one padded conversation per row."""
    lengths: np.ndarray | None = None
    """Real tokens per row of unpacked, padded rows (batches are cut to their longest row and
    padding is masked); None: rows are full."""
    counts: np.ndarray | None = None
    """Targets per row (labels shifted by one, as the loss sees them)."""

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self, rows) -> int:
        """How many tokens the loss counts in ``rows``."""
        if self.counts is None:
            return len(rows) * (self.ids.shape[1] - 1)
        return int(self.counts[np.asarray(rows)].sum())

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows``: input_ids, labels, and position_ids or attention_mask."""
        rows = np.asarray(rows)
        width = self.ids.shape[1] if self.lengths is None else int(self.lengths[rows].max())

        def take(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a[rows][:, :width]).astype(np.int64))

        ids = take(self.ids)
        out = {"input_ids": ids, "labels": take(self.labels) if self.labels is not None else ids}
        if self.positions is not None:
            out["position_ids"] = take(self.positions)
        if self.lengths is not None:
            real = torch.from_numpy(np.asarray(self.lengths[rows]).astype(np.int64))
            out["attention_mask"] = (torch.arange(width)[None] < real[:, None]).long()
        return out


@dataclass
class PackedData:
    """The training and held-out rows of a run, and the seeded order the training rows are read in."""

    train: Split
    eval: Split
    seed: int
    key: dict
    """The cache key: what the training stream is made of (compared on resume)."""

    def __post_init__(self):
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(len(self.train))}
        return self._perms[epoch]

    def rows(self, position: int, count: int) -> list[int]:
        """The training rows at global positions ``[position, position + count)`` of the ordered
        stream (epoch e visits the rows in permutation(seed + e))."""
        rows = []
        for p in range(position, position + count):
            epoch, i = divmod(p, len(self.train))
            rows.append(int(self._perm(epoch)[i]))
        return rows

    def batch(self, position: int, count: int) -> dict[str, torch.Tensor]:
        return self.train.batch(self.rows(position, count))

    def targets(self, position: int, count: int) -> int:
        return self.train.targets(self.rows(position, count))


def tokenizer_identity(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DataSpec:
    """What to pack: the sources and settings that make up the cache key."""

    train: Source
    eval: Source | None
    eval_fraction: float
    text_field: str
    seq_len: int
    tokenizer: str

    @property
    def key(self) -> dict:
        return {
            "train": self.train.key,
            "eval": self.eval.key if self.eval else None,
            "eval_fraction": None if self.eval else self.eval_fraction,
            "text_field": self.text_field,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer,
            "format": FORMAT,
        }

    @property
    def digest(self) -> str:
        return key_digest(self.key)


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def data_spec(
    *,
    data: str | None,
    eval_data: str | None,
    eval_fraction: float,
    text_field: str,
    seq_len: int,
    model_dir: Path,
) -> DataSpec:
    """The sources and key of a run's data (reads file samples, tokenizes nothing)."""
    train = source_identity(data, "--data", "train")
    held = source_identity(eval_data, "--eval_data", "heldout") if eval_data else None
    if data is None and eval_data is None:
        held = source_identity(None, "--eval_data", "heldout")
    return DataSpec(train, held, eval_fraction, text_field, seq_len, tokenizer_identity(model_dir))


def cache_folder(spec: DataSpec, cache_root: Path) -> Path:
    return Path(cache_root) / spec.digest


def build_packed(
    spec: DataSpec,
    model_dir: Path,
    cache_root: Path,
    *,
    num_proc: int | None = None,
    log=print,
    progress: bool = False,
) -> Path:
    """The cache folder of ``spec``, tokenized and packed first if missing (atomically)."""

    def build(tmp: Path) -> None:
        from deus_dist.checkpoint.hub import load_tokenizer

        start = time.perf_counter()
        log(
            f"tokenizing and packing {spec.train.label} into {spec.seq_len}-token blocks (once) into {cache_root}"
        )
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.eos_token_id is None:
            raise UserError("--model: the tokenizer has no EOS token to separate documents")
        scratch = tmp / "scratch"
        train, held = (
            Packer(tmp / "train.bin", spec.seq_len, tokenizer.eos_token_id),
            Packer(tmp / "eval.bin", spec.seq_len, tokenizer.eos_token_id),
        )
        common = dict(tokenizer=tokenizer, num_proc=num_proc, progress=progress)
        try:
            split_here = held if spec.eval is None else None
            pack_source(
                spec.train,
                spec.text_field,
                "--data",
                scratch,
                train=train,
                held=split_here,
                eval_fraction=spec.eval_fraction,
                **common,
            )
            if spec.eval is not None:
                pack_source(
                    spec.eval,
                    spec.text_field,
                    "--eval_data",
                    scratch,
                    train=held,
                    held=None,
                    eval_fraction=0.0,
                    **common,
                )
        finally:
            n_train, n_eval = train.close(), held.close()
            shutil.rmtree(scratch, ignore_errors=True)
        if n_train == 0:
            raise UserError(f"--data: fewer than --seq_len={spec.seq_len} tokens of text; lower --seq_len")
        if n_eval == 0:
            raise UserError(
                f"--eval_data/--eval_fraction: the held-out text has fewer than --seq_len={spec.seq_len} "
                "tokens; raise --eval_fraction or pass a larger --eval_data"
            )
        seconds = time.perf_counter() - start
        meta = {
            **spec.key,
            "train_blocks": n_train,
            "eval_blocks": n_eval,
            "documents": train.documents,
            "eval_documents": held.documents,
            "tokens": train.tokens + held.tokens,
            "seconds": round(seconds, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        size = (tmp / "train.bin").stat().st_size + (tmp / "eval.bin").stat().st_size
        log(
            f"packed {train.documents:,} documents into {n_train:,} training blocks and {held.documents:,} into "
            f"{n_eval:,} held-out blocks ({meta['tokens']:,} tokens, {size / 1e6:,.1f} MB) in {seconds:.1f} s "
            f"({meta['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)"
        )

    return build_once(cache_folder(spec, cache_root), build)


def open_packed(folder: Path, seed: int) -> PackedData:
    """Memory-map a cache folder made by ``build_packed``."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    seq_len = meta["seq_len"]

    def mapped(name: str, blocks: int) -> Split:
        return Split(np.memmap(Path(folder) / name, dtype=np.int32, mode="r", shape=(blocks, seq_len)))

    key = {
        k: meta[k] for k in ("train", "eval", "eval_fraction", "text_field", "seq_len", "tokenizer", "format")
    }
    return PackedData(
        mapped("train.bin", meta["train_blocks"]), mapped("eval.bin", meta["eval_blocks"]), seed, key
    )


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
    num_proc: int | None = None,
    log=print,
    progress: bool = False,
) -> PackedData:
    """Tokenize and pack (once per key), then memory-map. Errors name the option to fix."""
    spec = data_spec(
        data=data,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        text_field=text_field,
        seq_len=seq_len,
        model_dir=model_dir,
    )
    folder = build_packed(spec, model_dir, cache_root, num_proc=num_proc, log=log, progress=progress)
    return open_packed(folder, seed)


KEY_OPTIONS = {
    "train": "--data",
    "text_field": "--text_field",
    "eval_fraction": "--eval_data/--eval_fraction",
    "tokenizer": "--model",
}
"""Which option each part of the cache key comes from (a resume that changes one is refused)."""


class TextPipeline:
    """cpt.py's data: documents -> tokens + EOS -> packed ``seq_len`` blocks."""

    key_options = KEY_OPTIONS
    label = "documents"

    def check_sources(self, cfg) -> None:
        source_identity(cfg.data, "--data")
        if cfg.eval_data:
            source_identity(cfg.eval_data, "--eval_data")

    def spec(self, cfg, model_dir: Path) -> DataSpec:
        return data_spec(
            data=cfg.data,
            eval_data=cfg.eval_data,
            eval_fraction=cfg.eval_fraction,
            text_field=cfg.text_field,
            seq_len=cfg.seq_len,
            model_dir=model_dir,
        )

    def build(
        self, spec: DataSpec, model_dir: Path, root: Path, *, num_proc=None, log=print, progress=False
    ) -> Path:
        return build_packed(spec, model_dir, root, num_proc=num_proc, log=log, progress=progress)

    def open(self, folder: Path, seed: int) -> PackedData:
        return open_packed(folder, seed)

    def export_files(self, spec: DataSpec) -> dict[str, str]:
        return {}
