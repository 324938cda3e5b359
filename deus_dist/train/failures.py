"""One message per problem for a whole job: which rank prints a UserError, and how the ranks that
found nothing stop.

A rank that fails with a UserError posts its message on the process group's store (rank 0's
TCPStore, or torchrun's agent store), outside any collective, and waits up to AGREE_S for the
other ranks' messages:

- every rank posted the same message: the problem is everyone's (an option), rank 0 prints it;
- otherwise each failed rank prints its own, prefixed with its rank and host: a path one node
  cannot see, a GPU missing on one node, a checkpoint file one rank cannot read.

A UserError that names its reporter (``UserError.rank``: a builder whose failure the ranks waiting
for it repeat) is printed by that rank alone. The ranks that found nothing are waiting in a
collective; it fails when the failed ranks close the process group, or at the latest after
--dist_timeout; they find the posted message and exit 2 without a traceback. Rank 0, whose
process may hold the store, stays until every rank has looked (at most the store's timeout, which
is --dist_timeout).
"""

from __future__ import annotations

import datetime
import socket
import sys
import time

import torch

from deus_dist.errors import UserError

AGREE_S = 10.0
"""How long a failed rank waits for the other ranks' messages (ranks that fail on the same option
fail within moments of each other: they pass the same collectives before it)."""
POLL_S = 0.1


class FailureBoard:
    """The job's failures, kept on the process group's store under ``deus-failures/``."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    @classmethod
    def of_job(cls) -> FailureBoard | None:
        """The board of this process's group; None for one process or before the group exists
        (then every rank parsed the same options: rank 0 reports alone)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        from torch.distributed.distributed_c10d import _get_default_store

        store = dist.PrefixStore("deus-failures/", _get_default_store())
        return cls(store, dist.get_rank(), dist.get_world_size())

    def post(self, message: str) -> None:
        self.store.set(f"error-{self.rank}", message)
        self.store.add("posted", 1)

    def messages(self, wait_s: float) -> dict[int, str]:
        """Every rank's posted message, once all have posted or after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while self.store.add("posted", 0) < self.world_size and time.monotonic() < deadline:
            time.sleep(POLL_S)
        keys = {r: f"error-{r}" for r in range(self.world_size)}
        return {r: self.store.get(k).decode() for r, k in keys.items() if self.store.check([k])}

    def anyone_posted(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while self.store.add("posted", 0) == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def leave(self) -> None:
        """Say this rank has looked; rank 0 waits for every rank to (its process may hold the store)."""
        try:
            self.store.add("left", 1)
            if self.rank != 0:
                return
            timeout = getattr(self.store, "timeout", None) or datetime.timedelta(minutes=30)
            deadline = time.monotonic() + timeout.total_seconds()
            while self.store.add("left", 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except (RuntimeError, OSError):
            pass  # the store is gone: nobody is left to look


def report(e: UserError, prog: str, board: FailureBoard | None, rank: int) -> None:
    """Print ``e`` on stderr if this rank is the one to (module docstring)."""
    line = f"{prog}: error: {e}"
    if board is not None:
        try:
            board.post(str(e))
            if e.rank is None:
                posted = board.messages(AGREE_S)
                if len(posted) == board.world_size and len(set(posted.values())) == 1:
                    line = line if rank == 0 else None
                else:
                    line = f"{prog}: error: rank {rank} ({socket.gethostname()}): {e}"
            elif rank != e.rank:
                line = None
        except (RuntimeError, OSError):  # the store went with rank 0: say it here, to be sure
            line = f"{prog}: error: rank {rank} ({socket.gethostname()}): {e}"
    elif not e.reported_by(rank):
        line = None
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def stopped_by_another_rank(board: FailureBoard | None) -> bool:
    """Whether a failure that is no UserError (a collective that failed) followed another rank's
    UserError, which that rank reports."""
    if board is None:
        return False
    try:
        return board.anyone_posted(AGREE_S)
    except (RuntimeError, OSError):
        return False
