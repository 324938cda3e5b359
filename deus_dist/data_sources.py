"""Text sources: local text/JSON files or folders, or the embedded Wikipedia sample.

Training data (anything ``datasets`` loads) goes through the training data module; this one
streams plain documents for evaluation and calibration without extra dependencies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from deus_dist.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


def _files(path: Path, option: str) -> list[Path]:
    if not path.exists():
        raise UserError(f"{option}: {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
    if not files:
        raise UserError(f"{option}: {path} holds no {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
    return files


def _json_records(path: Path, option: str) -> Iterator[dict]:
    with open(path) as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            data = json.load(f)
            yield from data
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{option}: {path} line {n} is not JSON: {e}") from None


def iter_documents(
    data: str | None, text_field: str = "text", option: str = "--data", split: str = "heldout"
) -> Iterator[str]:
    """Documents from ``data`` (a file or folder of .txt/.md/.jsonl/.json), or, when None, from the
    embedded Wikipedia sample's ``split``. A JSON record without ``text_field`` is an error."""
    if data is None:
        from deus_dist.embedded import wikipedia_split

        for article in wikipedia_split(split):
            yield article["text"]
        return
    for path in _files(Path(data), option):
        if path.suffix in JSON_SUFFIXES:
            for record in _json_records(path, option):
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"--text_field: {path} has records without {text_field!r} (keys: {keys})")
                yield str(record[text_field])
        else:
            yield path.read_text()
