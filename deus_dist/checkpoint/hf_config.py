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


def layer_types_of(model_dir: Path, config: dict, arch: Architecture, num_layers: int) -> list | None:
    """Each layer's type as transformers resolves it (``arch.layer_type_list``, e.g. Bamba's
    ``layers_block_type``, derived from ``attn_layer_indices``); None for single-type families."""
    if arch.layer_type_list is None:
        return None
    value = config.get(arch.layer_type_list)
    if not isinstance(value, list):
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(model_dir), arch.layer_type_list, None)
    if not isinstance(value, list) or len(value) != num_layers:
        raise ValueError(f"config field {arch.layer_type_list} does not give one type per layer: {value!r}")
    return list(value)


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
    for name in arch.layer_index_lists:
        indices = config.get(name)
        if isinstance(indices, list):
            # A layer listed here (attention in a hybrid) is listed at its new index; a new block
            # takes its lower source layer's type.
            chosen = set(indices)
            new[name] = [i for i, src in enumerate(plan.layers) if src.base[0] in chosen]
    for name in arch.layer_prefix_counts:
        count = config.get(name)
        if isinstance(count, int) and 0 <= count < L:
            # Layers below `count` behave differently; keep the same base layers on each side.
            new[name] = sum(1 for src in plan.layers if src.base[0] < count)
    if dtype is not None:
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        new[key] = DTYPE_NAMES[dtype]
    return new
