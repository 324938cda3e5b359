#!/usr/bin/env python
"""Which growth recipe wins, at equal budget, with error bars: see ``--help`` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.cli.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
