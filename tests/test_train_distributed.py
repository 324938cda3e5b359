"""The training engine end to end: real DeepSpeed ZeRO-3, 2 ranks over gloo on the CPU.

One module-scoped tiny up-scaled model (6 -> 9 layers, opt-deus, zero-init new blocks) trained on
real Wikipedia text with a character tokenizer. Runs are kept to a few steps of 64 tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    launch,
    launch_cmd,
    launch_env,
    load_manifest,
    make_training_model,
    read_metrics,
    state_dict,
    write_wiki_jsonl,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = [
    "--seq_len",
    "64",
    "--micro_batch",
    "2",
    "--grad_accum",
    "2",
    "--lr",
    "3e-3",
    "--warmup_steps",
    "0",
    "--eval_batches",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_training_model(root)
    data = write_wiki_jsonl(root / "wiki.jsonl")
    return root, model, data


def args(setup, run: str, *extra) -> list[str]:
    root, model, data = setup
    return [
        "--ds_config",
        Path(__file__).parents[1] / "ds_configs" / "zero3_cpu.json",
        "--model",
        model,
        "--data",
        data,
        "--output_dir",
        root / run,
        "--data_cache",
        root / "cache",
        *COMMON,
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """6 steps in one go under the deepspeed launcher."""
    launch(args(setup, "full", "--max_steps", "6"))
    return setup[0] / "full"


def test_loss_falls_and_only_new_layers_change(setup, uninterrupted):
    _, model, _ = setup
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in records]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert "eval_loss" in records[-1]

    new = set(load_manifest(model)["new_layers"])
    base, final = state_dict(model), state_dict(uninterrupted / "final")
    assert base.keys() == final.keys()
    changed = {n for n in base if not torch.equal(base[n], final[n])}
    for name in base:
        in_new = any(name.startswith(f"model.layers.{i}.") for i in new)
        if not in_new:
            assert name not in changed, f"frozen {name} changed"
    # zero-init o_proj/down_proj and the aligned q/k/v/gate/up of every new layer moved
    assert all(any(n.startswith(f"model.layers.{i}.") for n in changed) for i in new)
    for i in new:
        assert f"model.layers.{i}.mlp.down_proj.weight" in changed
    # the export is a plain HF checkpoint that transformers loads and evaluates
    from deus_dist.cli.eval_ppl import run as eval_run
    from deus_dist.configs import EvalConfig

    report = eval_run(
        EvalConfig(
            model=str(uninterrupted / "final"), data=str(setup[2]), seq_len=64, max_tokens=512, quiet=True
        )
    )
    assert report["perplexity"] < 100
    manifest = load_manifest(uninterrupted / "final")
    assert manifest["training"][-1]["step"] == 6
    assert manifest["new_layers"] == sorted(new)


def test_resumed_run_equals_uninterrupted(setup, uninterrupted):
    first = launch(args(setup, "resumed", "--max_steps", "6", "--stop_at_step", "3"))
    assert "stopped after step 3" in first.stdout
    run = setup[0] / "resumed"
    assert not (run / "final").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    second = launch(
        args(setup, "resumed", "--max_steps", "6", "--save_every", "1", "--keep_checkpoints", "2")
    )
    assert "resumed from" in second.stdout
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-00000005", "step-00000006"]
    a, b = read_metrics(uninterrupted), read_metrics(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (ra, rb)
        assert rb["lr"] == ra["lr"]
    wa, wb = state_dict(uninterrupted / "final"), state_dict(run / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


def test_trainable_all_changes_everything(setup):
    launch(args(setup, "all", "--max_steps", "2", "--trainable", "all"))
    base, final = state_dict(setup[1]), state_dict(setup[0] / "all" / "final")
    unchanged = [n for n in base if torch.equal(base[n], final[n])]
    assert unchanged == []


def test_sigterm_under_torchrun_leaves_a_resumable_checkpoint(setup):
    root = setup[0]
    run = root / "preempted"
    cmd = launch_cmd(args(setup, "preempted", "--max_steps", "400"), launcher="torchrun")
    proc = subprocess.Popen(
        cmd,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.stdout.read()[-3000:]}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job gets it
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped after step" in out, out[-3000:]
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not list((run / "checkpoints").glob(".partial*"))
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    saved = state["step"]
    assert 2 <= saved < 400
    assert [r["step"] for r in read_metrics(run)] == list(range(1, saved + 1))
    # the same command continues from the checkpoint (stopping one step later to stay quick)
    again = launch(
        args(setup, "preempted", "--max_steps", "400", "--stop_at_step", str(saved + 1)), launcher="torchrun"
    )
    assert f"at step {saved}" in again.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, saved + 2))


def test_resume_on_another_world_size_is_refused(setup, uninterrupted):
    proc = launch(args(setup, "full", "--max_steps", "8"), nproc=1, check=False)
    assert proc.returncode == 2
    assert "written by 2 ranks but this run has 1" in proc.stderr
    assert "tools/export_hf.py" in proc.stderr


def test_layer_granular_zero3_fetching_computes_the_same(setup, uninterrupted):
    """The speed setting (decoder layers as ZeRO-3 leaves) against DeepSpeed's per-module hooks."""
    launch(args(setup, "noleaf", "--max_steps", "6", "--no_zero3_leaf_layers", "--no_export"))
    a, b = read_metrics(uninterrupted), read_metrics(setup[0] / "noleaf")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rb)


