"""Training engine parts that need no process group: options, DeepSpeed JSON, trainable set, data,
schedule, checkpoint discovery, and every bad input of the launcher (checked before any rank starts)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    FAMILIES,
    HYBRID,
    MOE_FAMILIES,
    REPO,
    add_char_tokenizer,
    make_tiny,
    make_training_model,
    write_wiki_jsonl,
)
from deus_dist.architectures import architecture_for
from deus_dist.cli.args import parse_config
from deus_dist.configs import TrainConfig
from deus_dist.errors import UserError
from deus_dist.train import checkpointing
from deus_dist.train.data import TextPipeline
from deus_dist.train.ds_config import load_ds_config, resolve_ds_config
from deus_dist.train.loop import lr_at
from deus_dist.train.trainable import trainable_names

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Path:
    return make_training_model(tmp_path_factory.mktemp("up"))


def packed(*, model_dir: Path, cache_root: Path, seed: int, log=print, **options):
    """The rows cpt.py trains on for these data options: TextPipeline's spec, build and open."""
    pipeline = TextPipeline()
    spec = pipeline.spec(TrainConfig(**options), model_dir)
    return pipeline.open(pipeline.build(spec, model_dir, cache_root, log=log), seed)


def cpt(*args) -> int:
    from deus_dist.cli.train import main

    return main([str(a) for a in args])


def resolve(raw: dict, **kw) -> dict:
    opts = dict(
        micro_batch=4,
        grad_accum=8,
        world_size=2,
        lr=2e-4,
        betas=[0.9, 0.95],
        weight_decay=0.0,
        grad_clip=1.0,
        hidden_size=64,
        cuda=False,
    )
    opts.update(kw)
    return resolve_ds_config(raw, **opts)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_ds_config_loads_through_the_launcher_parser(path):
    raw = load_ds_config(path)
    assert raw["_comment"].split(":")[0] and "launchers/cpt.py" in raw["_comment"]
    assert f"ds_configs/{path.name}" in raw["_comment"]
    cfg = parse_config(
        TrainConfig, ["--ds_config", str(path), "--micro_batch", "2", "--grad_accum", "3"], "t", ""
    )
    ds = resolve(
        raw, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world_size=4, cuda="cpu" not in path.name
    )
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"]["stage"] == int(path.name[len("zero")])  # zero1, zero2, zero3*.json
    assert "auto" not in json.dumps(ds)


def test_ds_config_autos_come_from_the_options_and_disagreements_are_named():
    raw = load_ds_config(REPO / "ds_configs" / "zero3_cpu.json")
    ds = resolve(raw)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["gradient_clipping"] == 1.0
    bad = {
        **raw,
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 7,
        "scheduler": {"type": "WarmupLR"},
    }
    with pytest.raises(UserError) as e:
        resolve(bad)
    text = str(e.value)
    assert "--micro_batch 4 disagrees with train_micro_batch_size_per_gpu=2" in text
    assert "train_batch_size=7" in text and "scheduler" in text


def test_trainable_sets(up):
    from deus_dist.checkpoint import CheckpointReader
    from deus_dist.checkpoint.manifest import read_manifest

    with CheckpointReader(up) as r:
        names, arch = list(r.tensors), architecture_for(r.config)
    manifest = read_manifest(up)
    new = trainable_names(names, "new", arch, manifest, False)
    assert {arch.split_name(n)[0] for n in new} == set(manifest["new_layers"])
    assert len(new) == 9 * len(manifest["new_layers"])
    with_emb = trainable_names(names, "new", arch, manifest, True)
    assert set(with_emb) - set(new) == {"model.embed_tokens.weight"} | ({"lm_head.weight"} & set(names))
    assert trainable_names(names, "all", arch, None, False) == names
    assert trainable_names(names, r"mlp\.down", arch, None, False) == [n for n in names if "mlp.down" in n]
    with pytest.raises(UserError, match="--trainable 'nothing' matches no parameter"):
        trainable_names(names, "nothing", arch, None, False)
    with pytest.raises(UserError, match="no deus_manifest.json.*--trainable all"):
        trainable_names(names, "new", arch, None, False)


