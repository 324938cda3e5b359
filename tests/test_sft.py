"""Instruction data (launchers/sft.py's pipeline): formats, templates, targets, packing, truncation,
and the launcher's bad input. The distributed runs are in test_sft_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (
    FAMILIES,
    MOE_FAMILIES,
    TwoPackedRows,
    add_char_tokenizer,
    alone_losses,
    batch_losses,
    fuse,
    make_tiny,
    make_training_model,
    packed_conversations,
)
from deus_dist.errors import UserError
from deus_dist.train.chat_data import (
    CHATML,
    ChatEncoder,
    ChatPipeline,
    detect_format,
    resolve_template,
    to_conversation,
)
from deus_dist.train.pipeline import IGNORE

CONVERSATION = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7 is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "2 is the only even prime."},
]


def sft(*args) -> int:
    from deus_dist.cli.sft import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Path:
    return make_training_model(tmp_path_factory.mktemp("up"))


def test_three_formats_become_the_same_conversation():
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    alpaca = {"instruction": "Hi", "input": "", "output": "Hello!"}
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert to_conversation(sharegpt, "sharegpt") == (expected, "ok")
    assert to_conversation(messages, "messages") == (expected, "ok")
    assert to_conversation(alpaca, "alpaca") == (expected, "ok")
    with_input = to_conversation({"instruction": "Sum:", "input": "2 + 2", "output": "4"}, "alpaca")[0]
    assert with_input[0]["content"] == "Sum:\n\n2 + 2"
    assert detect_format(["id", "conversations"], "x") == "sharegpt"
    assert detect_format(["messages"], "x") == "messages"
    assert detect_format(["instruction", "input", "output"], "x") == "alpaca"
    with pytest.raises(UserError, match=r"--data: x is in no format .*fields found: prompt, response"):
        detect_format(["prompt", "response"], "x")


@pytest.mark.parametrize(
    "turns,status",
    [
        ([("human", "a"), ("human", "b"), ("gpt", "c")], "non-alternating turns"),
        ([("gpt", "a"), ("human", "b"), ("gpt", "c")], "non-alternating turns"),
        ([("human", "a"), ("gpt", "")], "empty or non-string content"),
        ([("human", "a"), ("gpt", None)], "empty or non-string content"),
        ([("human", "a"), ("wizard", "b")], "unknown role"),
        ([("human", "a")], "no assistant turn"),
        ([("system", "be brief"), ("human", "a"), ("gpt", "b")], "ok"),
        ([("human", "a"), ("gpt", "b"), ("human", "unanswered")], "trimmed"),
    ],
)
def test_malformed_records_are_named_not_fatal(turns, status):
    record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    messages, got = to_conversation(record, "sharegpt")
    assert got == status
    assert (messages is not None) == (status in ("ok", "trimmed"))
    if status == "trimmed":
        assert messages[-1]["role"] == "assistant"


def test_targets_are_exactly_the_assistant_turns(smollm2_dir):
    """The embedded SmolLM2's own chat template: decoding the target tokens gives each assistant
    turn followed by its end-of-turn token, and nothing else."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    encoder = ChatEncoder(
        tok, resolve_template(tok, None, "smollm2"), seq_len=512, train_on_prompt=False, truncation="turn"
    )
    ids, labels, status = encoder.encode(CONVERSATION)
    assert status == "ok" and len(ids) == len(labels)
    runs, current = [], []
    for t, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(tok.decode(current))
                current = []
        else:
            assert label == t
            current.append(t)
    assert runs == ["7 is prime.<|im_end|>", "2 is the only even prime.<|im_end|>"]
    # --train_on_prompt: every token but the conversation's first is a target
    everything = ChatEncoder(tok, encoder.template, seq_len=512, train_on_prompt=True, truncation="turn")
    _, all_labels, _ = everything.encode(CONVERSATION)
    assert all_labels[0] == IGNORE and all(label != IGNORE for label in all_labels[1:])


