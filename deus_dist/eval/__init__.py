"""Evaluation of checkpoints (perplexity; multiple choice later)."""
