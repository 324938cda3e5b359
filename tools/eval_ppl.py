#!/usr/bin/env python
"""Perplexity of an HF checkpoint on a text source: see ``--help`` and the README."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.cli.eval_ppl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
