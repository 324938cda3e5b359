"""Errors raised for bad user input.

Every user-facing entry point turns a :class:`UserError` into one message on stderr and exit
status 2, with no traceback: the message itself names the option to change.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``problems`` lists every issue found, each naming its option."""

    rank: int | None = None
    """In a distributed run, the one rank that reports the problem (a builder whose failure the
    ranks waiting for it repeat); None: the ranks that found it compare their messages, and rank 0
    reports one that every rank found (train/failures.py)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._format())

    def reported_by(self, rank: int) -> bool:
        return rank == (0 if self.rank is None else self.rank)

    def _format(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class Problems:
    """Collects every problem found while validating, to raise them together as one UserError."""

    def __init__(self):
        self.items: list[str] = []

    def append(self, problem: str) -> None:
        self.items.append(problem)

    def attempt(self, fn):
        """``fn()``, or None with its UserError's problems collected."""
        try:
            return fn()
        except UserError as e:
            self.items.extend(e.problems)
            return None

    def raise_if_any(self) -> None:
        if self.items:
            raise UserError(self.items)


class CheckpointError(UserError):
    """A checkpoint on disk is missing, unreadable, corrupt or inconsistent."""
