"""Mixture-of-experts families (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE with its shared expert) on
tiny real transformers models: experts aligned as units with their router rows, every method
runs or refuses clearly, and the written checkpoint is transformers' own on-disk layout."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    MOE_FAMILIES,
    fuse,
    layer_outputs,
    load_manifest,
    make_tiny,
    permutation_of_moe_layer,
    state_dict,
)
from deus_dist.architectures import architecture_for

K = 2  # the permuted pair is base layers K and K+1; the new block is output layer K+1


def loads_cleanly(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def logits(model, seed=1):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_permuted_moe_layer_is_recovered(tmp_path, family):
    """Layer K+1 := layer K with experts (and router rows), neurons inside every expert, KV groups,
    query heads (and a shared expert's neurons) permuted: fused with layer K it gives layer K back."""
    base = make_tiny(tmp_path / "base", family)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    permutation_of_moe_layer(model, K, K + 1)
    model.save_pretrained(base)
    h = torch.randn(2, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    want = layer_outputs(model, model.model.layers[K], h)
    # the construction is right: the permuted layer computes the same function
    torch.testing.assert_close(layer_outputs(model, model.model.layers[K + 1], h), want, atol=1e-5, rtol=0)
    # the experts are really out of order (the test has teeth)
    a, b = model.model.layers[K].mlp.gate.weight, model.model.layers[K + 1].mlp.gate.weight
    assert not torch.equal(a, b)

    out = tmp_path / "fused"
    args = ["--model", base, "--positions", K, "--no_zero_init", "--ot_solver", "exact", "--quiet"]
    assert fuse(*args, "--out", out) == 0
    fused = loads_cleanly(out)
    assert (layer_outputs(fused, fused.model.layers[K + 1], h) - want).abs().max().item() < 1e-4
    diag = load_manifest(out)["diagnostics"][f"{K}-{K + 1}"]
    assert diag["experts"]["units"] == 4 and diag["experts"]["sharpness"] == 1.0
    spaces = ["experts", "expert_mlp", "kv_heads", "q_heads"] + (["mlp"] if family == "qwen2_moe" else [])
    for space in spaces:
        assert diag[space]["matched_similarity"] > 0.999, space
    assert diag["experts"]["identity_similarity"] < 0.9
    assert diag["expert_mlp"]["extra"]["plans_solved"] == 16  # E^2 pair plans, the matched ones kept

    # contrast: averaging experts in order mixes unrelated experts and neurons
    avg = tmp_path / "avg"
    assert fuse("--model", base, "--out", avg, "--positions", K, "--method", "avg", "--quiet") == 0
    averaged = loads_cleanly(avg)
    assert (layer_outputs(averaged, averaged.model.layers[K + 1], h) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("cost, plans", [("weights", 16), ("router", 4)])
def test_every_expert_cost_recovers_the_permutation(tmp_path, cost, plans):
    """Weights alone (neuron OT inside each of the E^2 pairs) and router rows alone (E neuron
    plans, for the matched pairs only) both find the permuted experts."""
    base = make_tiny(tmp_path / "base", "mixtral")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    permutation_of_moe_layer(model, K, K + 1, seed=4)
    model.save_pretrained(base)
    out = tmp_path / "fused"
    args = ["--model", base, "--out", out, "--positions", K, "--no_zero_init", "--quiet"]
    assert fuse(*args, "--ot_solver", "exact", "--ot_expert_cost", cost) == 0
    m = load_manifest(out)
    assert m["params"]["ot_expert_cost"] == cost
    diag = m["diagnostics"][f"{K}-{K + 1}"]
    assert diag["experts"]["matched_similarity"] > 0.999 and diag["experts"]["extra"]["cost"] == cost
    assert diag["expert_mlp"]["extra"]["plans_solved"] == plans
    fused = loads_cleanly(out)
    h = torch.randn(1, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    want = layer_outputs(model, model.model.layers[K], h)
    assert (layer_outputs(fused, fused.model.layers[K + 1], h) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["opt-deus", "llama-pro"])
def test_zero_init_moe_block_changes_no_logit(tmp_path, family, method):
    base = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", method, "--verify", "--quiet") == 0
    assert torch.equal(logits(loads_cleanly(base)), logits(loads_cleanly(out)))
    m = load_manifest(out)
    arch = architecture_for(json.loads((base / "config.json").read_text()))
    sd = state_dict(out)
    downs = [s for s, r in arch.block.items() if r.output and r.expert is not None]
    assert len(downs) == 4
    for i in m["new_layers"]:
        for s in arch.output_suffixes():  # every expert's down (and the shared expert's) is zero
            name = arch.layer_name(i, s)
            if name in sd:
                assert not sd[name].any(), name
        router = next(s for s, r in arch.block.items() if r.rows == "experts")
        assert sd[arch.layer_name(i, router)].any()
    if method == "opt-deus":  # small experts: the exact assignment stands in for the default auction
        assert {d["expert_mlp"]["solver"] for d in m["diagnostics"].values()} == {"exact"}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_opt_deus_router_is_the_aligned_average(tmp_path, family):
    """The new block's router rows are the average of A's rows (in B's expert order) and B's."""
    base = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--positions", K, "--ot_solver", "exact", "--quiet") == 0
    arch = architecture_for(json.loads((base / "config.json").read_text()))
    router = next(s for s, r in arch.block.items() if r.rows == "experts")
    base_sd, out_sd = state_dict(base), state_dict(out)
    ra, rb = (base_sd[arch.layer_name(k, router)].float() for k in (K, K + 1))
    new = out_sd[arch.layer_name(K + 1, router)].float()
    aligned_a = 2 * new - rb
    # aligned A's router rows are A's rows in some order, each used once
    order = torch.cdist(aligned_a, ra).argmin(dim=1)
    assert sorted(order.tolist()) == list(range(len(ra)))
    torch.testing.assert_close(aligned_a, ra[order], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lesa_on_moe_predicts_each_expert_from_its_neighbours(tmp_path, family):
    base = make_tiny(tmp_path / "base", family, num_hidden_layers=4)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", "lesa", "--quiet") == 0
    loads_cleanly(out)
    m = load_manifest(out)
    arch = architecture_for(json.loads((base / "config.json").read_text()))
    fitted = set(m["diagnostics"]["fit_loss"])
    assert {s for s, r in arch.block.items() if r.expert is not None} <= fitted


@pytest.mark.parametrize(
    "options, words",
    [
        (["--ot_cost", "activations"], ["--ot_cost", "mixture-of-experts", "--ot_cost weights"]),
        (["--ot_variant", "reference"], ["--ot_variant", "block_sparse_moe"]),
        (["--method", "avg", "--ot_expert_cost", "router"], ["--ot_expert_cost", "opt-deus"]),
    ],
)
def test_moe_refusals_name_the_option(tmp_path, capsys, options, words):
    base = make_tiny(tmp_path / "base", "mixtral")
    capsys.readouterr()
    assert fuse("--model", base, "--out", tmp_path / "o", *options) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_layers_of_another_kind_are_refused_naming_the_config_field(tmp_path, capsys):
    base = make_tiny(tmp_path / "base", "qwen2_moe", mlp_only_layers=[1])
    capsys.readouterr()
    assert fuse("--model", base, "--out", tmp_path / "o", "--method", "copy") == 2
    err = capsys.readouterr().err
    assert "mlp_only_layers" in err and "qwen2_moe" in err


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_study_budget_counts_the_experts_a_token_uses(tmp_path, family):
    """FLOPs count a routed expert by num_experts_per_tok / E, as MFU does; parameter counts keep
    every expert (all of them train)."""
    from deus_dist.study.budget import base_shape

    base = make_tiny(tmp_path / "base", family)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = model.config
    layer = dict(model.model.layers[0].named_parameters())
    routed = sum(p.numel() for n, p in layer.items() if ".experts." in f".{n}")
    rest = sum(p.numel() for n, p in layer.items() if ".experts." not in f".{n}")
    assert routed and rest  # the test has teeth: experts and attention both there
    experts = next(getattr(config, f) for f in ("num_local_experts", "num_experts") if hasattr(config, f))
    shape = base_shape(base)
    assert shape.layer_params[0] == routed + rest
    assert shape.flop_params[0] == pytest.approx(rest + routed * config.num_experts_per_tok / experts)
    assert config.num_experts_per_tok < experts
