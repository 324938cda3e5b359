"""Optional dependencies by use: a user who only up-scales installs none of them.

Each entry point names the extra it needs (``@requires("train")`` on its ``main``); when a module of
that extra is missing it prints one line naming the extra to install and exits 2, before parsing.
The extras' requirements are setup.py's ``extras_require`` (a test keeps the two in step).
"""

from __future__ import annotations

import functools
import importlib.util
import sys

from deus_dist.errors import UserError

EXTRAS: dict[str, dict[str, str]] = {
    "train": {"deepspeed": "deepspeed", "datasets": "datasets"},
    "eval": {"lm_eval": "lm-eval", "datasets": "datasets"},
    "study": {
        "deepspeed": "deepspeed",
        "datasets": "datasets",
        "lm_eval": "lm-eval",
        "matplotlib": "matplotlib",
    },
}
"""extra -> {module imported: distribution that provides it}."""


def missing(extra: str, only: tuple[str, ...] | None = None) -> list[str]:
    """The distributions of ``extra`` (or of its modules ``only``) whose module cannot be imported."""
    return [
        dist
        for module, dist in EXTRAS[extra].items()
        if (only is None or module in only) and importlib.util.find_spec(module) is None
    ]


def install_hint(extra: str) -> str:
    return f"pip install 'deus-dist[{extra}]'"


def require(extra: str, what: str | None = None, only: tuple[str, ...] | None = None) -> None:
    """UserError naming the missing packages and the extra to install (and ``what`` needs them)."""
    absent = missing(extra, only)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        needed = f", which {what} needs" if what else ""
        raise UserError(f"{', '.join(absent)} {verb} not installed{needed}: {install_hint(extra)}")


def requires(extra: str, prog: str, only: tuple[str, ...] | None = None):
    """Decorate an entry point's ``main``: exit 2 with one line when ``extra`` (or its modules
    ``only``) is not installed."""

    def wrap(main):
        @functools.wraps(main)
        def checked(*args, **kwargs):
            try:
                require(extra, only=only)
            except UserError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            return main(*args, **kwargs)

        return checked

    return wrap
