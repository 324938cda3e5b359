"""The training engine end to end: real DeepSpeed ZeRO-3, 2 ranks over gloo on the CPU.

One session-scoped tiny up-scaled model (6 -> 9 layers, opt-deus, zero-init new blocks) trained on
real Wikipedia text with a character tokenizer (conftest's ``train_setup``); runs are a few steps
of 64-token blocks, global batch 8.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    launch,
    launch_cmd,
    launch_env,
    load_manifest,
    read_metrics,
    state_dict,
    train_args,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
DUMP = REPO / "tests" / "helpers" / "dump_trainable_state.py"


SHARDINGS = {"zero3": "zero3_cpu.json", "zero2": "zero2.json", "zero1": "zero1.json"}
"""The shipped configs the engine is checked under (ZeRO-1/2 keep the frozen weights replicated)."""


@pytest.fixture(scope="module")
def sharding(request) -> str:
    """zero3 (the shipped CPU config) unless a test asks for others (indirect parametrization)."""
    return getattr(request, "param", "zero3")


def sharded(sharding: str) -> list:
    """Options that put a run under ``sharding`` (train_args' own --ds_config is ZeRO-3's; the last wins)."""
    return [] if sharding == "zero3" else ["--ds_config", REPO / "ds_configs" / SHARDINGS[sharding]]


@pytest.fixture(scope="module")
def reference(request, train_setup, sharding):
    """The uninterrupted 6-step run under ``sharding`` (conftest's shared one for ZeRO-3)."""
    if sharding == "zero3":
        return request.getfixturevalue("uninterrupted")
    launch(
        train_args(
            train_setup, f"full-{sharding}", "--grad_accum", "2", "--max_steps", "6", *sharded(sharding)
        )
    )
    return train_setup[0] / f"full-{sharding}"


@pytest.fixture(scope="module")
def stopped(train_setup, sharding):
    """2 ranks, global batch 8, stopped after step 3 of 6 (a checkpoint at step 3)."""
    name = "stopped" if sharding == "zero3" else f"stopped-{sharding}"
    extra = ["--grad_accum", "2", "--max_steps", "6", "--stop_at_step", "3", *sharded(sharding)]
    if not (train_setup[0] / name / "checkpoints" / "step-00000003").is_dir():  # once per sharding
        launch(train_args(train_setup, name, *extra))
    return train_setup[0] / name


def copy_run(src: Path, name: str) -> Path:
    dst = src.parent / name
    shutil.copytree(src, dst)
    return dst


def assert_continues(run: Path, reference: Path, rel: float) -> None:
    """Every step's loss and lr of ``run`` equal the reference run's, and so do the final weights."""
    a, b = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rel), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
    wa, wb = state_dict(reference / "final"), state_dict(run / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=10 * rel, atol=1e-6)


@pytest.mark.parametrize("sharding", ["zero3", "zero2"], indirect=True)
def test_loss_falls_and_only_new_layers_change(train_setup, reference, sharding):
    """Frozen weights stay as they were (replicated under ZeRO-2, partitioned under ZeRO-3), the
    export is a plain HF checkpoint."""
    uninterrupted = reference
    _, model, data = train_setup
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
        EvalConfig(model=str(uninterrupted / "final"), data=str(data), seq_len=64, max_tokens=512, quiet=True)
    )
    assert report["perplexity"] < 100
    manifest = load_manifest(uninterrupted / "final")
    assert manifest["training"][-1]["step"] == 6
    assert manifest["new_layers"] == sorted(new)


@pytest.mark.parametrize("sharding", ["zero3", "zero2", "zero1"], indirect=True)
def test_resumed_run_equals_uninterrupted(train_setup, reference, stopped, sharding):
    uninterrupted = reference
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3]
    assert not (stopped / "final").exists()
    run = copy_run(stopped, f"resumed-{sharding}")
    second = launch(
        train_args(
            train_setup,
            f"resumed-{sharding}",
            "--max_steps",
            "6",
            "--save_every",
            "1",
            "--keep_checkpoints",
            "2",
            *sharded(sharding),
        )
    )
    assert "resumed from" in second.stdout
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-00000005", "step-00000006"]
    assert_continues(run, uninterrupted, rel=1e-5)


