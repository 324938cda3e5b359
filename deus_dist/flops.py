"""Useful matmul FLOPs per trained token of a model with frozen layers: what MFU divides by, and
what the study spends equally across arms.

Counted: the forward of every layer and the head; the backward's input gradients only from the
lowest trainable layer up (autograd stops below it); weight gradients only for trainable
parameters; attention scores and the weighted sum of values included, halved for the causal mask
(a token attends to the positions before it: on average half the sequence).
"""

from __future__ import annotations


def flops_per_token(
    *,
    layer_params: list[int],
    trainable_layer_params: list[int],
    head_params: int,
    hidden: int,
    seq_len: int,
    embeddings_train: bool,
) -> float:
    """Matmul FLOPs per trained token of one forward + backward (see the module docstring)."""
    n_layers = len(layer_params)
    # scores (QK^T) and weighted values (AV), per layer per token, forward: 2 * 2 * seq * hidden
    # over the full square, half of it under the causal mask
    attn = 2 * seq_len * hidden
    forward = sum(2 * p + attn for p in layer_params) + 2 * head_params
    trainable_layers = [i for i, p in enumerate(trainable_layer_params) if p]
    lowest = 0 if embeddings_train else (min(trainable_layers) if trainable_layers else n_layers)
    input_grads = sum(2 * p + 2 * attn for p in layer_params[lowest:]) + 2 * head_params
    weight_grads = 2 * sum(trainable_layer_params) + (2 * head_params if embeddings_train else 0)
    return float(forward + input_grads + weight_grads)