def test_too_long_conversations_are_cut_after_a_whole_turn_or_dropped(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    template = resolve_template(tok, None, "smollm2")
    full, _, _ = ChatEncoder(tok, template, seq_len=512, train_on_prompt=False, truncation="turn").encode(
        CONVERSATION
    )
    first, _, _ = ChatEncoder(tok, template, seq_len=512, train_on_prompt=False, truncation="turn").encode(
        CONVERSATION[:2]
    )
    limit = len(full) - 2  # the second answer no longer fits
    cut = ChatEncoder(tok, template, seq_len=limit, train_on_prompt=False, truncation="turn")
    ids, labels, status = cut.encode(CONVERSATION)
    assert status == "cut" and tok.decode(ids).endswith("7 is prime.<|im_end|>")
    assert len(ids) == len(first) - 1  # the first turn without the newline after its end-of-turn token
    dropped = ChatEncoder(tok, template, seq_len=limit, train_on_prompt=False, truncation="drop")
    assert dropped.encode(CONVERSATION)[2] == "too long"
    too_short = ChatEncoder(tok, template, seq_len=10, train_on_prompt=False, truncation="turn")
    assert too_short.encode(CONVERSATION)[2] == "too long"


def test_a_packed_conversation_has_the_losses_it_has_alone(tmp_path):
    """Packing with restarting position ids isolates conversations: each token's loss inside a
    packed row equals its loss with the conversation alone (fp32, tolerance 1e-5), and a
    conversation's first token is never a target."""
    from transformers import AutoModelForCausalLM

    from deus_dist.train.chat_data import RowWriter

    model = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "m"), attn_implementation="sdpa").eval()
    convs, row = packed_conversations(tmp_path, [23, 17, 30], seq_len=80)
    assert len(row) == 1
    batch = row.batch([0])
    assert row.targets([0]) == sum(len(ids) - 3 for ids, _ in convs)
    packed, _ = batch_losses(model, batch)
    start = 0
    for ids, labels in convs:
        alone = alone_losses(model, ids, labels)
        torch.testing.assert_close(packed[start : start + len(ids) - 1], alone, rtol=1e-5, atol=1e-5)
        assert batch["labels"][0, start].item() == IGNORE  # first token: no target across the boundary
        start += len(ids)
    # without packing the same rows hold one conversation each, padding masked and never a target
    writer = RowWriter(tmp_path, "u", 80, pad=0, packing=False)
    for ids, labels in convs:
        writer.add(ids, labels)
    assert writer.close() == 3


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_every_family_keeps_packed_conversations_apart(tmp_path, family):
    """Each family under the attention the launcher loads it with (SDPA; eager for Gemma-2) builds
    its mask from the restarting position ids: in a packed 2-row micro-batch every token's loss
    equals its loss alone (fp32, within 1e-5). A family whose transformers model ignored them
    (its mask built from positions 0..n) would attend across conversations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from deus_dist.train.model import attention_implementation, causal_lm_class, model_inputs

    path = make_tiny(tmp_path / family, family)
    fp32 = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    attention = attention_implementation(fp32, causal_lm_class(AutoConfig.from_pretrained(path)))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
    packed = TwoPackedRows(tmp_path, seed=1)
    packed.assert_as_alone(model, model_inputs(model, packed.batch))


def _reference_flash_kernels():
    """FlashAttention's two entry points as transformers calls them, computed with PyTorch's SDPA:
    ``flash_attn_func`` on [batch, seq, heads, dim] and ``flash_attn_varlen_func`` on the tokens of
    every sequence laid end to end, with their boundaries in ``cu_seqlens``; k/v may have fewer
    heads (grouped-query attention), as the kernels allow."""
    import torch.nn.functional as F

    def flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal, scale=softmax_scale, enable_gqa=True
        )
        return out.transpose(1, 2)

    def varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
    ):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        bounds = cu_seqlens_q.tolist()
        parts = [
            flash(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale=softmax_scale, causal=causal)[0]
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return torch.cat(parts)

    return flash, varlen


def test_packed_rows_keep_to_their_conversations_under_flash_attention(tmp_path, monkeypatch):
    """On GPUs with flash-attn installed the launcher trains with FlashAttention 2. transformers
    finds packed conversations from position ids only in a batch of one row
    (``_is_packed_sequence``): a micro-batch of several packed rows would attend across
    conversations. ``model_inputs`` hands it such a micro-batch as one row. transformers' own
    FlashAttention path runs here on reference kernels (CPU, SDPA per sequence): every token's
    loss in a 2-row packed micro-batch equals its loss with its conversation alone, and the rows
    as they are (not flattened) do not, which is the failure this guards. tests/test_gpu.py runs
    the same on a GPU with the real kernels."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import AutoModelForCausalLM

    from deus_dist.train.model import model_inputs

    flash, varlen = _reference_flash_kernels()
    monkeypatch.setattr(
        fa, "_lazy_imports", lambda *a, **k: (flash, varlen, None, fa._pad_input, fa._unpad_input)
    )
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    model = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "m"), attn_implementation="sdpa").eval()
    packed = TwoPackedRows(tmp_path, seed=1)
    batch = packed.batch
    model.config._attn_implementation = "flash_attention_2"
    fed = model_inputs(model, batch)
    assert fed["input_ids"].shape == (1, 80) and fa._is_packed_sequence(fed["position_ids"], 1)
    packed.assert_as_alone(model, fed)
    expected = packed.alone(model)
    _, mean = batch_losses(model, fed)  # the mean over the micro-batch's targets
    torch.testing.assert_close(mean, torch.cat(expected).sum() / packed.split.targets([0, 2]))
    # as the rows came, transformers' FlashAttention path takes each row for one sequence
    unflat, _ = batch_losses(model, batch)
    assert not torch.allclose(unflat[23 : 23 + len(expected[1])], expected[1], atol=1e-3)
    # the same micro-batch under SDPA is left as it is (its mask keeps the conversations apart)
    model.config._attn_implementation = "sdpa"
    assert model_inputs(model, batch) is batch


