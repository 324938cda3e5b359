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
    method: str = "opt-deus"
    """How a new block is made: opt-deus, avg, copy, llama-pro, solar, lesa (see the README)."""
    num_new: int | None = None
    """How many new blocks. Default: L/2 (for solar: L - 2*floor(L/4))."""
    placement: Literal["top", "bottom", "middle", "top-bottom", "interleaved"] | None = None
    """Which gaps get the new blocks. Default: the method's (top for opt-deus/avg/copy/lesa,
    interleaved for llama-pro). Not used by solar."""
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
    ot_variant: Literal["aligned", "reference"] = "aligned"
    """opt-deus: 'aligned' transports whole KV groups, query heads and MLP neurons (one plan per
    space); 'reference' reproduces the authors' released code (per-matrix Sinkhorn, reg 0.06)."""
    ot_solver: Literal["exact", "knn", "sinkhorn", "emd"] = "exact"
    """opt-deus: the transport solver: exact (dense assignment), knn (assignment on each unit's
    --ot_knn nearest candidates: 15-20x faster on well-spread costs, but its sparse solver can stall
    on near-uniform costs), sinkhorn (log-domain entropic), or emd (POT's network simplex)."""
    ot_knn: int = 128
    """Candidates per unit for --ot_solver knn (exact when 2 * ot_knn >= units)."""
    ot_reg: float = 0.01
    """Sinkhorn regulariser, relative to the mean cost."""
    ot_max_iter: int = 2000
    """Iteration cap of sinkhorn (and the floor of emd's)."""
    ot_cost: Literal["weights", "activations"] = "weights"
    """opt-deus: unit features from weights, or from the base model's activations on calibration
    text (computed one layer at a time)."""
    calib_data: str | None = None
    """Calibration text for --ot_cost activations (a .txt/.jsonl/.json file or folder). Default: the
    training slice of the embedded Wikipedia sample."""
    calib_tokens: int = 2048
    """Calibration tokens for --ot_cost activations."""
    fuse_weight: float = 0.5
    """opt-deus: fused = (1 - t) * aligned A + t * B, with t this value."""
    zero_init: bool = True
    """opt-deus: zero o_proj and down_proj of new blocks, so the up-scaled model computes exactly
    what the base did (--no_zero_init keeps the fused values)."""
    seed: int = 0
    """Seed of methods that train or sample (lesa)."""


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
