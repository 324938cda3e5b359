"""Shared fixtures: tiny real transformers models of every supported family, and the embedded SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def tiny_config(family: str, **overrides):
    import transformers as tf

    kw = {**TINY, **overrides}
    if family == "llama":
        return tf.LlamaConfig(**kw)
    if family == "mistral":
        return tf.MistralConfig(**kw)
    if family == "qwen2":
        # sliding windows above layer 2: layer_types mixes full and sliding attention
        return tf.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=2, **kw)
    if family == "qwen3":
        return tf.Qwen3Config(use_sliding_window=True, sliding_window=16, max_window_layers=3, **kw)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(sliding_window=16, **kw)  # 5 sliding layers, then 1 global
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def make_tiny(
    path: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a tiny randomly initialised model (all weights non-trivial) as an HF checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: make every tensor distinct
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny(tmp_path / "base", "llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from deus_dist.embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in the tests may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def fuse(*args: str) -> int:
    """Run tools/fuse_layers.py in-process; returns its exit status."""
    from deus_dist.cli.fuse import main

    return main([str(a) for a in args])


def load_manifest(path: Path) -> dict:
    return json.loads((Path(path) / "deus_manifest.json").read_text())


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from deus_dist.checkpoint import CheckpointReader

    with CheckpointReader(path) as r:
        return {n: r.read(n).clone() for n in r.tensors}


REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