def dump(setup, run: str, nproc: int, out: Path, sharding: str = "zero3") -> dict:
    """Every trainable tensor's fp32 master and Adam moments after the launcher's resume path."""
    args = train_args(setup, run, "--max_steps", "6", *sharded(sharding))
    cmd = launch_cmd([out, *args], "torchrun", nproc, script=DUMP)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    # the head too: a rank's own words come before torchrun's summary of who failed
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[:3000] + "\n...\n" + proc.stderr[-2000:]
    return torch.load(out, weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert (a["step"], a["consumed"]) == (b["step"], b["consumed"])
    assert a["tensors"].keys() == b["tensors"].keys() and a["tensors"]
    for name, states in a["tensors"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states[key], b["tensors"][name][key]), (name, key)
        assert states["exp_avg_sq"].abs().sum() > 0  # real moments, not a fresh optimizer


@pytest.mark.parametrize("sharding", ["zero3", "zero2"], indirect=True)
def test_resume_on_fewer_ranks_converts_the_checkpoint(train_setup, reference, stopped, sharding, tmp_path):
    """2 ranks -> 1: DeepSpeed's universal checkpoint carries the fp32 masters and Adam moments
    exactly; --grad_accum doubles to keep the global batch, so the losses continue as the
    uninterrupted run's."""
    uninterrupted = reference
    name = f"to-one-{sharding}"
    run = copy_run(stopped, name)
    source = dump(train_setup, name, 2, tmp_path / "two.pt", sharding)
    converted = dump(train_setup, name, 1, tmp_path / "one.pt", sharding)
    assert (run / "checkpoints" / "step-00000003" / "universal").is_dir()
    assert_same_state(source, converted)
    proc = launch(train_args(train_setup, name, "--max_steps", "6", *sharded(sharding)), nproc=1)
    assert "world size 2 -> 1: --grad_accum 4 keeps the global batch of 8 sequences" in proc.stdout
    assert_continues(run, uninterrupted, rel=1e-4)


def test_resume_keeps_the_sharding_its_checkpoint_was_written_under(train_setup, uninterrupted, stopped):
    """A ZeRO-3 checkpoint is no ZeRO-2 one: resuming it under zero2.json is refused, naming
    --ds_config; --ds_config auto chooses among the ZeRO-3 configs and continues exactly."""
    run = copy_run(stopped, "auto-resume")
    refused = launch(
        train_args(train_setup, "auto-resume", "--max_steps", "6", *sharded("zero2")), check=False
    )
    assert refused.returncode == 2
    assert (
        "--ds_config: " in refused.stderr
        and "was written under ZeRO-3, this run is ZeRO-1/2" in refused.stderr
    )
    proc = launch(train_args(train_setup, "auto-resume", "--max_steps", "6", "--ds_config", "auto"))
    assert "--ds_config auto: ds_configs/zero3_cpu.json (zero3)" in proc.stdout, proc.stdout
    assert_continues(run, uninterrupted, rel=1e-5)


def test_resume_on_more_ranks_converts_the_checkpoint(train_setup, uninterrupted, tmp_path):
    """1 rank (global batch 8 as 2 x 4) -> 2 ranks: the same sequences make every step, before and
    after the conversion."""
    root = train_setup[0]
    launch(
        train_args(train_setup, "to-two", "--grad_accum", "4", "--max_steps", "6", "--stop_at_step", "3"),
        nproc=1,
    )
    source = dump(train_setup, "to-two", 1, tmp_path / "one.pt")
    converted = dump(train_setup, "to-two", 2, tmp_path / "two.pt")
    assert_same_state(source, converted)
    proc = launch(train_args(train_setup, "to-two", "--max_steps", "6"), nproc=2)
    assert "world size 1 -> 2: --grad_accum 2 keeps the global batch of 8 sequences" in proc.stdout
    assert_continues(root / "to-two", uninterrupted, rel=1e-4)


@pytest.mark.parametrize("sharding", ["zero3", "zero2"], indirect=True)
def test_bf16_runs_resume_exactly_and_reuse_a_prepared_cache(train_setup, sharding, tmp_path):
    """bf16 on the CPU accelerator: DeepSpeed names the optimizer partitions bf16_zero_pp_rank_*,
    and a stopped run resumes to the uninterrupted run's losses and weights. The data comes from
    tools/prepare_data.py (two tokenizer processes), which the launcher reuses untouched."""
    from deus_dist.cli.prepare_data import main as prepare_main

    root, model, data = train_setup
    prepared = root / f"prepared-{sharding}"
    assert (
        prepare_main(
            [
                "--model",
                str(model),
                "--data",
                str(data),
                "--seq_len",
                "64",
                "--data_cache",
                str(prepared),
                "--num_proc",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    (folder,) = prepared.iterdir()
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    bf16 = ["--precision", "bf16", "--grad_accum", "2", "--max_steps", "4", *sharded(sharding)]
    whole = launch(train_args(train_setup, f"bf16-full-{sharding}", *bf16, cache=f"prepared-{sharding}"))
    assert "tokenizing" not in whole.stdout and "in bf16" in whole.stdout
    assert list(prepared.iterdir()) == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    launch(
        train_args(
            train_setup, f"bf16-part-{sharding}", *bf16, "--stop_at_step", "2", cache=f"prepared-{sharding}"
        )
    )
    ckpt = root / f"bf16-part-{sharding}" / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in ckpt.glob("*_states.pt"))
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in names, names
    again = launch(
        train_args(
            train_setup,
            f"bf16-part-{sharding}",
            "--precision",
            "bf16",
            "--max_steps",
            "4",
            *sharded(sharding),
            cache=f"prepared-{sharding}",
        )
    )
    assert "resumed from" in again.stdout
    assert_continues(root / f"bf16-part-{sharding}", root / f"bf16-full-{sharding}", rel=1e-6)
    state = json.loads(
        (root / f"bf16-part-{sharding}" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text()
    )
    assert state["precision"] == "bf16" and state["global_batch"] == 8


def test_trainable_all_changes_everything(train_setup):
    launch(train_args(train_setup, "all", "--grad_accum", "2", "--max_steps", "2", "--trainable", "all"))
    base, final = state_dict(train_setup[1]), state_dict(train_setup[0] / "all" / "final")
    unchanged = [n for n in base if torch.equal(base[n], final[n])]
    assert unchanged == []


@pytest.mark.parametrize("sharding", ["zero3", "zero2"], indirect=True)
def test_sigterm_under_torchrun_leaves_a_resumable_checkpoint(train_setup, sharding):
    root = train_setup[0]
    run = root / f"preempted-{sharding}"
    cmd = launch_cmd(
        train_args(
            train_setup,
            f"preempted-{sharding}",
            "--grad_accum",
            "2",
            "--max_steps",
            "400",
            *sharded(sharding),
        ),
        "torchrun",
    )
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
    assert "stopped on a signal after step" in out, out[-3000:]
    assert proc.returncode != 0  # torchrun reports its workers' status 3 as a failure of its own
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not list((run / "checkpoints").glob(".partial*"))
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    saved = state["step"]
    assert 2 <= saved < 400
    assert [r["step"] for r in read_metrics(run)] == list(range(1, saved + 1))
    # the same command continues from the checkpoint (stopping one step later to stay quick)
    again = launch(
        train_args(
            train_setup,
            f"preempted-{sharding}",
            "--max_steps",
            "400",
            "--stop_at_step",
            str(saved + 1),
            *sharded(sharding),
        ),
        launcher="torchrun",
    )
    assert f"at step {saved}" in again.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, saved + 2))


def test_layer_granular_zero3_fetching_computes_the_same(train_setup, uninterrupted):
    """The speed setting (decoder layers as ZeRO-3 leaves) against DeepSpeed's per-module hooks."""
    launch(
        train_args(
            train_setup,
            "noleaf",
            "--grad_accum",
            "2",
            "--max_steps",
            "6",
            "--no_zero3_leaf_layers",
            "--no_export",
        )
    )
    a, b = read_metrics(uninterrupted), read_metrics(train_setup[0] / "noleaf")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rb)


def test_activation_checkpointing_computes_the_same(train_setup, uninterrupted):
    launch(
        train_args(
            train_setup,
            "ckpt",
            "--grad_accum",
            "2",
            "--max_steps",
            "6",
            "--stop_at_step",
            "3",
            "--activation_checkpointing",
        )
    )
    a, b = read_metrics(uninterrupted)[:3], read_metrics(train_setup[0] / "ckpt")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rb)


