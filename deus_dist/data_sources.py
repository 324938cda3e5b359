"""The one data layer: where text comes from, for training, perplexity and calibration alike.

A source is a local file or folder (.json/.jsonl/.parquet/.txt/.md/.csv; in .txt/.md files a
paragraph, up to a blank line, is a document), a hub dataset name (``org/name``), or the embedded
Wikipedia sample's training or held-out slice; for evaluation also a named set of
``deus_dist.embedded.EVAL_SETS`` (``embedded``, ``chat``, ...). ``source_identity`` says what a source is made of
(its files' names within the source, sizes and a digest of sampled bytes: content, not paths);
``open_dataset`` reads it with ``datasets``; ``iter_documents`` streams its texts.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deus_dist.errors import UserError

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".csv": "csv",
}
EMBEDDED = "embedded:wikipedia"
NAMED = "embedded:eval-set"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAMPLE_BYTES = 1 << 12
SAMPLES = 4
"""A source file's digest reads SAMPLES windows of SAMPLE_BYTES (16 KiB a file, on every rank)."""


@dataclass(frozen=True)
class Source:
    """A text source: what its cache key holds (``key``) and how to open it."""

    label: str
    """For messages: the path or name the user gave."""
    key: dict
    """Content identity: files by relative name, size and sampled digest; or the hub name."""
    files: tuple[Path, ...] = ()
    builder: str | None = None


def _content_digest(path: Path, size: int) -> str:
    """sha256 of ``SAMPLES`` evenly spaced windows of the file (the first and the last among them):
    with the size, enough to tell corpora apart without reading terabytes at every start-up."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]


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


def looks_like_path(value: str) -> bool:
    """A value meant as a local path: explicit (./, /, ~), a data-file name, or under an existing
    directory. Only ``org/name`` that is none of these is taken as a hub dataset."""
    if value.startswith((".", "/", "~")) or Path(value).suffix in BUILDERS:
        return True
    if not _HUB_DATASET.match(value):
        return True
    return Path(value).parent.is_dir() and str(Path(value).parent) not in ("", ".")


def source_identity(source: str | None, option: str, split: str = "train", named: bool = False) -> Source:
    """The source ``option`` names; a path-like value that does not exist is an error (never a hub
    lookup). ``named``: the option also takes the name of an evaluation set (``embedded`` is then
    the Wikipedia sample's ``split``; ``./NAME`` is the local path)."""
    if named and source is not None:
        from deus_dist.embedded import EVAL_SET_VERSION, EVAL_SETS

        if source == "embedded":
            source = None
        elif source in EVAL_SETS:
            key = {"source": NAMED, "name": source, "version": EVAL_SET_VERSION}
            return Source(f"{source}: {EVAL_SETS[source][0]}", key)
    if source is None:
        return Source(f"the embedded Wikipedia sample ({split})", {"source": EMBEDDED, "split": split})
    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path, option)
        entries = []
        for p in files:
            size = p.stat().st_size
            # in a folder the names order the stream; a single file is its content alone
            name = str(p.relative_to(path)) if path.is_dir() else ""
            entries.append([name, size, _content_digest(p, size)])
        return Source(str(path), {"builder": builder, "files": entries}, tuple(files), builder)
    if looks_like_path(source):
        raise UserError(f"{option}: {source} does not exist")
    return Source(source, {"source": source, "builder": "hub"}, (), "hub")


def open_dataset(src: Source, text_field: str | None, option: str, scratch: Path):
    """A ``datasets.Dataset`` with the records of ``src`` (local files are converted under
    ``scratch``, deleted after packing; hub datasets use the user's datasets cache). ``text_field``,
    when given, must be one of its columns."""
    import datasets

    if src.key.get("source") == EMBEDDED:
        from deus_dist.embedded import wikipedia_split

        return datasets.Dataset.from_dict(
            {text_field: [a["text"] for a in wikipedia_split(src.key["split"])]}
        )
    if src.key.get("source") == NAMED:
        from deus_dist.embedded import eval_set_texts

        return datasets.Dataset.from_dict({text_field: eval_set_texts(src.key["name"])})
    try:
        if src.builder == "hub":
            ds = datasets.load_dataset(src.label, split="train")
        else:
            # plain text: a paragraph (up to a blank line) is a document, followed by EOS
            extra = {"sample_by": "paragraph"} if src.builder == "text" else {}
            ds = datasets.load_dataset(
                src.builder,
                data_files=[str(f) for f in src.files],
                split="train",
                cache_dir=str(scratch),
                **extra,
            )
    except Exception as e:  # datasets raises many types for unreadable input, few of them say why
        problem = next(filter(None, (file_problem(f, src.builder) for f in src.files)), None)
        while e.__cause__ is not None and problem is None:
            e = e.__cause__
        raise UserError(
            f"{option}: {problem or f'cannot load {src.label}: {type(e).__name__}: {e}'}"
        ) from None
    if text_field is not None and text_field not in ds.column_names:
        raise UserError(
            f"--text_field: {src.label} has no column {text_field!r} (columns: {', '.join(ds.column_names)})"
        )
    feature = ds.features[text_field] if text_field is not None else None
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
        raise UserError(
            f"--text_field: {text_field!r} in {src.label} holds {getattr(feature, 'dtype', type(feature).__name__)} "
            "values, not strings; name the field that holds the text"
        )
    return ds


def file_problem(path: Path, builder: str | None) -> str | None:
    """Why a local data file does not read, found line by line (after ``datasets`` failed on it,
    with no file, line or reason in its message): empty, not UTF-8 text, or for JSON Lines the
    first line that is not a JSON object. None when no such reason is found."""
    import json

    with open(path, "rb") as f:
        first = None
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path} line {number} is not UTF-8 text (byte {e.start}); is it a binary file?"
            if builder != "json" or not line.strip():
                continue
            first = first or number
            try:
                record = json.loads(line)
            except ValueError as e:
                if number == first:  # one JSON document over many lines, not JSON Lines
                    return _json_document_problem(path)
                return f"{path} line {number} is not JSON ({e}); fix or remove that line"
            if not isinstance(record, dict):
                return (
                    f"{path} line {number} is a JSON {type(record).__name__}, not an object with a text field"
                )
    if first is None and Path(path).read_bytes().strip() == b"":
        return f"{path} is empty"
    return None


def _json_document_problem(path: Path) -> str | None:
    import json

    try:
        json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 text (byte {e.start}); is it a binary file?"
    except ValueError as e:
        return f"{path} is neither JSON Lines nor one JSON document ({e})"
    return None


def iter_documents(
    data: str | None,
    text_field: str = "text",
    option: str = "--data",
    split: str = "heldout",
    named: bool = False,
) -> Iterator[str]:
    """The non-empty texts of ``data`` in source order (``None``: the embedded Wikipedia sample's
    ``split``; ``named``: an evaluation set's name is taken too), read as training reads them: a
    .txt paragraph is a document; a missing ``text_field`` is an error naming --text_field."""
    from deus_dist.extras import require

    require("train", option, only=("datasets",))  # up-scaling needs it only for --calib_data text
    import datasets

    src = source_identity(data, option, split, named=named)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="deus-docs-") as scratch:
        ds = open_dataset(src, text_field, option, Path(scratch)).select_columns([text_field])
        for batch in ds.iter(batch_size=1000):
            for text in batch[text_field]:
                if isinstance(text, str) and text.strip():
                    yield text