def test_gpt_neox_train_embeddings_reach_the_model_head(tmp_path):
    """GPT-NeoX checkpoints name the output head embed_out; transformers' model calls it lm_head:
    --train_embeddings picks the on-disk names, and the parameters holding them are the model's."""
    from transformers import AutoModelForCausalLM

    from deus_dist.checkpoint import CheckpointReader
    from deus_dist.checkpoint.layout import parameters_holding

    base = make_tiny(tmp_path / "base", "gpt_neox")
    with CheckpointReader(base) as r:
        names, arch = list(r.tensors), architecture_for(r.config)
    chosen = trainable_names(names, "new", arch, {"new_layers": [1]}, True)
    assert {"embed_out.weight", "gpt_neox.embed_in.weight"} <= set(chosen)
    model = AutoModelForCausalLM.from_pretrained(base)
    params = parameters_holding(model, chosen)
    assert {"lm_head.weight", "gpt_neox.embed_in.weight"} <= set(params)
    assert {arch.split_name(n)[0] for n in params if arch.split_name(n)} == {1}


def test_packing_order_and_held_out_split(tmp_path, up):
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=6, chars=2000)
    kw = dict(
        data=str(data),
        eval_data=None,
        eval_fraction=0.2,
        text_field="text",
        seq_len=32,
        model_dir=up,
        cache_root=tmp_path / "cache",
        log=lambda *a: None,
    )
    a = packed(seed=0, **kw)
    b = packed(seed=1, **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # tokenized once: the seed is not in the key
    assert a.train.ids.shape[1] == 32 and len(a.train) > 100 and len(a.eval) > 10
    np.testing.assert_array_equal(a.eval.ids, b.eval.ids)  # held-out documents do not move with --seed
    first = a.batch(0, 4)["input_ids"]
    np.testing.assert_array_equal(first.numpy(), packed(seed=0, **kw).batch(0, 4)["input_ids"].numpy())
    assert not np.array_equal(first.numpy(), b.batch(0, 4)["input_ids"].numpy())
    assert a.targets(0, 4) == 4 * 31  # every token after the first of a block is a target
    # one epoch visits every block once; position n continues in the next epoch's order
    epoch = a.batch(0, len(a.train))["input_ids"].numpy()
    assert len({row.tobytes() for row in epoch}) == len({row.tobytes() for row in np.asarray(a.train.ids)})
    # 4 training documents, each followed by EOS (id 1); the last may fall in the dropped remainder
    assert (np.asarray(a.train.ids) == 1).sum() in (3, 4)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(1, cfg, 4) == pytest.approx(1e-3)  # short runs: warm-up capped at a tenth


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "trainer_state.json").write_text("{}")
    (root / "step-00000004").mkdir()  # killed mid-save: no trainer_state.json
    (root / ".partial-step-00000006").mkdir()
    assert checkpointing.find_checkpoint("auto", tmp_path / "run") == root / "step-00000002"
    assert checkpointing.find_checkpoint("none", tmp_path / "run") is None
    assert checkpointing.find_checkpoint(str(root), tmp_path) == root / "step-00000002"


# -- bad input: one clear error naming the option, before any process starts ----------------------


def _errors(capsys, *args) -> str:
    assert cpt(*args) == 2
    return capsys.readouterr().err


def test_bad_inputs_name_their_option(tmp_path, up, capsys):
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=3)
    common = ["--model", up, "--data", data, "--output_dir", tmp_path / "run"]
    plain = make_tiny(tmp_path / "plain")
    add_char_tokenizer(plain)
    err = _errors(capsys, "--model", plain, "--data", data, "--output_dir", tmp_path / "r")
    assert "no deus_manifest.json" in err and "--trainable all" in err
    assert "--data: " in _errors(capsys, *common[:2], "--data", tmp_path / "missing.jsonl")
    assert "--model: " in _errors(capsys, "--model", tmp_path / "nope", "--data", data)
    assert "--seq_len 4096 exceeds the model's context of 256" in _errors(
        capsys, *common, "--seq_len", "4096"
    )
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    assert "--micro_batch 4 disagrees" in _errors(capsys, *common, "--ds_config", ds, "--micro_batch", "4")
    assert "--ds_config: " in _errors(capsys, *common, "--ds_config", tmp_path / "none.json")
    assert "--resume: " in _errors(capsys, *common, "--resume", tmp_path / "no-ckpt")
    err = _errors(capsys, *common, "--micro_batch", "0", "--lr", "-1", "--trainable", "(")
    assert all(s in err for s in ("--micro_batch must be at least 1", "--lr must be positive", "--trainable"))


