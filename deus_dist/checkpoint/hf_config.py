"""Rewriting an HF ``config.json`` for a new layer layout."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from deus_dist.architectures import Architecture
from deus_dist.plan import LayerPlan

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def config_hash(config: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def resolved_per_layer_lists(model_dir: Path, config: dict, arch: Architecture) -> dict[str, list]:
    """Per-layer lists as transformers resolves them (e.g. ``layer_types`` derived from a sliding
    window pattern when config.json does not spell it out)."""
    out = {}
    missing = [f for f in arch.per_layer_lists if not isinstance(config.get(f), list)]
    if missing:
        from transformers import AutoConfig

        resolved = AutoConfig.from_pretrained(model_dir)
        for name in missing:
            value = getattr(resolved, name, None)
            if isinstance(value, list):
                out[name] = list(value)
    for name in arch.per_layer_lists:
        if isinstance(config.get(name), list):
            out[name] = config[name]
    return out


def rewrite_config(
    config: dict,
    per_layer: dict[str, list],
    arch: Architecture,
    plan: LayerPlan,
    dtype: torch.dtype | None,
) -> dict:
    """The output config: layer count and every per-layer field follow the plan.

    A new block takes the per-layer settings (attention type, ...) of its lower source layer.
    ``dtype`` (when not None) is recorded as the weights' dtype.
    """
    L = plan.num_layers_before
    new = copy.deepcopy(config)
    new[arch.config_key("num_hidden_layers")] = plan.num_layers_after
    for name, values in per_layer.items():
        if len(values) != L:
            raise ValueError(f"config field {name} has {len(values)} entries for {L} layers")
        new[name] = [values[src.base[0]] for src in plan.layers]
    for name in arch.layer_prefix_counts:
        count = config.get(name)
        if isinstance(count, int) and 0 <= count < L:
            # Layers below `count` behave differently; keep the same base layers on each side.
            new[name] = sum(1 for src in plan.layers if src.base[0] < count)
    if dtype is not None:
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        new[key] = DTYPE_NAMES[dtype]
    return new
