"""LESA on tiny real models: loads, seeded, norms from the neighbours, weights predicted (not copied)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import NEW_FAMILIES, fuse, load_manifest, make_tiny, state_dict
from deus_dist.architectures import architecture_for


def test_lesa_tiny(tmp_path):
    base = make_tiny(tmp_path / "base", "qwen2", num_hidden_layers=6)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert fuse("--model", base, "--out", out, "--method", "lesa", "--seed", "3", "--quiet") == 0
    a, b = state_dict(outs[0]), state_dict(outs[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded: same checkpoint

    m = load_manifest(outs[0])
    assert (
        m["method"] == "lesa"
        and m["new_layers"] == [3, 5, 7]
        and set(m["diagnostics"]["fit_loss"]) >= {"mlp.up_proj.weight", "self_attn.q_proj.weight"}
    )
    _, info = AutoModelForCausalLM.from_pretrained(outs[0], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    base_sd = state_dict(base)
    for new, (lo, hi) in zip(m["new_layers"], [(2, 3), (3, 4), (4, 5)], strict=True):
        for s in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.bias"):
            want = 0.5 * (base_sd[f"model.layers.{lo}.{s}"] + base_sd[f"model.layers.{hi}.{s}"])
            torch.testing.assert_close(a[f"model.layers.{new}.{s}"], want)
        w = a[f"model.layers.{new}.mlp.up_proj.weight"]
        assert w.abs().sum() > 0
        for k in (lo, hi):
            assert not torch.allclose(w, base_sd[f"model.layers.{k}.mlp.up_proj.weight"], atol=1e-3)

    other = tmp_path / "c"
    assert fuse("--model", base, "--out", other, "--method", "lesa", "--seed", "4", "--quiet") == 0
    c = state_dict(other)
    assert not torch.equal(c["model.layers.3.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_lesa_on_every_new_family(tmp_path, family):
    """Fused (Phi-3), Conv1D (GPT-2) and biased (GPT-NeoX) blocks: every matrix predicted, the
    output loads with no missing or unexpected keys."""
    base = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", "lesa", "--num_new", "2", "--quiet") == 0
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    arch = architecture_for(json.loads((base / "config.json").read_text()))
    m, base_sd, sd = load_manifest(out), state_dict(base), state_dict(out)
    fitted = set(m["diagnostics"]["fit_loss"])
    assert fitted == {
        s for s in arch.block if s.endswith(".weight") and base_sd[arch.layer_name(0, s)].ndim == 2
    }
    for new in m["new_layers"]:
        for s in fitted:
            w = sd[arch.layer_name(new, s)]
            assert w.shape == base_sd[arch.layer_name(0, s)].shape and w.abs().sum() > 0