def test_checkpoint_from_another_model_is_refused(tmp_path, up, capsys):
    other = make_training_model(tmp_path / "other")  # same shapes, different weights and manifest
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=3)
    run = tmp_path / "run"
    state = checkpointing.TrainState(
        total_steps=4,
        world_size=1,
        trainable=[],
        options={},
        step=2,
        model={"path": str(other), "identity": checkpointing.model_identity(other)},
    )
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").write_text(json.dumps(asdict(state)))
    err = _errors(capsys, "--model", up, "--data", data, "--output_dir", run)
    assert "--model: " in err and f"was trained from {other}" in err


def test_data_errors_name_their_option(tmp_path, up):
    kw = dict(
        eval_data=None,
        eval_fraction=0.2,
        seq_len=32,
        model_dir=up,
        cache_root=tmp_path / "c",
        seed=0,
        log=lambda *a: None,
    )
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=3)
    with pytest.raises(UserError, match="--text_field: .* has no column 'body'"):
        packed(data=str(data), text_field="body", **kw)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(UserError, match="--data: .* no non-empty 'text' texts"):
        packed(data=str(empty), text_field="text", **kw)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n{"text": "also tiny"}\n')
    with pytest.raises(UserError, match="--data: fewer than --seq_len=32 tokens"):
        packed(data=str(short), text_field="text", **kw)
    assert not list((tmp_path / "c").iterdir())  # nothing half-made


def test_rank_layout_from_launchers_and_slurm(monkeypatch):
    from deus_dist.train.dist import layout

    for var in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert layout() == (0, 0, 1)
    # the batch script of a 16-task allocation: a plain `python` there is one process, not rank 0
    # of 16 peers that will never come
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert layout() == (0, 0, 1)
    # a task srun started
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    assert layout() == (9, 1, 16)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert layout() == (3, 3, 4)  # torchrun/deepspeed variables win over SLURM's
    assert layout(local_rank_flag=2) == (3, 2, 4)  # --local_rank from the deepspeed launcher


def test_gpu_choice_follows_the_visible_devices():
    from deus_dist.train.dist import cuda_device_index

    assert cuda_device_index(local_rank=5, visible=8) == 5  # every task of a node sees every GPU
    assert cuda_device_index(local_rank=5, visible=1) == 0  # srun --gpus-per-task=1
    with pytest.raises(UserError, match="local rank 3 but only 2 GPU"):
        cuda_device_index(local_rank=3, visible=2)


def test_init_picks_the_visible_gpu_with_a_mocked_device_count(monkeypatch):
    """init_distributed on a node where SLURM gave each task one GPU (LOCAL_RANK 3, one device
    visible): it drives cuda:0, not cuda:3. CUDA and the process group are mocked."""
    import torch

    from deus_dist.train import dist

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no real NCCL group here
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: None)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    env = dist.init_distributed()
    assert chosen == [0] and env.device == torch.device("cuda", 0)
    assert (env.rank, env.local_rank, env.world_size) == (11, 3, 16)


def test_slurm_master_port_comes_from_the_job_id(monkeypatch):
    from deus_dist.train import dist

    # _export_layout writes these: registered here so the test leaves the environment as it was
    for var in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_PORT",
        "MASTER_ADDR",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    dist._export_layout(4, 0, 16)
    port = int(dist.os.environ["MASTER_PORT"])
    assert port == dist.slurm_master_port("123456") and 20000 <= port < 60000
    assert dist.slurm_master_port("123457") != port  # the next job on the node uses another port
    monkeypatch.setenv("MASTER_PORT", "31000")  # given: kept
    dist._export_layout(4, 0, 16)
    assert dist.os.environ["MASTER_PORT"] == "31000"