def _mixer_honouring_seq_idx(monkeypatch):
    """Bamba's Mamba mixer as the mamba-ssm / causal-conv1d kernels run it when given ``seq_idx``:
    state restarted at every sequence (here: transformers' PyTorch mixer run on each sequence of a
    row separately). Without the kernels transformers refuses ``seq_idx`` rather than ignore it."""
    from transformers.models.bamba.modeling_bamba import BambaMixer

    original = BambaMixer.forward

    def forward(self, hidden_states, cache=None, attention_mask=None, seq_idx=None, **kwargs):
        if seq_idx is None:
            return original(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        rows = []
        for b, ids in enumerate(seq_idx):
            cuts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist(), len(ids)]
            parts = [
                original(self, hidden_states[b : b + 1, i:j], **kwargs)
                for i, j in zip(cuts, cuts[1:], strict=False)
            ]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    monkeypatch.setattr(BambaMixer, "forward", forward)


def test_packed_conversations_stay_apart_in_a_hybrids_recurrent_layers(tmp_path, monkeypatch):
    """A hybrid's Mamba layers carry their state along a row whatever the attention mask: packed,
    a conversation's losses depend on the one before it. ``model_inputs`` gives them ``seq_idx``
    (each token's conversation in its row), which reaches the mixer through transformers' kwargs;
    with the kernels honouring it (emulated on CPU) every token's loss equals its loss alone."""
    from transformers import AutoModelForCausalLM

    from deus_dist.train.model import model_inputs

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path / "m", "bamba"), attn_implementation="sdpa"
    ).eval()
    packed = TwoPackedRows(tmp_path, seed=2)  # rows [23, 17] and [12, 25] + 3 of padding
    fed = model_inputs(model, packed.batch)
    assert fed["seq_idx"].dtype == torch.int32
    assert fed["seq_idx"].tolist() == [[0] * 23 + [1] * 17, [0] * 12 + [1] * 25 + [2] * 3]
    second = packed.alone(model)[1]
    leaked, _ = batch_losses(model, packed.batch)  # the rows as they came: the state runs on
    assert not torch.allclose(leaked[23 : 23 + len(second)], second, atol=1e-3)
    _mixer_honouring_seq_idx(monkeypatch)
    packed.assert_as_alone(model, fed)


