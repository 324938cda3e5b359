"""Names on disk and names in memory.

transformers 5 regroups some checkpoints' tensors when it loads them, by its conversion mapping
(``transformers/conversion_mapping.py``): the per-expert weights of a mixture-of-experts block are
stacked into one parameter (Mixtral's ``block_sparse_moe.experts.N.w1/w3.weight`` become
``mlp.experts.gate_up_proj`` [E, 2I, H]), and ``save_pretrained`` reverses it. The tool reads and
writes the on-disk layout; training works on the model's parameters. Both directions here use
transformers' own reverse conversion, on meta tensors where only names and shapes matter; for a
family without a conversion mapping they are the identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deus_dist.errors import UserError


def on_disk_state_dict(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` (default: the model's state dict), keyed by the model's names, as
    ``save_pretrained`` would write them: on-disk names and shapes. ``model`` may be on meta."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict() if tensors is None else tensors)


def disk_names(model) -> dict[str, list[str]]:
    """Each parameter's name -> the names of the on-disk tensors it is loaded from. Works under
    ZeRO-3 (a partitioned parameter's full shape is its ``ds_shape``)."""
    out = {}
    for name, p in model.named_parameters():
        meta = torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta")
        out[name] = sorted(on_disk_state_dict(model, {name: meta}))
    return out


def parameters_holding(model, chosen: Iterable[str], option: str = "--trainable") -> list[str]:
    """The model's parameters that hold the on-disk tensors ``chosen``, in model order. A parameter
    only some of whose tensors are chosen cannot train alone (transformers stacks them): refused,
    naming it."""
    chosen = set(chosen)
    picked, partial = [], []
    for name, sources in disk_names(model).items():
        hit = [s for s in sources if s in chosen]
        if hit and len(hit) < len(sources):
            partial.append(
                f"{name} (holds {sources[0]} ... {sources[-1]}, {len(hit)} of {len(sources)} chosen)"
            )
        elif hit:
            picked.append(name)
    if partial:
        raise UserError(
            f"{option}: transformers stacks these tensors into one parameter, so they train together or "
            f"not at all: {'; '.join(partial[:3])}"
        )
    return picked


def meta_model(model_dir):
    """The transformers model of a checkpoint's config, with no memory (``meta_model_from_config``)."""
    from transformers import AutoConfig

    from deus_dist.hf_logging import quiet_transformers

    with quiet_transformers():
        return meta_model_from_config(AutoConfig.from_pretrained(model_dir))


def meta_model_from_config(config):
    """The transformers model of ``config`` (a ``PretrainedConfig``), with no memory (meta tensors).

    Built outside any live ZeRO-3 context (a training run's HfDeepSpeedConfig): there
    ``from_config`` would partition the parameters with collectives, and rank 0 exporting alone
    would wait for the other ranks forever."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    from deus_dist.hf_logging import quiet_transformers

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    finally:
        if live is not None:
            hf_deepspeed.set_hf_deepspeed_config(live)


def names_as_loaded(model_dir, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """How ``from_pretrained`` reads a checkpoint's tensor names, for one saved another way than
    ``save_pretrained`` writes: (stored -> loaded name for those that differ, stored names it
    ignores). Two cases, both as transformers 5 loads them (``modeling_utils``):

    - a base-model checkpoint, whose names lack the task model's ``base_model_prefix``
      (openai-community/gpt2 stores ``h.0.attn.c_attn.weight`` for ``transformer.h.0...``): the
      prefix is added;
    - tensors the model ignores on load (``_keys_to_ignore_on_load_unexpected`` of the model and its
      modules, such as GPT-2's and GPT-NeoX's causal-mask buffers ``attn.bias``, and the per-layer
      ``rotary_emb.inv_freq`` of older checkpoints, by ``_adjust_missing_and_unexpected_keys``).

    Any other unknown name is kept as it is (the block description judges it)."""
    from transformers.utils.loading_report import LoadStateDictInfo

    model = meta_model(model_dir)
    expected = set(on_disk_state_dict(model))
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None
    renamed, unknown = {}, set()
    for name in names:
        if name in expected:
            continue
        if prefix and prefix + name in expected:
            renamed[name] = prefix + name
        else:
            unknown.add(name)
    info = LoadStateDictInfo(
        missing_keys=set(),
        unexpected_keys=set(unknown),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    model._adjust_missing_and_unexpected_keys(info)  # drops what the model ignores on load
    return renamed, sorted(unknown - info.unexpected_keys)


def read_as_loaded(reader):
    """``reader`` (a CheckpointReader of a model directory) presenting its tensors under the names
    transformers loads them as (``names_as_loaded``); returned for chaining."""
    renamed, dropped = names_as_loaded(reader.path, reader.tensors)
    if renamed or dropped:
        reader.adopt_names(renamed, dropped)
    return reader


def to_disk_layout(model_dir, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters keyed by the model's names (a training checkpoint's) as the on-disk tensors of the
    checkpoint in ``model_dir``: stacked experts split back into one tensor per expert."""
    return {k: v.contiguous() for k, v in on_disk_state_dict(meta_model(model_dir), tensors).items()}
