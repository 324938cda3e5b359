"""Perplexity of a causal LM on a text source, in fixed non-overlapping windows.

Documents are tokenized one at a time, each followed by EOS, and concatenated; the stream is cut
into windows of ``seq_len`` tokens and every window predicts its tokens 2..seq_len from the ones
before. Windows are formed lazily (streaming); ``max_tokens`` bounds the tokens scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PerplexityResult:
    tokens: int
    windows: int
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    seconds: float
    window_nll: list[float]
    """Each window's mean NLL per scored token, in order: the same windows for any model with the
    same tokenizer and data, so two models can be compared window by window (paired)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def windows(
    documents: Iterator[str], tokenizer, seq_len: int, max_windows: int | None
) -> Iterator[list[int]]:
    buf: list[int] = []
    made = 0
    eos = tokenizer.eos_token_id
    for doc in documents:
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
            made += 1
            if max_windows is not None and made >= max_windows:
                return


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    documents: Iterator[str],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    progress=None,
) -> PerplexityResult:
    device = next(model.parameters()).device
    max_windows = None if max_tokens is None else max(1, math.ceil(max_tokens / (seq_len - 1)))
    total_nll, total_tokens, count = 0.0, 0, 0
    per_window: list[float] = []
    start = time.perf_counter()
    batch: list[list[int]] = []

    def flush():
        nonlocal total_nll, total_tokens, count
        ids = torch.tensor(batch, device=device)
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(batch), -1)
        per_window.extend(nll.mean(dim=1).tolist())
        total_nll += nll.sum().item()
        total_tokens += ids[:, 1:].numel()
        count += len(batch)
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for window in windows(documents, tokenizer, seq_len, max_windows):
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if total_tokens == 0:
        return PerplexityResult(0, 0, float("nan"), time.perf_counter() - start, [])
    return PerplexityResult(
        total_tokens, count, total_nll / total_tokens, time.perf_counter() - start, per_window
    )