def test_parquet_and_text_folders_load(tmp_path, up):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deus_dist.embedded import wikipedia_split

    texts = [a["text"][:3000] for a in wikipedia_split("train")[:5]]
    pq.write_table(pa.table({"body": texts, "n": list(range(5))}), tmp_path / "d.parquet")
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    kw = dict(eval_data=None, eval_fraction=0.2, seq_len=32, model_dir=up, seed=0, log=lambda *a: None)
    a = packed(data=str(tmp_path / "d.parquet"), text_field="body", cache_root=tmp_path / "c1", **kw)
    b = packed(data=str(folder), text_field="text", cache_root=tmp_path / "c2", **kw)
    assert len(a.train) > 100 and len(b.train) > 100 and len(a.eval) and len(b.eval)
    (folder / "extra.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="--data: .* mixes file kinds"):
        packed(data=str(folder), text_field="text", cache_root=tmp_path / "c3", **kw)


# -- resuming: what must match, found before any rank starts ------------------------------------------


def _checkpoint_of(tmp_path, up, data, *options) -> Path:
    """A run directory holding the trainer state a run with ``options`` would save at step 2 (no
    DeepSpeed files: whatever passes the option checks is then refused for those)."""
    from deus_dist.train import setup as run_setup

    run = tmp_path / "run"
    cfg = parse_config(
        TrainConfig,
        [
            "--model",
            str(up),
            "--data",
            str(data),
            "--output_dir",
            str(run),
            "--data_cache",
            str(tmp_path / "c"),
            *map(str, options),
        ],
        "t",
        "",
    )
    setup = run_setup.validate(cfg, 2, False, TextPipeline(), log=lambda *a: None)
    state = run_setup.fresh_state(setup, 10)
    state.step, state.consumed = 2, 16
    ckpt = run / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(asdict(state)))
    return run


def test_resume_refuses_changed_options_naming_both_values(tmp_path, up, capsys):
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=4)
    run = _checkpoint_of(
        tmp_path, up, data, "--seq_len", "32", "--micro_batch", "2", "--grad_accum", "2", "--seed", "1"
    )
    common = ["--model", up, "--output_dir", run, "--data_cache", tmp_path / "c"]
    err = _errors(capsys, *common, "--data", data, "--seq_len", "64", "--seed", "2", "--grad_accum", "3")
    assert "--seq_len: " in err and "trained with 32, this run has 64" in err and "--seq_len 32" in err
    assert "--seed: " in err and "--seed 1, this run has 2" in err
    assert "global batch of 8 sequences, this run has 2 x 3 x 1 rank(s) = 6" in err
    assert "--resume none" in err  # the way forward
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("the", "a"))
    err = _errors(capsys, *common, "--data", other)
    assert "--data: " in err and "trained on other data" in err
    assert "--text_field: " in _errors(capsys, *common, "--data", data, "--text_field", "title")
    # the same corpus staged at another path is the same data: only the (absent) DeepSpeed files
    # are missing now, and --grad_accum left out is chosen to keep the global batch on 1 rank
    staged = tmp_path / "scratch" / "copy.jsonl"
    staged.parent.mkdir()
    staged.write_bytes(data.read_bytes())
    err = _errors(capsys, *common, "--data", staged, "--seed", "1")
    assert "--data" not in err and "--grad_accum" not in err and "has no model states of rank 0" in err


def test_resume_that_cannot_keep_the_global_batch_says_what_to_pass(tmp_path, up, capsys):
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=4)
    run = _checkpoint_of(tmp_path, up, data, "--micro_batch", "3", "--grad_accum", "1")  # 3 x 1 x 2 ranks = 6
    err = _errors(
        capsys,
        "--model",
        up,
        "--output_dir",
        run,
        "--data",
        data,
        "--data_cache",
        tmp_path / "c",
        "--micro_batch",
        "4",
    )
    assert "global batch of 6 sequences cannot be split into --micro_batch 4 x 1 rank(s)" in err


