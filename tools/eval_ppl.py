#!/usr/bin/env python
"""Perplexity of an HF checkpoint on a text source: see ``--help`` and the README."""

import sys

from deus_dist.cli.eval_ppl import main

if __name__ == "__main__":
    sys.exit(main())