def test_activation_checkpointing_computes_the_same(setup, uninterrupted):
    launch(args(setup, "ckpt", "--max_steps", "6", "--stop_at_step", "3", "--activation_checkpointing"))
    a, b = read_metrics(uninterrupted)[:3], read_metrics(setup[0] / "ckpt")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rb)


def test_export_tool_and_damaged_checkpoints(setup, uninterrupted, tmp_path, capsys):
    import shutil

    from deus_dist.cli.export import main as export_main

    out = tmp_path / "export"
    assert export_main([str(uninterrupted / "checkpoints"), str(out)]) == 0
    final, exported = state_dict(uninterrupted / "final"), state_dict(out)
    assert final.keys() == exported.keys() and all(torch.equal(final[n], exported[n]) for n in final)
    assert (out / "tokenizer.json").is_file() and (out / "training_run.json").is_file()

    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "CHECKPOINT_DIR: " in capsys.readouterr().err
    # a truncated optimizer partition: the exporter and a resume both refuse it by name
    damaged = tmp_path / "damaged"
    shutil.copytree(uninterrupted, damaged, ignore=shutil.ignore_patterns("final", "data_cache"))
    (ckpt,) = (damaged / "checkpoints").glob("step-*")
    victim = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    assert export_main([str(damaged / "checkpoints"), str(tmp_path / "y")]) == 2
    assert "corrupt" in capsys.readouterr().err and not (tmp_path / "y").exists()
    proc = launch(args(setup, "x", "--max_steps", "8", "--output_dir", damaged), check=False)
    assert (
        proc.returncode != 0
        and "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or corrupt" in proc.stderr
    )


def test_defaults_make_the_embedded_model_first_and_train(tmp_path):
    """The README's CPU command with nothing given: rank 0 up-scales the embedded SmolLM2 into
    ./upscaled while rank 1 waits, then both train on the embedded Wikipedia sample."""
    import subprocess

    cmd = launch_cmd(["--max_steps", "1", "--eval_batches", "1", "--no_export", "--quiet"])
    proc = subprocess.run(cmd, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "up-scaling the embedded model first" in proc.stdout
    assert (tmp_path / "upscaled" / "SmolLM2-135M-Instruct-opt-deus-45L" / "deus_manifest.json").is_file()
    (record,) = read_metrics(tmp_path / "runs" / "cpt")
    assert record["step"] == 1 and 0 < record["loss"] < 10 and record["eval_ppl"] < 100
