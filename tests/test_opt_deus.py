"""OpT-DeUS: the properties the alignment must have, on tiny real models (GQA and MHA; Llama and Qwen3)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    HYBRID,
    NEW_FAMILIES,
    add_char_tokenizer,
    fuse,
    layer_outputs,
    load_manifest,
    make_tiny,
    permutation_of_layer,
    permute_layer_by_description,
    state_dict,
)
from deus_dist.architectures import architecture_for
from deus_dist.ot.align import HeadGeometry, SolverSettings, align_block

SHAPES = {
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen3-gqa": ("qwen3", dict(num_attention_heads=6, num_key_value_heads=2)),
}
K = 2  # the permuted pair is base layers K and K+1; the new block is output layer K+1


def permuted_base(tmp_path, shape: str):
    family, kw = SHAPES[shape]
    path = make_tiny(tmp_path / "base", family, **kw)
    model = AutoModelForCausalLM.from_pretrained(path)
    permutation_of_layer(model, K, K + 1)
    model.save_pretrained(path)
    add_char_tokenizer(path)
    return path, model


def fuse_pair(base, out, *options) -> int:
    """Fuse base layers K and K+1 into one new block, keeping its fused o/down (no zero-init)."""
    return fuse("--model", base, "--out", out, "--positions", K, "--no_zero_init", "--quiet", *options)


def new_block_matches_a(base_model, out_dir) -> float:
    out = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    hidden = torch.randn(2, 12, base_model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    want = layer_outputs(base_model, base_model.model.layers[K], hidden)
    got = layer_outputs(out, out.model.layers[K + 1], hidden)
    return (want - got).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_is_recovered(tmp_path, shape, cost):
    base, model = permuted_base(tmp_path, shape)
    model.eval()
    # the permuted layer computes the same function as A (the construction is right)
    h = torch.randn(1, 8, model.config.hidden_size)
    assert torch.allclose(
        layer_outputs(model, model.model.layers[K], h),
        layer_outputs(model, model.model.layers[K + 1], h),
        atol=1e-5,
    )
    out = tmp_path / "fused"
    assert fuse_pair(base, out, "--ot_solver", "exact", "--ot_cost", cost, "--calib_tokens", "256") == 0
    assert new_block_matches_a(model, out) < 1e-4
    diag = load_manifest(out)["diagnostics"][f"{K}-{K + 1}"]
    for space in ("mlp", "kv_heads", "q_heads"):
        assert diag[space]["sharpness"] == 1.0
        assert diag[space]["matched_similarity"] > 0.999
    # contrast: plain averaging mixes unrelated units and does not compute A's function
    avg = tmp_path / "avg"
    assert fuse("--model", base, "--out", avg, "--positions", K, "--method", "avg", "--quiet") == 0
    assert new_block_matches_a(model, avg) > 1e-2


def model_logits(model, ids) -> torch.Tensor:
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", [*NEW_FAMILIES, HYBRID])  # Bamba: K, K+1 are its attention pair
@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_is_recovered_in_every_family(tmp_path, family, cost):
    """Layer K+1 := layer K with every space the description names permuted (fused blocks,
    NeoX's per-head interleaving, Conv1D layouts): the fused pair must compute layer K's
    function, i.e. the up-scaled model equals the one with a plain copy of layer K inserted."""
    path = make_tiny(tmp_path / "base", family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    arch = architecture_for(model.config.to_dict())
    twin = copy.deepcopy(model)
    twin_layers = twin.get_submodule(arch.layer_prefix.rstrip("."))
    twin_layers[K + 1].load_state_dict(twin_layers[K].state_dict())
    permute_layer_by_description(model, K, K + 1, seed=1)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    # the description is right: the permuted layer computes layer K's function...
    torch.testing.assert_close(model_logits(model, ids), model_logits(twin, ids), atol=1e-5, rtol=1e-5)
    # ...and the permutation moved every space (not an identity)
    layers = model.get_submodule(arch.layer_prefix.rstrip("."))
    before = layers[K].state_dict()
    moved = [s for s, t in layers[K + 1].state_dict().items() if not torch.equal(t, before[s])]
    assert {"mlp", "kv_heads", "q_heads"} <= set().union(*(arch.block[s].spaces() for s in moved))
    model.save_pretrained(path)
    add_char_tokenizer(path)
    fused, copied = tmp_path / "fused", tmp_path / "copied"
    assert fuse_pair(path, fused, "--ot_solver", "exact", "--ot_cost", cost, "--calib_tokens", "256") == 0
    assert fuse("--model", path, "--out", copied, "--method", "copy", "--positions", K, "--quiet") == 0
    want = model_logits(copied, ids)
    assert (model_logits(fused, ids) - want).abs().max().item() < 1e-4
    diag = load_manifest(fused)["diagnostics"][f"{K}-{K + 1}"]
    assert all(diag[space]["sharpness"] == 1.0 for space in ("mlp", "kv_heads", "q_heads"))
    # contrast: plain averaging of the unaligned pair does not give layer K's function
    avg = tmp_path / "avg"
    assert fuse("--model", path, "--out", avg, "--positions", K, "--method", "avg", "--quiet") == 0
    assert (model_logits(avg, ids) - want).abs().max().item() > 1e-3


def blocks(path, layers):
    sd = state_dict(path)
    arch = architecture_for(json.loads((path / "config.json").read_text()))
    out = []
    for k in layers:
        out.append({s: sd[arch.layer_name(k, s)].float() for s in arch.block if arch.layer_name(k, s) in sd})
    return arch, out


@pytest.mark.parametrize("solver", ["auction", "exact", "sinkhorn", "emd"])
def test_identical_pair_gives_the_layer_back(tmp_path, solver):
    path = make_tiny(tmp_path / "base", "llama")
    arch, (a,) = blocks(path, [1])
    geo = HeadGeometry.from_config(json.loads((path / "config.json").read_text()))
    aligned, reports = align_block(a, copy.deepcopy(a), arch, geo, SolverSettings(solver, reg=0.001))
    for s in a:
        torch.testing.assert_close(aligned[s], a[s], atol=1e-4, rtol=1e-4)
    assert all(r.sharpness > 0.99 for r in reports.values())


# The optimum is permutation-equivariant; the auction at its default tolerance is only near the
# optimum (it may settle on another near-optimal plan), so it is run to a tight tolerance here.
@pytest.mark.parametrize("solver", [["--ot_solver", "exact"], ["--ot_solver", "auction", "--ot_tol", "1e-6"]])
def test_permuting_b_does_not_change_the_fused_function(tmp_path, solver):
    path = make_tiny(tmp_path / "base", "llama", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    # a second base whose layer 2 (B of the pair 1-2) is a permutation of the first's
    helper = copy.deepcopy(model)
    permutation_of_layer(helper, 2, 3, seed=11)  # helper's layer 3 := perm(layer 2)
    permuted = copy.deepcopy(model)
    permuted.model.layers[2].load_state_dict(helper.model.layers[3].state_dict())
    ref = tmp_path / "perm"
    permuted.save_pretrained(ref)
    outs = []
    for src, name in ((path, "f1"), (ref, "f2")):
        out = tmp_path / name
        # the new block fuses A = layer 1 with B = layer 2 (B' in the second model)
        assert (
            fuse("--model", src, "--out", out, "--positions", "1", "--no_zero_init", "--quiet", *solver) == 0
        )
        outs.append(AutoModelForCausalLM.from_pretrained(out).eval())
    h = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    y1 = layer_outputs(outs[0], outs[0].model.layers[2], h)
    y2 = layer_outputs(outs[1], outs[1].model.layers[2], h)
    assert (y1 - y2).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text", "mistral", *NEW_FAMILIES])
def test_zero_init_keeps_logits(tmp_path, family):
    path = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", path, "--out", out, "--verify", "--quiet") == 0  # verify compares logits
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    assert torch.equal(a, b)
    m = load_manifest(out)
    assert m["method"] == "opt-deus" and set(m["diagnostics"]) == {f"{k}-{k + 1}" for k in range(2, 5)}


def test_sinkhorn_with_small_reg_approaches_exact(tmp_path):
    base, model = permuted_base(tmp_path, "llama-gqa")
    out = tmp_path / "sk"
    assert fuse_pair(base, out, "--ot_solver", "sinkhorn", "--ot_reg", "0.002") == 0
    diag = load_manifest(out)["diagnostics"][f"{K}-{K + 1}"]
    assert all(diag[s]["sharpness"] > 0.95 for s in ("mlp", "kv_heads", "q_heads"))
    assert new_block_matches_a(model, out) < 1e-2


def test_reference_matches_the_released_math(tmp_path):
    """An independent re-computation of the released code's fusion, from reference.py's description."""
    import ot

    path = make_tiny(tmp_path / "base", "llama", num_hidden_layers=2)
    out = tmp_path / "ref"
    args = ["--model", path, "--positions", "0", "--ot_variant", "reference", "--quiet"]
    assert fuse(*args, "--out", out, "--no_zero_init") == 0
    arch, (a, b) = blocks(path, [0, 1])
    _, (fused,) = blocks(out, [1])

    def plan(w1, w2):  # per matrix, rows only: Sinkhorn on cdist, reg 0.06, 1/n marginals, no n*T
        n1, n2 = w1.shape[0], w2.shape[0]
        return ot.sinkhorn(
            torch.ones(n1) / n1, torch.ones(n2) / n2, torch.cdist(w1, w2), 0.06, numItermax=10000
        )

    expected = {"input_layernorm.weight": (a["input_layernorm.weight"] + b["input_layernorm.weight"]) / 2}
    for key in (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
    ):
        t = plan(a[key], b[key])
        expected[key] = (t.T @ a[key] + b[key]) / 2
    t_o = plan(a["self_attn.o_proj.weight"], b["self_attn.o_proj.weight"])
    assert t_o.sum() > 0.99  # on these weights the plan is a real one, so the test has teeth
    key = "post_attention_layernorm.weight"
    expected[key] = (a[key] @ (0.5 * t_o + 0.5 * torch.eye(t_o.shape[0])) + b[key]) / 2
    for key in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        w1 = a[key] @ t_o
        expected[key] = (plan(w1, b[key]).T @ w1 + b[key]) / 2
    assert set(expected) == set(fused)
    for key, want in expected.items():
        torch.testing.assert_close(fused[key], want, atol=1e-6, rtol=1e-5, msg=key)

    zeroed = tmp_path / "ref0"
    assert fuse(*args, "--out", zeroed) == 0  # default: o/down zeroed, logits kept (verified)
    _, (z,) = blocks(zeroed, [1])
    assert not z["self_attn.o_proj.weight"].any() and not z["mlp.down_proj.weight"].any()
    torch.testing.assert_close(z["mlp.up_proj.weight"], expected["mlp.up_proj.weight"], atol=1e-6, rtol=1e-5)


def test_reference_refuses_blocks_the_released_code_does_not_handle(tmp_path, capsys):
    path = make_tiny(tmp_path / "base", "qwen3")
    capsys.readouterr()
    assert fuse("--model", path, "--out", tmp_path / "o", "--ot_variant", "reference") == 2
    err = capsys.readouterr().err
    assert "--ot_variant" in err and "q_norm" in err


def test_bad_ot_options(tmp_path, capsys, tiny_llama):
    capsys.readouterr()
    assert fuse("--model", tiny_llama, "--out", tmp_path / "o", "--fuse_weight", "2", "--ot_reg", "0") == 2
    err = capsys.readouterr().err
    assert "--fuse_weight" in err and "--ot_reg" in err
    assert fuse("--model", tiny_llama, "--out", tmp_path / "o", "--ot_cost", "activations") == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
