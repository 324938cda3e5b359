"""Typed configs of the entry points; each field's docstring is its ``--help`` text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class FuseConfig:
    """Options of ``tools/fuse_layers.py``."""

    model: str | None = None
    """Base checkpoint: an HF directory (config.json + safetensors), or a hub name on machines
    that reach the hub. Default: the embedded SmolLM2-135M."""
    out: str | None = None
    """Output directory. Default: ./upscaled/<model>-<method>-<layers>L."""
    method: str = "avg"
    """How a new block is made: copy, avg, llama-pro, solar (see the README)."""
    num_new: int | None = None
    """How many new blocks. Default: L/2 (for solar: L - 2*floor(L/4))."""
    placement: Literal["top", "bottom", "middle", "top-bottom", "interleaved"] | None = None
    """Which gaps get the new blocks. Default: the method's (top for copy/avg, interleaved for
    llama-pro). Not used by solar."""
    positions: list[int] | None = None
    """Explicit gaps K1,K2,...: one new block between base layers K and K+1 for each K
    (for copy methods K may be the last layer: a block after it). Overrides --placement."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the written weights; auto keeps each tensor's input dtype."""
    out_shard_size: str = "5GB"
    """Largest output shard, e.g. 5GB, 500MB, 2GiB."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where new blocks are computed."""
    force: bool = False
    """Replace an existing --out."""
    verify: bool | None = None
    """Check the written model: keys and shapes always; for function-preserving methods also that
    its logits equal the base's. Default: the logits check runs when both models fit comfortably
    in memory. --verify forces it, --no_verify skips all checks."""
    quiet: bool = False
    """No progress bar or summary."""


@dataclass
class EvalConfig:
    """Options of ``tools/eval_ppl.py``."""

    model: str | None = None
    """Checkpoint to evaluate (any HF causal LM directory, or a hub name). Default: the embedded
    SmolLM2-135M."""
    data: str | None = None
    """Text source: a .txt/.md/.jsonl/.json file or a folder of them. Default: the held-out slice
    of the embedded Wikipedia sample."""
    text_field: str = "text"
    """Field holding the text in JSON records."""
    seq_len: int = 512
    """Window length in tokens (each window scores seq_len - 1 tokens)."""
    batch_size: int = 4
    """Windows per forward pass."""
    max_tokens: int | None = 16384
    """Stop after about this many scored tokens (0 or less: the whole source)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto picks cuda when visible."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; auto is fp32 on CPU and bf16 on GPU."""
    output_json: str | None = None
    """Also write the result as JSON to this file."""
    quiet: bool = False
    """No progress bar."""
