#!/usr/bin/env python
"""Downstream multiple-choice tasks of an HF checkpoint through lm-evaluation-harness, offline: see ``--help``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.cli.eval_tasks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
