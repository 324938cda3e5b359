"""deus-dist: depth up-scaling of pretrained decoder-only language models.

The package holds all logic; ``tools/`` and ``launchers/`` are thin entry points.
"""

__version__ = "0.1.0"
