"""Checks run on a written checkpoint before it gets its final name.

- keys and shapes: the model transformers builds from the written config (on the meta device, so
  no memory) must have exactly the written tensors, tied weights aside, in the layout
  ``save_pretrained`` writes (transformers 5 regroups some checkpoints' tensors in memory, such
  as per-expert MoE weights into stacked ones; its own reverse conversion gives the on-disk names);
- logits: for function-preserving methods, the up-scaled model's logits on a probe input must
  equal the base model's (both loaded in float32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from deus_dist.checkpoint import CheckpointReader
from deus_dist.checkpoint.layout import on_disk_state_dict
from deus_dist.hf_logging import quiet_transformers


def check_keys_and_shapes(model_dir: Path) -> None:
    """Raise RuntimeError naming the first differences between the files and transformers' model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    # On-disk names and shapes by transformers' own reverse conversion: its renamings (GPT-NeoX's
    # lm_head is embed_out on disk) and its regrouping (stacked experts written one per expert).
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in on_disk_state_dict(model, state).items()}
    tied_names = [k for k in (getattr(model, "all_tied_weights_keys", None) or {}) if k in state]
    tied = set(on_disk_state_dict(model, {k: state[k] for k in tied_names})) if tied_names else set()
    reader = CheckpointReader(model_dir, option="written checkpoint")
    written = {k: tuple(v.shape) for k, v in reader.tensors.items()}
    missing = sorted(set(expected) - set(written) - tied)
    unexpected = sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"written checkpoint does not match {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        raise RuntimeError("written config: layer_types does not have num_hidden_layers entries")


def model_bytes_fp32(reader: CheckpointReader) -> int:
    return sum(t.nbytes // t.dtype.itemsize * 4 for t in reader.tensors.values())


def fits_in_memory(nbytes: int, fraction: float = 0.4) -> bool:
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = 0
    return nbytes < fraction * available


def probe_logits(
    model_dir: Path, input_ids: torch.Tensor, round_to: torch.dtype | None = None
) -> torch.Tensor:
    """Float32 logits; ``round_to`` first rounds the weights to that dtype (as a conversion would)."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=round_to or torch.float32)
    model.float().eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def check_logits_equal(
    base_dir: Path, out_dir: Path, vocab_size: int, atol: float = 1e-4, out_dtype: torch.dtype | None = None
) -> float:
    """Max |logit difference| between base and up-scaled on a fixed probe; RuntimeError above atol.

    With ``out_dtype`` (a --dtype conversion) the base is compared with its weights rounded the same way.
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 24), generator=gen)
    base = probe_logits(base_dir, ids, round_to=out_dtype)
    out = probe_logits(out_dir, ids)
    diff = (base - out).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(
            f"the up-scaled model's logits differ from the base's by up to {diff:.3g} (> {atol}); "
            "the method should preserve the function"
        )
    return diff
