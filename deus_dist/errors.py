"""Errors raised for bad user input.

Every user-facing entry point turns a :class:`UserError` into one message on stderr and exit
status 2, with no traceback: the message itself names the option to change.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``problems`` lists every issue found, each naming its option."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class CheckpointError(UserError):
    """A checkpoint on disk is missing, unreadable, corrupt or inconsistent."""
