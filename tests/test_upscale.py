"""The up-scaling tool on tiny real transformers models of every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILIES, HYBRID, MOE_FAMILIES, fuse, load_manifest, make_tiny, state_dict
from deus_dist.architectures import architecture_for

METHODS = ["copy", "avg", "llama-pro", "solar"]


def expected_layer(method: str, arch, base_sd: dict, source: dict, new: bool) -> dict:
    """What an output layer must hold, computed here from the base weights and the manifest."""

    def layer(k):
        return {
            s: base_sd[arch.layer_name(k, s)].float() for s in arch.block if arch.layer_name(k, s) in base_sd
        }

    if "base" in source:
        return layer(source["base"])
    if "pair" in source:
        a, b = (layer(k) for k in source["pair"])
        return {s: 0.5 * (a[s] + b[s]) for s in a}
    block = layer(source["copy"])
    if method == "llama-pro":
        block = {s: torch.zeros_like(t) if arch.block[s].output else t for s, t in block.items()}
    return block


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_family_and_method(tmp_path, family, method):
    base = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", method, "--quiet") == 0

    manifest = load_manifest(out)
    base_cfg = json.loads((base / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    L = AutoConfig.from_pretrained(base).num_hidden_layers
    assert manifest["num_layers_before"] == L
    assert manifest["new_layers"] == [e["index"] for e in manifest["layers"] if "base" not in e["source"]]
    assert manifest["method"] == method and manifest["history"] == []
    expected_new = {"solar": L - 2 * (L // 4)}.get(method, L // 2)
    assert len(manifest["new_layers"]) == expected_new

    # transformers loads it with no missing or unexpected keys
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    arch = architecture_for(base_cfg)
    L_out = out_cfg[arch.config_key("num_hidden_layers")]
    assert L_out == manifest["num_layers_after"] == len(manifest["layers"])
    assert len(model.get_submodule(arch.layer_prefix.rstrip("."))) == L_out

    # per-layer config fields follow the layout (a new block takes its lower source's settings)
    resolved_base = AutoConfig.from_pretrained(base)
    base_types = getattr(resolved_base, "layer_types", None)
    if base_types is not None:
        sources = [next(iter(e["source"].values())) for e in manifest["layers"]]
        lower = [s[0] if isinstance(s, list) else s for s in sources]
        assert model.config.layer_types == [base_types[k] for k in lower]

    # every output layer holds exactly what the manifest says it came from
    base_sd, out_sd = state_dict(base), state_dict(out)
    for entry in manifest["layers"]:
        want = expected_layer(
            method, arch, base_sd, entry["source"], entry["index"] in manifest["new_layers"]
        )
        for suffix, tensor in want.items():
            got = out_sd[arch.layer_name(entry["index"], suffix)].float()
            torch.testing.assert_close(got, tensor, rtol=0, atol=0, msg=f"{entry} {suffix}")
    for name in base_sd:
        if arch.split_name(name) is None:
            assert torch.equal(out_sd[name], base_sd[name])
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()


def logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_llama_pro_keeps_logits_identical(tmp_path, family):
    base = make_tiny(tmp_path / "base", family)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", "llama-pro", "--quiet") == 0
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(base, ids), logits(out, ids))


@pytest.mark.parametrize("method", ["copy", "llama-pro", "solar"])
def test_hybrid_copy_methods(tmp_path, method):
    """Bamba (Mamba2 layers 0, 1, 4, 5; attention 2, 3): copies keep each layer's type, the
    attention layer list follows the layout, and llama-pro's zeroed out_proj/o_proj/down_proj keep
    the logits."""
    base = make_tiny(tmp_path / "base", HYBRID)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", method, "--quiet") == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    manifest = load_manifest(out)
    lower = [next(iter(e["source"].values())) for e in manifest["layers"]]
    base_types = AutoConfig.from_pretrained(base).layers_block_type
    assert model.config.layers_block_type == [base_types[k] for k in lower]
    assert json.loads((out / "config.json").read_text())["attn_layer_indices"] == [
        i for i, k in enumerate(lower) if k in (2, 3)
    ]
    base_sd, out_sd = state_dict(base), state_dict(out)
    for entry, k in zip(manifest["layers"], lower, strict=True):
        prefix = f"model.layers.{k}."
        for name, t in base_sd.items():
            if name.startswith(prefix):
                got = out_sd[f"model.layers.{entry['index']}.{name[len(prefix) :]}"]
                zeroed = (
                    method == "llama-pro"
                    and "copy" in entry["source"]
                    and name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight"))
                )
                assert torch.equal(got, torch.zeros_like(t) if zeroed else t), (entry, name)
    if method == "llama-pro":
        ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
        assert torch.equal(logits(base, ids), logits(out, ids))


def test_hybrid_pairs_fuse_only_layers_of_one_type(tmp_path, capsys):
    """avg and opt-deus fuse the attention pair (gap 2); a gap across types is refused naming it,
    opt-deus refuses a pair of Mamba2 layers (no transport for their channels), lesa refuses."""
    base = make_tiny(tmp_path / "base", HYBRID)
    for method in ("avg", "opt-deus"):
        out = tmp_path / method
        assert (
            fuse("--model", base, "--out", out, "--method", method, "--positions", "2", "--verify", "--quiet")
            == 0
        )
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["attn_layer_indices"] == [2, 3, 4] and load_manifest(out)["new_layers"] == [3]
    capsys.readouterr()
    assert fuse("--model", base, "--out", tmp_path / "x", "--method", "avg", "--positions", "1,3") == 2
    err = capsys.readouterr().err
    assert "gap 1 (layer 1 linear_attention, layer 2 full_attention)" in err
    assert "gap 3 (layer 3 full_attention, layer 4 linear_attention)" in err and "[0, 2, 4]" in err
    assert fuse("--model", base, "--out", tmp_path / "x", "--method", "opt-deus", "--positions", "0,4") == 2
    err = capsys.readouterr().err
    assert "gaps [0, 4] join two linear_attention layers" in err and "mamba.in_proj.weight" in err
    assert fuse("--model", base, "--out", tmp_path / "x", "--method", "lesa", "--positions", "2") == 2
    assert "--method lesa" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_avg_changes_logits(tmp_path, tiny_llama):
    """Contrast: a non-preserving method does change the function (so the check above has teeth)."""
    out = tmp_path / "out"
    assert fuse("--model", tiny_llama, "--out", out, "--method", "avg", "--quiet") == 0
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(tiny_llama, ids), logits(out, ids))


def test_copy_at_position_k_duplicates_layer_k(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert fuse("--model", tiny_llama, "--out", out, "--method", "copy", "--positions", "2", "--quiet") == 0
    sd = state_dict(out)
    layer = {n.split(".", 3)[3]: t for n, t in sd.items() if n.startswith("model.layers.2.")}
    assert layer
    for suffix, t in layer.items():
        assert torch.equal(sd[f"model.layers.3.{suffix}"], t)
    assert load_manifest(out)["new_layers"] == [3]


def test_two_shard_input_and_output(tmp_path):
    base = make_tiny(tmp_path / "base", "llama", max_shard_size="200KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--out_shard_size", "300KB", "--quiet") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {s: (out / s).stat().st_size for s in shards}
    assert all(size <= 300_000 + 16_000 for size in sizes.values())  # cap plus the JSON header
    assert index["metadata"]["total_size"] == sum(state_dict(out)[k].nbytes for k in index["weight_map"])
    from safetensors import safe_open

    with safe_open(out / shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tied_embeddings_stay_tied(tmp_path):
    base = make_tiny(tmp_path / "base", "llama", tie_word_embeddings=True)
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--method", "llama-pro", "--quiet") == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in state_dict(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_conversion(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert fuse("--model", tiny_llama, "--out", out, "--dtype", "bf16", "--quiet") == 0
    assert {t.dtype for t in state_dict(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_qwen2_max_window_layers_follows_the_layout(tmp_path):
    base = make_tiny(tmp_path / "base", "qwen2")  # layers 0-1 full attention, 2-5 sliding
    out = tmp_path / "out"
    assert fuse("--model", base, "--out", out, "--placement", "bottom", "--num_new", "2", "--quiet") == 0
    cfg = json.loads((out / "config.json").read_text())
    # output: base0, new(0,1), base1, new(1,2), base2, ... : the first 4 come from layers below 2
    assert cfg["max_window_layers"] == 4
    assert cfg["layer_types"][:5] == ["full_attention"] * 4 + ["sliding_attention"]


def test_growing_again_keeps_history(tmp_path, tiny_llama):
    first, second = tmp_path / "first", tmp_path / "second"
    assert fuse("--model", tiny_llama, "--out", first, "--method", "llama-pro", "--quiet") == 0
    assert fuse("--model", first, "--out", second, "--method", "llama-pro", "--quiet") == 0
    m1, m2 = load_manifest(first), load_manifest(second)
    assert m2["num_layers_before"] == m1["num_layers_after"] == 9
    assert m2["num_layers_after"] == 13
    assert len(m2["history"]) == 1 and m2["history"][0]["new_layers"] == m1["new_layers"]


def test_yaml_config_and_flags_override(tmp_path, tiny_llama):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"model: {tiny_llama}\nmethod: copy\nnum_new: 2\nplacement: bottom\nquiet: true\n")
    out = tmp_path / "out"
    assert fuse("--config", plan, "--out", out, "--num_new", "3") == 0
    m = load_manifest(out)
    assert m["method"] == "copy" and m["params"]["num_new"] == 3 and m["params"]["placement"] == "bottom"


def test_default_output_path(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fuse("--model", tiny_llama, "--method", "copy", "--quiet") == 0
    assert (tmp_path / "upscaled" / "base-copy-9L" / "deus_manifest.json").exists()


def test_outputs_are_flushed_to_disk_before_they_are_renamed_into_place(tmp_path, tiny_llama, monkeypatch):
    """Every file of an up-scaled checkpoint (and of a build_once cache) is fsync'ed before the
    rename that publishes it, and the parent directory after, so a node crash right after a run
    never leaves a renamed directory whose shards are still in the page cache."""
    import os

    from deus_dist.atomic import build_once

    log: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        log.append(("rename", str(src)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "up"
    assert fuse("--model", tiny_llama, "--out", out, "--method", "llama-pro", "--quiet") == 0
    (publish,) = [i for i, (op, path) in enumerate(log) if op == "rename" and ".up.partial-" in path]
    tmp = log[publish][1]
    synced = {Path(path).name for op, path in log[:publish] if op == "fsync" and path.startswith(tmp)}
    assert {p.name for p in out.iterdir()} <= synced | {out.name}
    assert ("fsync", str(tmp_path)) in log[publish:]  # the rename itself

    log.clear()
    build_once(tmp_path / "cache", lambda d: (d / "data.bin").write_bytes(b"x" * 10))
    (publish,) = [i for i, (op, _) in enumerate(log) if op == "rename"]
    assert any(op == "fsync" and path.endswith("data.bin") for op, path in log[:publish])


def saved_the_old_way(path: Path, family: str) -> Path:
    """A tiny checkpoint stored as older hub checkpoints are: GPT-2 as openai-community/gpt2 (saved
    from the base model, so without the ``transformer.`` prefix, with each layer's causal-mask
    buffer ``attn.bias``); GPT-NeoX as early Pythia (mask buffers and a per-layer
    ``rotary_emb.inv_freq``). transformers loads both with no missing or unexpected keys."""
    from safetensors.torch import load_file, save_file

    make_tiny(path, family)
    cfg = AutoConfig.from_pretrained(path)
    n, ctx = cfg.num_hidden_layers, cfg.max_position_embeddings
    mask = torch.tril(torch.ones(ctx, ctx, dtype=torch.bool)).view(1, 1, ctx, ctx)
    stored = load_file(path / "model.safetensors")
    if family == "gpt2":
        stored = {k.removeprefix("transformer."): v for k, v in stored.items()}
        stored |= {f"h.{i}.attn.bias": mask.clone() for i in range(n)}
    else:
        for i in range(n):
            stored[f"gpt_neox.layers.{i}.attention.bias"] = mask.clone()
            stored[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            stored[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return path


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["llama-pro", "opt-deus"])
def test_checkpoints_stored_the_old_way_read_as_transformers_loads_them(tmp_path, capsys, family, method):
    """Names without the base-model prefix get it; buffers transformers ignores on load are left
    out; the output is as save_pretrained writes it (also through worker processes)."""
    base = saved_the_old_way(tmp_path / "base", family)
    out = tmp_path / "out"
    workers = ["--workers", "2"] if method == "opt-deus" else []
    capsys.readouterr()
    assert fuse("--model", base, "--out", out, "--method", method, *workers) == 0
    said = capsys.readouterr().out
    assert "left out" in said and ("'transformer.' prefix" in said) == (family == "gpt2")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    written = set(state_dict(out))
    assert written == set(model.state_dict()) - {"lm_head.weight"} | ({"embed_out.weight"} & written)
    assert not any(n.endswith((".attn.bias", "attention.bias", "masked_bias", "inv_freq")) for n in written)