def test_rank_files_follow_deepspeeds_names_in_both_precisions(tmp_path):
    import zipfile

    for name in (
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("data.pkl", b"x")
    found = checkpointing.rank_files(tmp_path)
    assert sorted(found["optim"]) == [0, 1] and found["optim"][1].name.startswith("bf16_")
    assert checkpointing.damaged_files(tmp_path, 2) == []
    (tmp_path / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    (problem,) = checkpointing.damaged_files(tmp_path, 2)
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing or corrupt" in problem
    (problem, *_) = checkpointing.damaged_files(tmp_path, 3)
    assert "no model states of rank 2" in problem


def test_precision_fills_the_json_and_contradictions_are_named():
    raw = load_ds_config(REPO / "ds_configs" / "zero3_cpu.json")
    assert resolve(raw)["bf16"]["enabled"] is False  # auto on a CPU: fp32
    assert resolve(raw, cuda=True)["bf16"]["enabled"] is True  # auto on a GPU with bf16
    assert resolve(raw, cuda=True, bf16_supported=False)["bf16"]["enabled"] is False  # e.g. a V100
    assert resolve(raw, precision="bf16")["bf16"]["enabled"] is True  # bf16 on the CPU accelerator
    with pytest.raises(UserError, match="--precision fp32 disagrees with bf16.enabled=True"):
        resolve({**raw, "bf16": {"enabled": True}}, precision="fp32")


def test_flops_per_token_halves_causal_attention():
    from deus_dist.flops import flops_per_token

    kw = dict(layer_params=[100, 100], head_params=50, hidden=8, seq_len=16, embeddings_train=False)
    attn = 2 * 16 * 8  # QK^T and AV over the lower triangle: half of 4 * seq * hidden
    top = flops_per_token(trainable_layer_params=[0, 100], **kw)
    forward = 2 * 200 + 2 * attn + 2 * 50
    backward_inputs = (2 * 100 + 2 * attn) + 2 * 50  # only from the lowest trainable layer up
    assert top == forward + backward_inputs + 2 * 100


def test_path_like_data_that_does_not_exist_is_an_error_not_a_hub_lookup(tmp_path, monkeypatch):
    from deus_dist.data_sources import looks_like_path, source_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for value in ("corpus/missing.jsonl", "./wiki", "corpus/fineweb", "data.parquet", "/abs/path"):
        assert looks_like_path(value), value
        with pytest.raises(UserError, match=f"--data: {value} does not exist"):
            source_identity(value, "--data")
    assert not looks_like_path("HuggingFaceFW/fineweb-edu")
    assert source_identity("HuggingFaceFW/fineweb-edu", "--data").builder == "hub"


def test_prepare_data_tool_reports_bad_input(tmp_path, up, capsys):
    from deus_dist.cli.prepare_data import main as prepare_main

    assert (
        prepare_main(
            ["--model", str(tmp_path / "nope"), "--data", str(tmp_path / "missing.jsonl"), "--num_proc", "0"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--model: " in err and "--num_proc must be positive" in err
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=2)
    assert (
        prepare_main(
            [
                "--model",
                str(up),
                "--data",
                str(data),
                "--text_field",
                "body",
                "--data_cache",
                str(tmp_path / "c"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "--text_field: " in capsys.readouterr().err
    assert not [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]


def test_moe_refuses_per_module_zero3_fetching_and_training_part_of_a_stacked_parameter(tmp_path, capsys):
    """Both are refused before any rank starts: a mixture-of-experts layer must be one ZeRO-3 leaf,
    and transformers stacks every expert of a layer into one parameter, so one expert cannot train
    alone."""
    model = make_training_model(tmp_path, "mixtral")
    data = write_wiki_jsonl(tmp_path / "wiki.jsonl", articles=2)
    common = ["--model", model, "--data", data, "--ds_config", REPO / "ds_configs" / "zero3_cpu.json"]
    capsys.readouterr()
    assert cpt(*common, "--output_dir", tmp_path / "a", "--no_zero3_leaf_layers") == 2
    err = capsys.readouterr().err
    assert "--no_zero3_leaf_layers" in err and "mixture-of-experts" in err
    assert cpt(*common, "--output_dir", tmp_path / "b", "--trainable", r"layers\.7\..*experts\.0\.") == 2
    err = capsys.readouterr().err
    assert "--trainable" in err and "model.layers.7.mlp.experts.gate_up_proj" in err and "1 of 4" in err
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_moe_mfu_counts_the_experts_a_token_uses_and_the_stacked_parameters_that_train(tmp_path):
    import types

    from transformers import AutoModelForCausalLM

    from deus_dist.train.accounting import layer_param_counts

    base = make_tiny(tmp_path / "base", "mixtral")  # 4 experts, top-2
    config = json.loads((base / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.3."))
    setup = types.SimpleNamespace(model_config=config, arch=architecture_for(config))
    layers, trainable, head = layer_param_counts(setup, model)
    layer = model.model.layers[3]
    experts = layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
    rest = sum(p.numel() for p in layer.parameters()) - experts
    assert layers == [rest + experts * 2 / 4] * 6
    assert trainable == [0, 0, 0, rest + experts * 2 / 4, 0, 0]
    assert head == 128 * 64


def test_attention_on_a_gpu_is_flash_attention_where_installed_the_dtype_allows_and_the_class_has_it(
    monkeypatch,
):
    """The GPU half of the loader's choice, on CPU: a GPU with flash-attn installed and a 16-bit
    compute dtype gets FlashAttention 2 for a class that supports it; fp32, a missing flash-attn or
    a class without it fall back to SDPA, and a class without SDPA to eager."""
    import importlib.util

    import torch

    from deus_dist.train.model import attention_implementation

    class Flash:
        _supports_flash_attn, _supports_sdpa = True, True

    class SdpaOnly:
        _supports_flash_attn, _supports_sdpa = False, True

    class EagerOnly:
        _supports_flash_attn, _supports_sdpa = False, False

    bf16 = resolve(load_ds_config(REPO / "ds_configs" / "zero2.json"), precision="bf16")
    fp32 = resolve(load_ds_config(REPO / "ds_configs" / "zero2.json"), precision="fp32")
    find_spec = importlib.util.find_spec

    def flash_attn_installed(yes: bool):
        fake = object() if yes else None
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: fake if name == "flash_attn" else find_spec(name, *a),
        )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flash_attn_installed(True)
    assert attention_implementation(bf16, Flash) == "flash_attention_2"
    assert attention_implementation(fp32, Flash) == "sdpa"
    assert attention_implementation(bf16, SdpaOnly) == "sdpa"
    assert attention_implementation(bf16, EagerOnly) == "eager"
    flash_attn_installed(False)
    assert attention_implementation(bf16, Flash) == "sdpa"


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES + [HYBRID])
def test_every_family_loads_for_training_with_an_attention_it_supports(tmp_path, family):
    """The launcher's loader asks each model class for SDPA and falls back to eager attention where
    the class has none (Gemma-2 soft-caps its scores); transformers refuses an implementation a
    class lacks, so a fused Gemma-2 would not train otherwise. One training step's forward and
    backward run on what it loads."""
    import torch

    from deus_dist.train.model import causal_lm_class, load_model

    path = make_tiny(tmp_path / family, family)
    ds = resolve(load_ds_config(REPO / "ds_configs" / "zero2.json"), precision="fp32")
    model, hf_ds = load_model(path, ds, activation_checkpointing=True)
    assert hf_ds is None  # ZeRO-2 loads whole weights
    sdpa = causal_lm_class(model.config)._supports_sdpa
    assert model.config._attn_implementation == ("sdpa" if sdpa else "eager")
    assert sdpa or family == "gemma2"
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )


FAULTS_OF_REUSE = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from deus_dist.train.dist import keep_freed_cpu_memory
    assert keep_freed_cpu_memory()
def fill():
    torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: over glibc's largest mmap threshold (32 MiB)
for _ in range(10):  # the heap grows until a freed block has room for an aligned one
    fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    """glibc hands every block over its mmap threshold back to the OS when it is freed, so a tensor
    as large as a flattened gradient partition is page-faulted in afresh on every step."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_OF_REUSE, mode], capture_output=True, text=True, check=True
        ).stdout
        return int(out.split()[-1])

    page = resource.getpagesize()
    default, kept = faults("default"), faults("kept")
    assert default > 10 * (64 << 20) // page // 2  # each of the 10 fills faults its pages in again
    assert kept < (64 << 20) // page // 10  # refilled from the pages already there, once warmed up
