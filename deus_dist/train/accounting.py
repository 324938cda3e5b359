"""What a run's model counts: parameters per decoder layer (all and trainable) and the useful
FLOPs per trained token that MFU divides by (``deus_dist.flops``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deus_dist.flops import flops_per_token

if TYPE_CHECKING:
    from deus_dist.train.setup import TrainSetup


def layer_param_counts(setup: TrainSetup, model) -> tuple[list[float], list[float], int]:
    """Per-layer parameter counts (all, trainable) and the output head's, for MFU: the parameters
    a token uses, so a mixture-of-experts layer's routed experts count num_experts_per_tok / E
    (each token goes through that many of them, forward and backward). Trainable: what the
    engine trains (``requires_grad``; transformers may stack several on-disk tensors into one
    parameter, so names from the trainable set are not the parameters' names)."""
    arch, config = setup.arch, setup.model_config
    n = arch.config_value(config, "num_hidden_layers")
    layers, trainable = [0.0] * n, [0.0] * n
    share = _routed_share(setup, model)
    for name, p in model.named_parameters():
        split = setup.arch.split_name(name)
        if split is not None:
            numel = getattr(p, "ds_numel", p.numel()) * share.get(name, 1.0)
            layers[split[0]] += numel
            trainable[split[0]] += numel if p.requires_grad else 0
    head = arch.config_value(config, "vocab_size") * arch.config_value(config, "hidden_size")
    return layers, trainable, head


def _routed_share(setup: TrainSetup, model) -> dict[str, float]:
    """Parameter name -> the share of it one token uses, for parameters holding routed experts
    (``Architecture.routed_share``; a parameter may stack several on-disk tensors)."""
    arch = setup.arch
    if not arch.experts():
        return {}
    from deus_dist.checkpoint.layout import disk_names

    share = arch.routed_share(setup.model_config)
    out = {}
    for name, sources in disk_names(model).items():
        splits = [arch.split_name(s) for s in sources]
        if splits and all(split is not None and arch.is_routed(split[1]) for split in splits):
            out[name] = share
    return out


def trained_flops_per_token(setup: TrainSetup, model) -> float:
    """FLOPs per trained token of this run's model with its trainable set (for MFU)."""
    layers, trainable, head = layer_param_counts(setup, model)
    return flops_per_token(
        layer_params=layers,
        trainable_layer_params=trainable,
        head_params=head,
        hidden=setup.arch.config_value(setup.model_config, "hidden_size"),
        seq_len=setup.cfg.seq_len,
        embeddings_train=any(n in setup.arch.embeddings for n in setup.trainable),
    )
