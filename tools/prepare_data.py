#!/usr/bin/env python
"""Tokenize and pack a corpus into launchers/cpt.py's cache before training: see ``--help`` and the README."""

import sys

from deus_dist.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
