"""Quieting transformers' logging and progress bars around internal loads."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers(enabled: bool = True):
    """No transformers warnings and no progress bars (its "Loading weights" bar included) inside;
    on the way out, the verbosity and the progress-bar setting are what they were before, so a
    quiet block nested in a quiet run does not turn the bars back on."""
    from transformers.utils import logging as hf_logging

    if not enabled:
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
