"""Cluster facts probed at start-up, and long work kept out of collectives.

- Which ranks share a filesystem is probed, never assumed: every rank writes a token into a
  directory and reports which tokens it sees (allowing a few seconds for network filesystems).
- ``--output_dir`` must be shared by every rank (each writes its checkpoint partition there and
  rank 0 renames the result), checked once at start-up.
- Work that takes minutes (tokenizing a corpus, up-scaling the default model, downloading from the
  hub, converting a checkpoint) runs once per filesystem that needs it: on rank 0 when every rank
  sees the same directory, on each node's first rank when the directory is node-local (local
  scratch). The other ranks wait by polling a completion marker, not inside a collective, so no
  collective deadline (``--dist_timeout``) limits how long the work may take; a failure marker
  carries the builder's error to every waiting rank, so a failed build stops them all.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from deus_dist.atomic import write_text_atomic
from deus_dist.errors import UserError
from deus_dist.train.dist import DistEnv, barrier

T = TypeVar("T")

SHARE_WAIT_S = 5.0
"""How long a rank waits to see rank 0's token before deciding it does not share the directory
(network filesystems publish new files to other nodes after their attribute-cache delay)."""
POLL_S = 0.5
STALE_MARKER_S = 24 * 3600
HEARTBEAT_S = 5.0
"""How often a builder touches its heartbeat marker while it works."""
HEARTBEAT_STALE_S = 120.0
"""How long the ranks waiting for a builder see its heartbeat unchanged before they stop: it was
killed outright (the OOM killer, a node failure) and will write no failure marker. Measured by
each waiting rank's own clock, so clock skew between nodes does not matter; it covers a network
filesystem's attribute-cache delay many times over."""


def filesystem_views(directory: Path, env: DistEnv, tag: str, wait_s: float = SHARE_WAIT_S) -> list[set[int]]:
    """For each rank, the ranks whose token it sees in ``directory`` (collective).

    When some rank does not see rank 0's token at once, every rank waits ``wait_s`` and looks
    again (a network filesystem publishes new files to other nodes late): all ranks wait alike, so
    none sits in a collective meanwhile and a short --dist_timeout is no problem.
    """
    if env.world_size == 1:
        return [{0}]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f".deus-probe-{env.nonce}-{tag}-"
    mine = directory / f"{prefix}{env.rank}"
    mine.write_text(socket.gethostname())
    barrier()  # every token is written before anyone looks

    def look() -> list[set[int]]:
        seen = sorted(int(p.name[len(prefix) :]) for p in directory.glob(f"{prefix}*"))
        views: list = [None] * env.world_size
        torch.distributed.all_gather_object(views, seen)
        return [set(v) for v in views]

    views = look()
    if not all(0 in v for v in views):
        time.sleep(wait_s)
        views = look()
    mine.unlink(missing_ok=True)  # after the last look: every rank has looked
    return views


def require_shared(directory: Path, env: DistEnv, option: str) -> None:
    """Every rank must see what rank 0 writes in ``directory``; else one error naming ``option``."""
    views = filesystem_views(directory, env, "shared")
    blind = [r for r, seen in enumerate(views) if 0 not in seen]
    if blind:
        raise UserError(
            f"{option}: {directory} is not shared by all ranks: rank(s) {_ranks(blind)} do not see a file rank 0 "
            f"wrote there (waited {SHARE_WAIT_S:.0f} s). The output directory must be on a filesystem shared "
            "by all nodes (every rank writes its checkpoint partition there and rank 0 finalizes it); use a "
            "path on the cluster's shared filesystem"
        )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def _remove_stale_markers(directory: Path) -> None:
    now = time.time()
    for p in directory.glob(".deus-once-*"):
        try:
            if now - p.stat().st_mtime > STALE_MARKER_S:
                p.unlink()
        except OSError:
            pass


