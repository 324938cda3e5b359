#!/usr/bin/env python
"""Export a training checkpoint as a plain HF checkpoint: see ``--help`` and the README."""

import sys

from deus_dist.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