def test_packing_a_hybrid_without_its_kernels_is_refused_naming_no_packing(tmp_path, capsys):
    """Here (no mamba-ssm, no causal-conv1d) a packed hybrid would leak state between
    conversations, and transformers' fallbacks refuse ``seq_idx``: --packing (the default) is
    refused up front, naming --no_packing, before any data is laid out."""
    from deus_dist.train.model import missing_packed_sequence_kernels

    if not missing_packed_sequence_kernels():
        pytest.skip("the kernels are installed: packing a hybrid trains")
    base, up = make_tiny(tmp_path / "base", "bamba"), tmp_path / "up"
    add_char_tokenizer(base)
    assert fuse("--model", base, "--out", up, "--positions", "2", "--quiet") == 0  # two attention layers
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chats.write_text(json.dumps({"messages": turns}) + "\n")
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = [
        "--model",
        up,
        "--data",
        chats,
        "--chat_template",
        "chatml",
        "--output_dir",
        run,
        "--data_cache",
        cache,
    ]
    err = _errors(capsys, *common)
    assert "--packing: this bamba model has recurrent (state-space) layers" in err and "--no_packing" in err
    assert not run.exists() and not [p for p in cache.glob("*") if not p.name.startswith(".")]


def test_pipeline_counts_drops_and_caches(tmp_path, up):
    """ShareGPT records with every kind of defect: the good ones are kept, the rest counted by
    reason; the cache key does not depend on the path of the data."""
    records = [
        {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]},
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello."},
            ]
        },
        {"conversations": [{"from": "human", "value": "Hi"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "oracle", "value": "Yes"}]},
    ] + [
        {
            "conversations": [
                {"from": "human", "value": f"Count to {i}."},
                {"from": "gpt", "value": " ".join(str(j) for j in range(1, i + 1))},
            ]
        }
        for i in range(2, 40)
    ]
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(records))
    from deus_dist.configs import SftConfig

    cfg = SftConfig(data=str(data), chat_template="chatml", seq_len=128, eval_fraction=0.1)
    pipeline = ChatPipeline()
    spec = pipeline.spec(cfg, up)
    logs = []
    folder = pipeline.build(spec, up, tmp_path / "cache", log=logs.append)
    text = "\n".join(logs)
    assert "1 non-alternating turns" in text and "1 empty or non-string content" in text
    assert "1 unknown role" in text and "1 no assistant turn" in text
    data_ = pipeline.open(folder, seed=0)
    assert len(data_.train) > 0 and len(data_.eval) > 0
    assert (folder / "meta.json").is_file()
    moved = tmp_path / "elsewhere" / "chats.json"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())
    assert pipeline.spec(SftConfig(**{**cfg.__dict__, "data": str(moved)}), up).digest == spec.digest


def _errors(capsys, *args) -> str:
    assert sft(*args) == 2
    return capsys.readouterr().err


def test_sft_bad_inputs_name_their_option_and_write_nothing(tmp_path, up, capsys):
    run = tmp_path / "run"
    common = ["--model", up, "--output_dir", run, "--data_cache", tmp_path / "cache"]
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
    )
    # the tiny model's tokenizer has no chat template
    err = _errors(capsys, *common, "--data", good)
    assert "--chat_template: the model" in err and "has no chat template" in err
    # a template that never renders the assistant's words
    silent = tmp_path / "silent.jinja"
    silent.write_text("{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}")
    assert "renders no assistant turn" in _errors(capsys, *common, "--data", good, "--chat_template", silent)
    assert "--chat_template: " in _errors(capsys, *common, "--data", good, "--chat_template", tmp_path / "x")
    # unrecognised records: the fields found are named
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    err = _errors(capsys, *common, "--data", odd, "--chat_template", "chatml")
    assert "--data: " in err and "fields found: prompt, response" in err
    # every record malformed
    bad = tmp_path / "bad.jsonl"
    turns = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    bad.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(5)))
    err = _errors(capsys, *common, "--data", bad, "--chat_template", "chatml")
    assert "--data: no usable conversation" in err and "5 non-alternating turns" in err
    assert not (run / "checkpoints").exists()
    assert not [p for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")]


def test_chatml_renders_incrementally():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )
    encoder = ChatEncoder(tok, CHATML, seq_len=64, train_on_prompt=False, truncation="turn")
    text, spans = encoder.assistant_spans(CONVERSATION)
    assert [text[s:e] for s, e in spans] == ["7 is prime.<|im_end|>", "2 is the only even prime.<|im_end|>"]