def test_export_tool_and_damaged_checkpoints(train_setup, uninterrupted, tmp_path, capsys):
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
    proc = launch(train_args(train_setup, "x", "--max_steps", "8", "--output_dir", damaged), check=False)
    assert proc.returncode == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or corrupt" in proc.stderr
    # every rank found it: rank 0 alone prints it, with no rank prefix
    assert proc.stderr.count("zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or corrupt") == 1
    assert "error: rank " not in proc.stderr


def test_failed_data_build_stops_every_rank_with_its_message(train_setup):
    """Rank 0 builds the cache while rank 1 waits on a marker file: rank 0's error (a missing
    column) reaches rank 1 too, and the job ends at once with one message."""
    start = time.monotonic()
    proc = launch(
        train_args(train_setup, "bad-field", "--text_field", "body", "--max_steps", "2", cache="bad-cache"),
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("--text_field: ") == 1 and "has no column 'body'" in proc.stderr
    assert time.monotonic() - start < 240


def test_defaults_make_the_embedded_model_first_and_train(tmp_path):
    """The README's CPU commands with nothing given. cpt.py: rank 0 up-scales the embedded SmolLM2
    into ./upscaled and packs the embedded Wikipedia sample while rank 1 waits on marker files,
    longer than the collective timeout (--dist_timeout 10), then both train. sft.py: the same
    up-scaled model on the embedded ShareGPT subset, with the model's own chat template."""
    cmd = launch_cmd(
        ["--max_steps", "1", "--eval_batches", "1", "--no_export", "--quiet", "--dist_timeout", "10"]
    )
    proc = subprocess.run(cmd, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "up-scaling the embedded model first" in proc.stdout
    assert (tmp_path / "upscaled" / "SmolLM2-135M-Instruct-opt-deus-45L" / "deus_manifest.json").is_file()
    (record,) = read_metrics(tmp_path / "runs" / "cpt")
    assert record["step"] == 1 and 0 < record["loss"] < 10 and record["eval_ppl"] < 100
    cmd = launch_cmd(
        ["--max_steps", "1", "--eval_batches", "1", "--no_export", "--quiet"],
        script=REPO / "launchers" / "sft.py",
    )
    proc = subprocess.run(cmd, env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        "up-scaling" not in proc.stdout and "kept" in proc.stdout and "non-alternating turns" in proc.stdout
    )
    (record,) = read_metrics(tmp_path / "runs" / "sft")
    assert record["step"] == 1 and 0 < record["loss"] < 10 and record["eval_ppl"] < 100


def test_an_error_only_one_rank_finds_is_printed_by_that_rank_once(train_setup, tmp_path):
    """Two "nodes" of one rank each, where only rank 1's node lacks the --data file: rank 1 prints
    the error once, naming itself and its host; rank 0, waiting in a collective, stops too; both
    exit 2 within --dist_timeout."""
    import socket

    from conftest import launch_nodes, node_cmds

    root, _, data = train_setup
    local = tmp_path / "node-1-scratch"
    local.mkdir()

    def args(node):
        return train_args(
            train_setup,
            "one-rank-error",
            "--data",
            data if node == 0 else local / data.name,
            "--max_steps",
            "2",
            "--dist_timeout",
            "60",
            cache="one-rank-error-cache",
        )

    start = time.monotonic()
    procs = launch_nodes(node_cmds(args, "deepspeed"), timeout=300)
    out = "".join(p.stdout + p.stderr for p in procs)
    assert [p.returncode for p in procs] == [2, 2], out[-4000:]
    assert out.count(f"--data: {local / data.name}") == 1, out[-4000:]
    assert f"rank 1 ({socket.gethostname()}): --data: " in procs[1].stderr
    assert "Traceback" not in out
    assert time.monotonic() - start < 120


def test_moe_trains_with_the_router_aux_loss_resumes_exactly_and_exports(moe_train_setup):
    """Mixtral under ZeRO-3 with each decoder layer a leaf: only the new layers change, the router's
    load-balancing loss is optimised and logged, a stopped run resumes exactly, and the export is
    transformers' on-disk layout (per-expert tensors) with no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    root, model, _ = moe_train_setup
    full = launch(train_args(moe_train_setup, "full", "--grad_accum", "2", "--max_steps", "4"))
    assert "ZeRO-3 leaf modules (one parameter fetch per layer): MixtralDecoderLayer" in full.stdout
    records = read_metrics(root / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # transformers' aux loss of top-2 of 4 experts is about top_k = 2 when balanced
    assert all(1.0 < r["aux_loss"] < 4.0 for r in records), records
    assert len({r["aux_loss"] for r in records}) > 1

    new = set(load_manifest(model)["new_layers"])
    base, final = state_dict(model), state_dict(root / "full" / "final")
    assert base.keys() == final.keys()  # per-expert on-disk names, as the base
    changed = {n for n in base if not torch.equal(base[n], final[n])}
    for name in base:
        if not any(name.startswith(f"model.layers.{i}.") for i in new):
            assert name not in changed, f"frozen {name} changed"
    for i in new:
        assert f"model.layers.{i}.block_sparse_moe.gate.weight" in changed  # the router trains
        assert any(f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight" in changed for e in range(4))
    _, info = AutoModelForCausalLM.from_pretrained(root / "full" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    launch(
        train_args(moe_train_setup, "stopped", "--grad_accum", "2", "--max_steps", "4", "--stop_at_step", "2")
    )
    second = launch(train_args(moe_train_setup, "stopped", "--grad_accum", "2", "--max_steps", "4"))
    assert "resumed from" in second.stdout
    assert_continues(root / "stopped", root / "full", rel=1e-5)
    resumed = read_metrics(root / "stopped")
    assert [r["aux_loss"] for r in resumed] == pytest.approx([r["aux_loss"] for r in records], rel=1e-5)


def test_gpt_neox_trains_resumes_and_exports(tmp_path):
    """A GPT-style family (GPT-NeoX: fused per-head qkv, LayerNorm biases, parallel residual)
    under the same engine: only the new layers change, a stopped run resumes to the same weights
    and the export loads."""
    from transformers import AutoModelForCausalLM

    from conftest import make_training_model, write_wiki_jsonl

    model = make_training_model(tmp_path, "gpt_neox")
    setup = (tmp_path, model, write_wiki_jsonl(tmp_path / "wiki.jsonl", articles=4))
    full = tmp_path / "full"
    launch(train_args(setup, "full", "--grad_accum", "2", "--max_steps", "4"))
    launch(train_args(setup, "part", "--grad_accum", "2", "--max_steps", "4", "--stop_at_step", "2"))
    launch(train_args(setup, "part", "--max_steps", "4"))
    assert_continues(tmp_path / "part", full, rel=1e-5)

    new = set(load_manifest(model)["new_layers"])
    base, final = state_dict(model), state_dict(full / "final")
    changed = {n for n in base if not torch.equal(base[n], final[n])}
    assert changed and all(any(n.startswith(f"gpt_neox.layers.{i}.") for i in new) for n in changed)
    for i in new:  # the zero-init output projections and their biases trained
        assert {
            f"gpt_neox.layers.{i}.attention.dense.bias",
            f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
        } <= changed
    _, info = AutoModelForCausalLM.from_pretrained(full / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
