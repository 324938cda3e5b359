"""A checkpoint whose tokenizer is only a SentencePiece model (``tokenizer.model``, as Llama 2,
Mistral v0.1 and Gemma ship): up-scaled, trained with cpt.py and instruction-tuned with sft.py.
transformers turns it into a fast tokenizer with the ``sentencepiece`` and ``protobuf`` packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, fuse, launch, make_tiny, read_metrics, write_chat_jsonl, write_wiki_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def sentencepiece_model(tmp_path: Path) -> Path:
    """A 256-piece BPE SentencePiece model trained here on the embedded Wikipedia sample."""
    import sentencepiece as spm

    from deus_dist.embedded import wikipedia_split

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(a["text"][:3000] for a in wikipedia_split("train")[:30]))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=256,
        model_type="bpe",
        character_coverage=0.995,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return tmp_path / "sp.model"


def test_sentencepiece_only_tokenizer_through_fuse_cpt_and_sft(tmp_path):
    base = make_tiny(tmp_path / "base", vocab_size=256)
    (base / "tokenizer.model").write_bytes(sentencepiece_model(tmp_path).read_bytes())
    (base / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 256,
            }
        )
    )
    up = tmp_path / "up"
    assert fuse("--model", base, "--out", up, "--num_new", "3", "--quiet") == 0
    assert (up / "tokenizer.model").is_file() and not (up / "tokenizer.json").exists()
    common = ["--model", up, "--ds_config", REPO / "ds_configs" / "zero3_cpu.json", "--max_steps", "2"]
    common += ["--eval_batches", "1", "--quiet"]
    data = write_wiki_jsonl(tmp_path / "wiki.jsonl")
    launch([*common, "--data", data, "--seq_len", "64", "--output_dir", tmp_path / "cpt"], launcher="python")
    chats = write_chat_jsonl(tmp_path / "chats.jsonl", 200)
    sft = [
        *common,
        "--data",
        chats,
        "--chat_template",
        "chatml",
        "--seq_len",
        "256",
        "--eval_fraction",
        "0.2",
    ]
    launch([*sft, "--output_dir", tmp_path / "sft"], launcher="python", script=REPO / "launchers" / "sft.py")
    for run in ("cpt", "sft"):
        assert [r["step"] for r in read_metrics(tmp_path / run)] == [1, 2]
        assert (tmp_path / run / "final" / "tokenizer.model").is_file()
