#!/usr/bin/env python
"""Up-scale a pretrained HF checkpoint: see ``--help`` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.cli.fuse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
