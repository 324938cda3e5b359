"""Quieting transformers' logging and progress bars around internal loads."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers(enabled: bool = True):
    from transformers.utils import logging as hf_logging

    if not enabled:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
