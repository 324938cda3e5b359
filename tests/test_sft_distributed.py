"""launchers/sft.py end to end: real DeepSpeed ZeRO-3 over gloo on 2 CPU ranks, the engine of cpt.py
with the conversation pipeline. The tiny up-scaled model of conftest's ``train_setup`` (character
tokenizer, no chat template: --chat_template chatml) on short real ShareGPT conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch, read_metrics, state_dict, write_chat_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SFT = REPO / "launchers" / "sft.py"


@pytest.fixture(scope="module")
def chats(train_setup) -> Path:
    return write_chat_jsonl(train_setup[0] / "chats.jsonl")


def sft_args(setup, chats, run: str, *extra) -> list:
    root, model, _ = setup
    return [
        "--ds_config",
        REPO / "ds_configs" / "zero3_cpu.json",
        "--model",
        model,
        "--data",
        chats,
        "--chat_template",
        "chatml",
        "--output_dir",
        root / run,
        "--data_cache",
        root / "chat-cache",
        "--seq_len",
        "256",
        "--lr",
        "3e-3",
        "--warmup_steps",
        "0",
        "--eval_batches",
        "2",
        "--quiet",
        "--max_steps",
        "4",
        *extra,
    ]


@pytest.mark.parametrize("ds_config", ["zero3_cpu.json", "zero2.json"])
def test_sft_trains_resumes_and_weighs_every_target_token_alike(train_setup, chats, ds_config):
    """Run A: micro-batch 2, no accumulation. Run B: micro-batch 1, 2 accumulation steps, stopped
    after step 2 and resumed on 1 rank (4 accumulation steps). The same 4 rows make each step in
    both; rows hold different numbers of target tokens, so only a loss that is the mean over every
    target token of the global batch gives both runs the same losses and weights (a mean of
    per-micro-batch means would not). Under ZeRO-3 and under ZeRO-2 (frozen weights replicated)."""
    root = train_setup[0]
    tag = "" if ds_config == "zero3_cpu.json" else "-" + ds_config.split(".")[0]
    ds = ["--ds_config", REPO / "ds_configs" / ds_config]  # after sft_args' own: the last one wins
    run_a, run_b = f"sft-a{tag}", f"sft-b{tag}"
    cached = (root / "chat-cache").is_dir()  # conversations are laid out once per cache
    first = launch(
        sft_args(train_setup, chats, run_a, "--micro_batch", "2", "--grad_accum", "1", *ds), script=SFT
    )
    if not cached:  # whichever parametrization runs first lays them out and reports it
        assert "kept" in first.stdout and "training rows" in first.stdout
    launch(
        sft_args(
            train_setup, chats, run_b, "--micro_batch", "1", "--grad_accum", "2", "--stop_at_step", "2", *ds
        ),
        script=SFT,
    )
    again = launch(sft_args(train_setup, chats, run_b, "--micro_batch", "1", *ds), nproc=1, script=SFT)
    assert "world size 2 -> 1: --grad_accum 4 keeps the global batch of 4 sequences" in again.stdout
    a, b = read_metrics(root / run_a), read_metrics(root / run_b)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
    assert a[-1]["loss"] < a[0]["loss"] and "eval_ppl" in a[-1]
    wa, wb = state_dict(root / run_a / "final"), state_dict(root / run_b / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=2e-4)  # Adam amplifies fp noise
    from deus_dist.train.chat_data import CHATML

    assert (root / run_a / "final" / "chat_template.jinja").read_text() == CHATML
    state = json.loads(next((root / run_b / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["data"]["kind"] == "chat" and state["data"]["packing"] is True


def test_sft_resume_refuses_another_template(train_setup, chats):
    root = train_setup[0]
    template = root / "other.jinja"
    from deus_dist.train.chat_data import CHATML

    template.write_text(CHATML.replace("<|im_end|>", "</turn>"))
    proc = launch(sft_args(train_setup, chats, "sft-a", "--chat_template", template), check=False, script=SFT)
    assert proc.returncode == 2
    assert "--chat_template: " in proc.stderr and "pass the original --chat_template" in proc.stderr
