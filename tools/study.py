#!/usr/bin/env python
"""Which growth recipe wins, at equal budget, with error bars: see ``--help`` and the README."""

import sys

from deus_dist.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
