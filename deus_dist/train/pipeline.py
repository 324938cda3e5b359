"""The contract between a data pipeline and the engine, and the flow every pipeline shares.

A pipeline (data.TextPipeline for cpt.py, chat_data.ChatPipeline for sft.py) turns the data
options into a spec (its sources and cache key, reading file samples, tokenizing nothing), builds
the spec's cache folder once per filesystem and memory-maps it as the rows training reads
(``PackedData``). Its cache key is one table of ``KeyPart``s: the spec's key, the key read back
from a cache folder and the options a resume may not change all come from it.

The shared flow: the sources of a spec are ``--data`` and, when given, ``--eval_data``; each is
opened with ``datasets``, mapped record by record in worker processes, and split: without
``--eval_data`` a fixed-seed ``--eval_fraction`` of ``--data``'s records is held out (it does not
move with ``--seed``), with it every ``--eval_data`` record is held out and none of ``--data``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from deus_dist.atomic import build_once
from deus_dist.data_sources import Source

IGNORE = -100
"""Label of a token that is not a target (transformers' ignore index)."""
SPLIT_SEED = 1234  # fixed: the held-out records do not move with --seed
AUTO_PROC_RECORDS = 20_000
"""Sources with fewer records are mapped in this process: starting workers costs more."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)

# -- the rows a pipeline opens ------------------------------------------------------------------------


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
    """The training and held-out rows of a run, and the seeded order the training rows are read in:
    epoch ``e`` visits them in ``permutation(seed + e)``, so a run's data position is the number of
    rows consumed so far, which is all a resume needs."""

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


# -- the cache key ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPart:
    """One entry of a cache key."""

    name: str
    option: str | None = None
    """The option it comes from, when a resume that changes it is refused (None: not compared, or
    compared on its own, as --seq_len)."""
    value: Callable[[Any], object] | None = None
    """Its value for a spec; None: the spec's attribute ``name``."""

    def of(self, spec) -> object:
        return getattr(spec, self.name) if self.value is None else self.value(spec)


class CacheKey:
    """A pipeline's cache key, defined once: what the spec's key holds, what is read back from a
    cache folder, and which option each resume-checked part comes from."""

    def __init__(self, *parts: KeyPart):
        self.parts = parts

    def of(self, spec) -> dict:
        return {p.name: p.of(spec) for p in self.parts}

    def saved(self, meta: dict) -> dict:
        """The key stored in a cache folder's meta.json."""
        return {p.name: meta[p.name] for p in self.parts}

    @property
    def options(self) -> dict[str, str]:
        """Which option each resume-checked part comes from (a resume that changes one is refused)."""
        return {p.name: p.option for p in self.parts if p.option is not None}


# The parts every pipeline's key has. The held-out share only counts when --data is split.
TRAIN = KeyPart("train", "--data", lambda s: s.train.key)
EVAL = KeyPart("eval", None, lambda s: s.eval.key if s.eval else None)
EVAL_FRACTION = KeyPart(
    "eval_fraction", "--eval_data/--eval_fraction", lambda s: None if s.eval else s.eval_fraction
)
SEQ_LEN = KeyPart("seq_len")  # resume compares --seq_len on its own
TOKENIZER = KeyPart("tokenizer", "--model")


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Spec:
    """What a pipeline builds its rows from (the base of its spec): the sources and settings its
    class's ``KEY`` makes the cache key of."""

    KEY: ClassVar[CacheKey]
    train: Source
    eval: Source | None
    """--eval_data; None: a share of --data is held out."""
    eval_fraction: float
    seq_len: int
    tokenizer: str
    """``tokenizer_identity`` of the model."""

    @property
    def key(self) -> dict:
        return self.KEY.of(self)

    @property
    def digest(self) -> str:
        return key_digest(self.key)


def tokenizer_identity(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


# -- the contract -------------------------------------------------------------------------------------


SpecT = TypeVar("SpecT", bound=Spec)


class DataPipeline(Protocol[SpecT]):
    """How a launcher's data options become training rows (what the engine and run.py call)."""

    key_options: Mapping[str, str]
    """Which option each part of the cache key comes from (a resume that changes one is refused)."""

    def check_sources(self, cfg) -> None:
        """Raise UserError naming the option when --data or --eval_data cannot be read (used when
        no spec can be made, so that data problems are reported with the others)."""

    def spec(self, cfg, model_dir: Path) -> SpecT:
        """The sources and cache key of ``cfg``'s data (reads file samples, tokenizes nothing)."""

    def build(
        self,
        spec: SpecT,
        model_dir: Path,
        root: Path,
        *,
        num_proc: int | None = None,
        log: Callable[[str], object] = print,
        progress: bool = False,
    ) -> Path:
        """The cache folder of ``spec`` under ``root``, built first if missing (once, atomically)."""

    def open(self, folder: Path, seed: int) -> PackedData:
        """Memory-map a cache folder made by ``build``; training rows are ordered by ``seed``."""

    def export_files(self, spec: SpecT) -> dict[str, str]:
        """Files (name: text) the exported model carries besides the weights."""


# -- the shared flow: sources -> map -> held-out split -------------------------------------------------


def sources_of(cfg, identify: Callable[[str | None, str, str], Source]) -> tuple[Source, Source | None]:
    """(train, held-out source) of ``cfg.data`` / ``cfg.eval_data``: the embedded sample's held-out
    slice for the default data, None (a share of --data) for data of the user's own."""
    train = identify(cfg.data, "--data", "train")
    held = identify(cfg.eval_data, "--eval_data", "heldout") if cfg.eval_data else None
    if cfg.data is None and cfg.eval_data is None:
        held = identify(None, "--eval_data", "heldout")
    return train, held


def held_out(total: int, share: float) -> np.ndarray:
    """Which of ``total`` records are held out: all (share 1), none (0), or a fixed-seed ``share``
    of them, at least one (none of a single record)."""
    if share >= 1:
        return np.ones(total, dtype=bool)
    chosen = np.zeros(total, dtype=bool)
    if share > 0 and total > 1:
        n_eval = max(1, math.ceil(total * share))
        chosen[np.random.default_rng(SPLIT_SEED).permutation(total)[:n_eval]] = True
    return chosen


def _num_proc(requested: int | None, records: int) -> int:
    if requested is not None:
        return max(1, requested)
    return 1 if records < AUTO_PROC_RECORDS else max(1, min(8, os.cpu_count() or 1))


def map_sources(
    spec: Spec,
    open_source: Callable[[Source, str, Path], Any],
    mapper: Callable[[Any, Source], Callable],
    *,
    scratch: Path,
    features: dict,
    desc: str,
    batch_size: int | None = None,
    num_proc: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[Source, str, Any]]:
    """Each source of ``spec`` in build order, opened, mapped and split: yields (source, the option
    naming it, mapped dataset).

    ``open_source(src, option, scratch)`` gives its ``datasets.Dataset``; ``mapper(dataset, src)``
    gives the function ``fn(records, held)`` that ``datasets.map`` calls with each record (or each
    batch of ``batch_size``) and whether it is held out (an array for a batch), and that returns
    the ``features`` columns, ``held`` among them, for the rows it keeps. Records are mapped in
    ``num_proc`` worker processes (chosen by size when None), never from datasets' cache."""
    import datasets

    parts = [(spec.train, "--data", spec.eval_fraction if spec.eval is None else 0.0)]
    if spec.eval is not None:
        parts.append((spec.eval, "--eval_data", 1.0))
    for src, option, share in parts:
        with _datasets_progress(progress):
            ds = open_source(src, option, scratch)
            held = held_out(len(ds), share)
            fn = mapper(ds, src)
            procs = _num_proc(num_proc, len(ds))
            mapped = ds.map(
                _with_held(fn, held),
                batched=batch_size is not None,
                batch_size=batch_size or 1000,
                with_indices=True,
                num_proc=procs if procs > 1 else None,
                remove_columns=ds.column_names,
                features=datasets.Features(features),
                desc=desc,
                load_from_cache_file=False,
            )
        yield src, option, mapped


def _with_held(fn: Callable, held: np.ndarray) -> Callable:
    """``fn(records, held)`` as ``datasets.map`` calls it, with the records' indices."""
    return lambda records, index: fn(records, held[index])


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' progress bars on inside when ``enabled``; off after, whatever happens."""
    import datasets

    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        datasets.disable_progress_bars()


def build_cache(spec: Spec, root: Path, fill: Callable[[Path, Path], dict]) -> Path:
    """The cache folder of ``spec`` under ``root``, made first if missing (once, atomically):
    ``fill(tmp, scratch)`` writes the rows into ``tmp`` and returns what meta.json holds besides
    the key; ``scratch`` (local sources converted for datasets) is removed after."""

    def build(tmp: Path) -> None:
        scratch = tmp / "scratch"
        try:
            stats = fill(tmp, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        (tmp / "meta.json").write_text(json.dumps({**spec.key, **stats}, indent=2) + "\n")

    return build_once(cache_folder(spec, root), build)


def cache_folder(spec: Spec, root: Path) -> Path:
    return Path(root) / spec.digest


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())
