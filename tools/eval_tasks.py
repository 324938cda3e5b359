#!/usr/bin/env python
"""Downstream multiple-choice tasks of an HF checkpoint through lm-evaluation-harness, offline: see ``--help``."""

import sys

from deus_dist.cli.eval_tasks import main

if __name__ == "__main__":
    sys.exit(main())