def once_per_filesystem(directory: Path, env: DistEnv, tag: str, fn: Callable[[], T]) -> T:
    """``fn()`` on one rank per filesystem that holds ``directory`` first, then on the others.

    ``fn`` must build its result under ``directory`` idempotently: when the others call it, it finds
    the result and only reads it (``build_once`` caches, an existing up-scaled model, the hub cache).
    The builders' ranks are rank 0 where every rank sees ``directory``, else the lowest rank of each
    group that sees the same files (a node's first rank on node-local scratch).
    """
    if env.world_size == 1:
        return fn()
    views = filesystem_views(directory, env, tag)
    return _first_then_others(Path(directory), env, tag, min(views[env.rank]), fn, fn)


def main_then_others(directory: Path, env: DistEnv, tag: str, fn: Callable[[], object]) -> None:
    """``fn()`` on rank 0 alone while every other rank waits for it outside any collective (a final
    export that may take longer than --dist_timeout); ``directory`` must be shared by all ranks
    (``require_shared``). A failure on rank 0 stops the others with its message."""
    if env.world_size == 1:
        fn()
        return
    _first_then_others(Path(directory), env, tag, 0, fn, lambda: None)


def _first_then_others(
    directory: Path, env: DistEnv, tag: str, builder: int, first: Callable[[], T], then: Callable[[], T]
) -> T:
    """``first()`` on ``builder``; the ranks that share its view poll its done/failed marker (no
    collective deadline applies) and its heartbeat, then run ``then()``."""
    base = directory / f".deus-once-{env.nonce}-{tag}-{builder}"
    done, failed = base.with_name(base.name + ".done"), base.with_name(base.name + ".failed")
    heartbeat = base.with_name(base.name + ".alive")
    if env.rank == builder:
        _remove_stale_markers(directory)
        try:
            with _beating(heartbeat):
                result = first()
        except BaseException as e:
            problems = e.problems if isinstance(e, UserError) else [f"rank {builder} failed: {e!r}"]
            # renamed into place whole: a waiting rank that sees the marker can read all of it
            write_text_atomic(
                failed, json.dumps({"problems": problems, "user_error": isinstance(e, UserError)})
            )
            if isinstance(e, UserError):
                e.rank = builder  # this rank reports it; the waiting ones stay quiet
            raise
        done.write_text("")
    else:
        _wait_for(done, failed, heartbeat, builder, tag, directory)
        if failed.exists():
            report = json.loads(failed.read_text())
            if not report["user_error"]:
                raise RuntimeError(report["problems"][0])
            error = UserError(report["problems"])
            error.rank = builder
            raise error
        result = then()
    barrier()  # every rank has its result; the markers may go
    if env.rank == builder:
        done.unlink(missing_ok=True)
    return result


@contextlib.contextmanager
def _beating(heartbeat: Path):
    """Touch ``heartbeat`` every HEARTBEAT_S seconds from a thread while the body runs; removed
    after it (a waiting rank that then sees none waits HEARTBEAT_STALE_S for the done or failed
    marker, which follows at once)."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                heartbeat.touch()
            except OSError:
                pass  # a full or flaky disk: the waiting ranks judge by what they see
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="deus-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        heartbeat.unlink(missing_ok=True)


def _wait_for(done: Path, failed: Path, heartbeat: Path, builder: int, tag: str, directory: Path) -> None:
    """Poll until ``done`` or ``failed`` appears; a UserError when ``heartbeat`` has not changed for
    HEARTBEAT_STALE_S (or never appeared in that time)."""
    seen, since = None, time.monotonic()
    while not done.exists() and not failed.exists():
        try:
            mtime = heartbeat.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != seen:
            seen, since = mtime, time.monotonic()
        elif time.monotonic() - since > HEARTBEAT_STALE_S:
            raise UserError(
                f"rank {builder} stopped building {tag!r} in {directory} without reporting why: its heartbeat "
                f"({heartbeat.name}) has not changed for {HEARTBEAT_STALE_S:.0f} s (killed, out of memory, or "
                "its node failed); see that rank's log, then run the same command again"
            )
        time.sleep(POLL_S)
