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

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from deus_dist.data_sources import open_dataset, source_identity
from deus_dist.errors import UserError
from deus_dist.train.pipeline import (
    EVAL,
    EVAL_FRACTION,
    SEQ_LEN,
    TOKENIZER,
    TRAIN,
    CacheKey,
    KeyPart,
    PackedData,
    Spec,
    Split,
    build_cache,
    map_sources,
    read_meta,
    sources_of,
    tokenizer_identity,
)

FORMAT = 2


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


@dataclass(frozen=True)
class DataSpec(Spec):
    """What to pack: the sources and settings that make up the cache key."""

    text_field: str
    KEY: ClassVar[CacheKey] = CacheKey(
        TRAIN,
        KeyPart("text_field", "--text_field"),
        EVAL,
        EVAL_FRACTION,
        SEQ_LEN,
        TOKENIZER,
        KeyPart("format", None, lambda s: FORMAT),
    )


class TextPipeline:
    """cpt.py's data: documents -> tokens + EOS -> packed ``seq_len`` blocks."""

    key_options = DataSpec.KEY.options

    def check_sources(self, cfg) -> None:
        sources_of(cfg, source_identity)

    def spec(self, cfg, model_dir: Path) -> DataSpec:
        """The sources and key of a run's data (reads file samples, tokenizes nothing)."""
        train, held = sources_of(cfg, source_identity)
        return DataSpec(
            train=train,
            eval=held,
            eval_fraction=cfg.eval_fraction,
            seq_len=cfg.seq_len,
            tokenizer=tokenizer_identity(model_dir),
            text_field=cfg.text_field,
        )

    def build(
        self, spec: DataSpec, model_dir: Path, root: Path, *, num_proc=None, log=print, progress=False
    ) -> Path:
        """The cache folder of ``spec``, tokenized and packed first if missing (atomically). Empty and
        non-string texts are skipped."""

        def fill(tmp: Path, scratch: Path) -> dict:
            from datasets import Sequence, Value
            from tqdm import tqdm

            from deus_dist.checkpoint.hub import load_tokenizer

            start = time.perf_counter()
            log(
                f"tokenizing and packing {spec.train.label} into {spec.seq_len}-token blocks (once) into {root}"
            )
            tokenizer = load_tokenizer(model_dir)
            if tokenizer.eos_token_id is None:
                raise UserError("--model: the tokenizer has no EOS token to separate documents")
            field = spec.text_field

            def open_text(src, option: str, scratch: Path):
                return open_dataset(src, field, option, scratch).select_columns([field])

            def tokenize(batch, is_held):
                texts = batch[field]
                keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
                ids = (
                    tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
                )
                return {"ids": ids, "held": [bool(is_held[i]) for i in keep]}

            train = Packer(tmp / "train.bin", spec.seq_len, tokenizer.eos_token_id)
            held = Packer(tmp / "eval.bin", spec.seq_len, tokenizer.eos_token_id)
            mapped = map_sources(
                spec,
                open_text,
                lambda ds, src: tokenize,
                scratch=scratch,
                features={"ids": Sequence(Value("int32")), "held": Value("bool")},
                desc="tokenizing",
                batch_size=1000,
                num_proc=num_proc,
                progress=progress,
            )
            try:
                for src, option, tokenized in mapped:
                    with tqdm(
                        total=len(tokenized),
                        desc="packing",
                        unit="doc",
                        disable=not progress,
                        file=sys.stderr,
                    ) as bar:
                        for table in tokenized.with_format("arrow").iter(batch_size=10_000):
                            ids = table.column("ids").combine_chunks()
                            offsets = np.asarray(ids.offsets, dtype=np.int64)
                            values = np.asarray(ids.flatten(), dtype=np.int32)
                            offsets = offsets - offsets[0]
                            is_held = np.asarray(table.column("held"), dtype=bool)
                            train.add(values, offsets, ~is_held)
                            held.add(values, offsets, is_held)
                            bar.update(len(is_held))
                    if len(tokenized) == 0:
                        raise UserError(f"{option}: {src.label} has no non-empty {field!r} texts")
            finally:
                n_train, n_eval = train.close(), held.close()
            if n_train == 0:
                raise UserError(
                    f"--data: fewer than --seq_len={spec.seq_len} tokens of text; lower --seq_len"
                )
            if n_eval == 0:
                raise UserError(
                    f"--eval_data/--eval_fraction: the held-out text has fewer than --seq_len={spec.seq_len} "
                    "tokens; raise --eval_fraction or pass a larger --eval_data"
                )
            seconds = time.perf_counter() - start
            stats = {
                "train_blocks": n_train,
                "eval_blocks": n_eval,
                "documents": train.documents,
                "eval_documents": held.documents,
                "tokens": train.tokens + held.tokens,
                "seconds": round(seconds, 3),
            }
            size = (tmp / "train.bin").stat().st_size + (tmp / "eval.bin").stat().st_size
            log(
                f"packed {train.documents:,} documents into {n_train:,} training blocks and {held.documents:,} "
                f"into {n_eval:,} held-out blocks ({stats['tokens']:,} tokens, {size / 1e6:,.1f} MB) in "
                f"{seconds:.1f} s ({stats['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)"
            )
            return stats

        return build_cache(spec, root, fill)

    def open(self, folder: Path, seed: int) -> PackedData:
        """Memory-map a cache folder made by ``build``."""
        meta = read_meta(folder)

        def mapped(name: str, blocks: int) -> Split:
            return Split(
                np.memmap(Path(folder) / name, dtype=np.int32, mode="r", shape=(blocks, meta["seq_len"]))
            )

        return PackedData(
            mapped("train.bin", meta["train_blocks"]),
            mapped("eval.bin", meta["eval_blocks"]),
            seed,
            DataSpec.KEY.saved(meta),
        )

    def export_files(self, spec: DataSpec) -> dict[str, str]:
        return {}
