#!/usr/bin/env python
"""Tokenize and pack a corpus into launchers/cpt.py's cache before training: see ``--help`` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.cli.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
