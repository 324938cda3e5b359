"""Where a tool may write, checked before anything is touched: every writing tool calls
``check_output`` on each of its outputs.

- An output never touches an input: it may not be an input, contain one, or lie inside an input
  model or checkpoint (``--force`` replaces only an earlier output, never a source). A run
  directory is the exception that holds outputs: a new folder inside it (``RUN/final``) is fine,
  replacing it or a folder above it is not.
- An output has the right kind: a directory where a directory goes, a file where a file goes, and
  no regular file where one of its parent directories must be.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deus_dist.errors import UserError


@dataclass(frozen=True)
class Input:
    """A path the command reads."""

    option: str
    """How the user named it (``--model``, ``CHECKPOINT_DIR``, ...)."""
    path: Path | str | None
    """None, or a name that is not a local path (a hub id), is no input on this disk."""
    holds_outputs: bool = False
    """A run directory: new outputs may go inside it (RUN/final); it may still not be replaced."""


def _real(path: Path | str) -> Path:
    return Path(path).expanduser().absolute().resolve()


def output_problems(
    out: Path | str, option: str, kind: Literal["dir", "file"], inputs: Iterable[Input] = ()
) -> list[str]:
    """Why ``out`` (a directory or a file, per ``kind``) may not be written; each problem names
    ``option`` and, for a clash with an input, that input's option, with both paths."""
    out = Path(out).expanduser()
    problems = []
    blocker = next((p for p in [out, *out.absolute().parents] if p.exists() or p.is_symlink()), None)
    if blocker is not None and blocker != out and not blocker.is_dir():
        problems.append(f"{option}: {out} cannot be created: {blocker} is a file, not a directory")
    elif kind == "dir" and out.exists() and not out.is_dir():
        problems.append(f"{option}: {out} is a file; give a directory")
    elif kind == "file" and out.is_dir():
        problems.append(f"{option}: {out} is a directory; give a file name")
    real = _real(out)
    for given in inputs:
        if given.path is None or not Path(given.path).expanduser().exists():
            continue
        source = _real(given.path)
        where = f"{given.option} {given.path}"
        if real == source:
            problems.append(f"{option}: {out} is {where}, an input; write somewhere else")
        elif real in source.parents:
            problems.append(
                f"{option}: {out} contains {where}, an input that writing there would replace; "
                "write somewhere else"
            )
        elif source in real.parents and not given.holds_outputs:
            problems.append(f"{option}: {out} is inside {where}, an input; write somewhere else")
    return problems


def check_output(
    out: Path | str, option: str, kind: Literal["dir", "file"], inputs: Iterable[Input] = ()
) -> None:
    """``output_problems``, raised as one UserError."""
    problems = output_problems(out, option, kind, inputs)
    if problems:
        raise UserError(problems)
