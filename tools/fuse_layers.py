#!/usr/bin/env python
"""Up-scale a pretrained HF checkpoint: see ``--help`` and the README."""

import sys

from deus_dist.cli.fuse import main

if __name__ == "__main__":
    sys.exit(main())
