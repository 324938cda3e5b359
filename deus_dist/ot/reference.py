"""The authors' released OpT-DeUS fusion (repository voalmciaf/OpT-DeUS, Model/OpT-DeUS.py), as
described below, so users can reproduce the paper's numbers.

Per weight matrix (rows only): cost = Euclidean ``cdist`` between the rows of A and B, plan T =
POT's ``ot.sinkhorn`` with uniform 1/n marginals, reg 0.06, 10,000 iterations, and no n*T
correction; aligned A = T^T A. The MLP inputs (gate, up) are first multiplied by T_o (o_proj's
plan); post_attention_layernorm's gain by 0.5*T_o + 0.5*I; input_layernorm is averaged; every
fused tensor is (aligned A + B) / 2. It runs in float32, the dtype transformers loads the model in
for the released script: on real weights the Sinkhorn kernel then underflows and T is all zeros
(POT warns), which is the behaviour the paper's checkpoints come from. The released code handles
the Llama block only; anything else is refused.
"""

from __future__ import annotations

import time
import warnings

import torch

from deus_dist.errors import UserError

REG = 0.06
NUM_ITER = 10_000
ROWS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
)
MLP_IN = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
HANDLED = (*ROWS, *MLP_IN, "input_layernorm.weight", "post_attention_layernorm.weight")


def check_supported(block_suffixes: list[str], family: str) -> None:
    extra = sorted(set(block_suffixes) - set(HANDLED))
    if extra:
        raise UserError(
            f"--ot_variant reference reproduces the released code, which handles the Llama block "
            f"only; this {family} checkpoint also has {extra}. Use --ot_variant aligned"
        )


def sinkhorn_plan(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """T for one matrix, as the released code computes it; and whether POT warned."""
    import ot

    m = torch.cdist(w1, w2, p=2)
    n1, n2 = w1.shape[0], w2.shape[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ot.sinkhorn(
            torch.ones(n1, device=w1.device) / n1,
            torch.ones(n2, device=w1.device) / n2,
            m,
            REG,
            numItermax=NUM_ITER,
        )
    return t, any("numerical errors" in str(w.message) for w in caught)


def reference_fuse(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The fused block (before o/down are zeroed) and diagnostics per matrix."""
    a = {k: v.to(torch.float32) for k, v in a.items()}
    b = {k: v.to(torch.float32) for k, v in b.items()}
    fused, plans, report = {}, {}, {}
    order = ["input_layernorm.weight", *ROWS, "post_attention_layernorm.weight", *MLP_IN]
    for key in order:
        w1, w2 = a[key], b[key]
        start = time.perf_counter()
        if key == "input_layernorm.weight":
            fused[key] = (w1 + w2) / 2
            continue
        if key == "post_attention_layernorm.weight":
            t_o = plans["self_attn.o_proj.weight"]
            blend = 0.5 * t_o + 0.5 * torch.eye(t_o.shape[0], device=t_o.device)
            fused[key] = (w1 @ blend + w2) / 2
            continue
        if key in MLP_IN:
            w1 = w1 @ plans["self_attn.o_proj.weight"]
        t, warned = sinkhorn_plan(w1, w2)
        plans[key] = t
        fused[key] = (t.T @ w1 + w2) / 2
        n = t.shape[0]
        report[key] = {
            "solver": "pot-sinkhorn-reference",
            "seconds": round(time.perf_counter() - start, 4),
            "plan_mass": float(t.sum()),
            "sharpness": float((t * n).max(dim=1).values.mean()),
            "numerical_warning": warned,
        }
    return fused, report
