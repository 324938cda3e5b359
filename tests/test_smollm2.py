"""The real SmolLM2-135M (embedded default) end to end: 30 -> 45 layers, perplexity, evaluation."""

from __future__ import annotations

import json

import pytest

from conftest import fuse, load_manifest

pytestmark = pytest.mark.slow


def ppl(capsys, *args) -> float:
    from deus_dist.cli.eval_ppl import main

    capsys.readouterr()
    assert main([str(a) for a in args] + ["--quiet"]) == 0
    out = capsys.readouterr().out
    return float(out.split("perplexity")[1].split()[0])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job: no --model, no --method."""
    out = tmp_path_factory.mktemp("smol") / "out"
    assert fuse("--out", out) == 0
    return out


def test_default_run_upscales_30_to_45(default_run, smollm2_dir):
    m = load_manifest(default_run)
    assert m["num_layers_before"] == 30 and m["num_layers_after"] == 45
    assert m["new_layers"] == list(range(15, 45, 2))
    assert m["layers"][15]["source"] == {"pair": [14, 15]}
    assert m["base_model"] == str(smollm2_dir) and m["base_config_hash"].startswith("sha256:")
    cfg = json.loads((default_run / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 45 and cfg["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (default_run / name).exists(), name


def test_llama_pro_keeps_perplexity_and_avg_does_not(default_run, smollm2_dir, tmp_path, capsys):
    out = tmp_path / "lp"
    assert fuse("--model", smollm2_dir, "--out", out, "--method", "llama-pro", "--verify", "--quiet") == 0
    assert load_manifest(out)["new_layers"] == list(range(2, 45, 3))
    args = ["--max_tokens", "1024", "--seq_len", "256"]
    base = ppl(capsys, "--model", smollm2_dir, *args)
    assert 5 < base < 60  # a real model on real text
    assert ppl(capsys, "--model", out, *args) == pytest.approx(base, rel=1e-4)
    assert ppl(capsys, "--model", default_run, *args) > 1.2 * base  # plain averaging hurts


def test_eval_ppl_bad_input(tmp_path, capsys, smollm2_dir):
    from deus_dist.cli.eval_ppl import main

    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(smollm2_dir), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"content": "hello world " * 300}) + "\n")
    assert main(["--model", str(smollm2_dir), "--data", str(bad), "--quiet"]) == 2
    assert "--text_field" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(smollm2_dir),
                "--data",
                str(bad),
                "--text_field",
                "content",
                "--seq_len",
                "128",
                "--max_tokens",
                "256",
                "--quiet",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out
