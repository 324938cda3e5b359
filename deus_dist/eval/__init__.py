"""Evaluation of checkpoints: perplexity (``perplexity.py``) and lm-eval multiple-choice tasks (``tasks.py``)."""
