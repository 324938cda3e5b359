"""Files and directories that appear whole or not at all: write to a temporary name, fsync, rename.

Every output a tool or a training run leaves (checkpoints, caches, reports, manifests) goes through
one of these, so a crash leaves either the previous content or a ``*.partial-*`` name a later run
removes, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from deus_dist.errors import UserError


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
