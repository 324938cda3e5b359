#!/usr/bin/env python
"""Per-GPU memory of training the new layers, for each DeepSpeed sharding: see ``--help``."""

import sys

from deus_dist.cli.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
