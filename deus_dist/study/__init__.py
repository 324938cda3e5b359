"""tools/study.py: arms x seeds of the project's own tools, at equal budget, with honest statistics."""
