"""What a run's model counts: parameters per decoder layer (all and trainable) and the useful
FLOPs per trained token that MFU divides by (``deus_dist.flops``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deus_dist.flops import flops_per_token

if TYPE_CHECKING:
    from deus_dist.train.setup import TrainSetup


def layer_param_counts(setup: TrainSetup, model) -> tuple[list[int], list[int], int]:
    """Per-layer parameter counts (all, trainable) and the output head's, for MFU."""
    arch, config = setup.arch, setup.model_config
    n = arch.config_value(config, "num_hidden_layers")
    layers, trainable = [0] * n, [0] * n
    chosen = set(setup.trainable)
    for name, p in model.named_parameters():
        split = setup.arch.split_name(name)
        if split is not None:
            numel = getattr(p, "ds_numel", p.numel())
            layers[split[0]] += numel
            trainable[split[0]] += numel if name in chosen else 0
    head = arch.config_value(config, "vocab_size") * arch.config_value(config, "hidden_size")
    return layers, trainable, head


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
