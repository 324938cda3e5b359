"""Issue 20: no error lost, no input deleted, no torn file blocks a resume.

Fast tests, in one process: one real single-rank DeepSpeed engine (gloo on the CPU) serves the
checkpoint tests; the writing tools run in-process on tiny real models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, TRAIN_COMMON, make_training_model, write_wiki_jsonl
from deus_dist.errors import CheckpointError, UserError
from deus_dist.train import checkpointing


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Path:
    return make_training_model(tmp_path_factory.mktemp("up"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, up):
    """A run brought up to its first step on one rank: a real ZeRO-3 engine over gloo."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from deus_dist.cli.args import parse_config
    from deus_dist.configs import TrainConfig
    from deus_dist.train.run import start

    root = tmp_path_factory.mktemp("one_rank")
    data = write_wiki_jsonl(root / "wiki.jsonl", articles=4)
    argv = [
        "--ds_config",
        REPO / "ds_configs" / "zero3_cpu.json",
        "--model",
        up,
        "--data",
        data,
        "--output_dir",
        root / "run",
        *TRAIN_COMMON,
    ]
    layout = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in layout}  # init_distributed exports the rank layout
    run = start(parse_config(TrainConfig, [str(a) for a in argv], "cpt.py", ""), log=lambda *a: None)
    # the engine holds its ZeRO-3 partitions; later in-process model loads must not be partitioned
    unset_hf_deepspeed_config()
    yield run
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# -- 2. a torn last line in metrics.jsonl --------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    from deus_dist.train.metrics import Metrics

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-append
    Metrics(tmp_path, enabled=True, resume_step=3).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(line + "\n" for line in lines)
    err = capsys.readouterr().err
    assert "warning: " in err and "metrics.jsonl" in err and "half-written last line" in err


def test_a_corrupt_metrics_line_in_the_middle_is_refused(tmp_path):
    from deus_dist.train.metrics import Metrics

    text = '{"step": 1}\n{"step": 2, oops\n{"step": 3}\n'
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(UserError, match=r"--output_dir: .*metrics.jsonl line 2 is not JSON"):
        Metrics(tmp_path, enabled=True, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == text  # left for the user to look at


# -- 4. saving a step again never leaves `latest` pointing at nothing -----------------------------------


def test_saving_a_step_again_keeps_the_old_copy_when_the_rename_fails(one_rank, monkeypatch):
    run = one_rank
    root = run.setup.run_dir / "checkpoints"
    state = run.state
    state.step = 7
    first = checkpointing.save(run.engine, run.env, state, root, keep=0)
    marker = first / "saved-first"
    marker.write_text("")
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".partial-"):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        checkpointing.save(run.engine, run.env, state, root, keep=0)
    monkeypatch.undo()
    assert marker.exists() and (first / checkpointing.STATE_NAME).is_file()
    assert (root / (root / "latest").read_text()).is_dir()


# -- 5. only a checkpoint-format failure says "corrupt checkpoint" ----------------------------------------


def test_load_raises_failures_that_are_not_the_checkpoints_as_they_are(one_rank, monkeypatch):
    run = one_rank
    root = run.setup.run_dir / "checkpoints"
    run.state.step = 9
    saved = checkpointing.save(run.engine, run.env, run.state, root, keep=0)
    for error in (torch.OutOfMemoryError("CPU out of memory"), RuntimeError("Connection closed by peer")):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(run.engine, "load_checkpoint", fail)
        with pytest.raises(type(error)) as caught:
            checkpointing.load(run.engine, run.env, saved)
        assert not isinstance(caught.value, CheckpointError)
        assert any("rank 0" in note for note in getattr(caught.value, "__notes__", []))
    monkeypatch.undo()
    model_states = checkpointing.rank_files(saved)["model"][0]
    model_states.write_bytes(model_states.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="--resume: .* is corrupt or incomplete"):
        checkpointing.load(run.engine, run.env, saved)


# -- 6. find_checkpoint names the option the user typed ---------------------------------------------------


def test_find_checkpoint_names_the_option_it_is_given(tmp_path):
    with pytest.raises(UserError) as caught:
        checkpointing.find_checkpoint(str(tmp_path), tmp_path, "CHECKPOINT_DIR")
    assert str(caught.value).startswith("CHECKPOINT_DIR: ") and "--resume" not in str(caught.value)


def test_export_names_its_positional_checkpoint(tmp_path, capsys):
    from deus_dist.cli.export import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "CHECKPOINT_DIR: " in err and "--resume" not in err


# -- 7. an output never touches an input, --force or not --------------------------------------------------


def test_fuse_refuses_an_out_that_contains_its_model(tmp_path, capsys):
    from conftest import fuse, make_tiny

    model = make_tiny(tmp_path / "parent" / "m")
    before = sorted(p.name for p in model.iterdir())
    assert fuse("--model", model, "--out", tmp_path / "parent", "--force", "--quiet") == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path / 'parent'} contains --model {model}" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_export_refuses_the_run_directory_and_writes_into_a_new_folder_of_it(one_rank, capsys):
    from deus_dist.cli.export import main

    run = one_rank
    run.state.step = 11
    checkpointing.save(run.engine, run.env, run.state, run.setup.run_dir / "checkpoints", keep=0)
    ckpts = run.setup.run_dir / "checkpoints"
    for out in (run.setup.run_dir, ckpts, ckpts / "step-00000011" / "hf"):
        assert main([str(ckpts), str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"OUT_DIR: {out} " in err and "CHECKPOINT_DIR" in err
    assert (ckpts / "step-00000011" / checkpointing.STATE_NAME).is_file()
    assert (run.setup.run_dir / "data_cache").is_dir()
    assert main([str(ckpts), str(run.setup.run_dir / "final")]) == 0
    assert (run.setup.run_dir / "final" / "config.json").is_file()


def test_output_checks_name_both_paths():
    from deus_dist.outputs import Input, output_problems

    run = REPO / "tests"
    inputs = [Input("--model", REPO / "deus_dist"), Input("CHECKPOINT_DIR", run, holds_outputs=True)]
    assert output_problems(REPO / "deus_dist", "--out", "dir", inputs) == [
        f"--out: {REPO / 'deus_dist'} is --model {REPO / 'deus_dist'}, an input; write somewhere else"
    ]
    assert "is inside --model" in output_problems(REPO / "deus_dist" / "x", "--out", "dir", inputs)[0]
    contains = output_problems(REPO, "--out", "dir", inputs)
    assert "contains --model" in contains[0] and "contains CHECKPOINT_DIR" in contains[1]
    assert output_problems(run / "final", "--out", "dir", inputs) == []
    assert output_problems("org/model-on-the-hub", "--out", "dir", [Input("--model", "org/m")]) == []


# -- 8. output paths of the wrong kind, found before any work ---------------------------------------------


def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(tmp_path, up, capsys):
    from conftest import fuse
    from deus_dist.cli import eval_ppl, eval_tasks, export, prepare_data
    from deus_dist.cli.train import main as train_main

    def cpt(*args):
        return train_main([str(a) for a in args])

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=2)
    cases = [
        (lambda: fuse("--model", up, "--out", a_file / "out", "--quiet"), "--out"),
        (
            lambda: eval_ppl.main(["--model", str(up), "--output_json", str(a_dir), "--quiet"]),
            "--output_json",
        ),
        (
            lambda: eval_ppl.main(["--model", str(up), "--output_json", str(a_file / "r.json"), "--quiet"]),
            "--output_json",
        ),
        (
            lambda: eval_tasks.main(["--model", str(up), "--output_path", str(a_file), "--quiet"]),
            "--output_path",
        ),
        (
            lambda: prepare_data.main(
                ["--model", str(up), "--data", str(data), "--data_cache", str(a_file), "--quiet"]
            ),
            "--data_cache",
        ),
        (lambda: export.main([str(tmp_path), str(a_file / "x")]), "OUT_DIR"),
        (lambda: cpt("--model", up, "--data", data, "--output_dir", a_file), "--output_dir"),
        (lambda: cpt("--model", up, "--data", data, "--data_cache", a_file / "c"), "--data_cache"),
        (lambda: cpt("--model", up, "--data", data, "--output_dir", up), "--output_dir"),
    ]
    for call, option in cases:
        assert call() == 2, option
        err = capsys.readouterr().err
        assert f"{option}: " in err and "Traceback" not in err, err


# -- 3. a builder that dies without a word stops the ranks waiting for it ---------------------------------

BUILDER = """
import sys, time
from pathlib import Path
import torch
from deus_dist.train import cluster
from deus_dist.train.dist import DistEnv

cluster.HEARTBEAT_S = 0.2
directory, seconds = Path(sys.argv[1]), float(sys.argv[2])


def barrier():  # no process group: the waiting rank (the test) says when it has read the result
    while not (directory / "read").exists():
        time.sleep(0.05)


cluster.barrier = barrier


def build():
    time.sleep(seconds)
    (directory / "built").write_text("by rank 0")


cluster._first_then_others(directory, DistEnv(0, 0, 2, torch.device("cpu"), "n"), "t", 0, build, build)
"""


def test_waiting_ranks_stop_when_the_builders_heartbeat_goes_stale(tmp_path, monkeypatch):
    """Rank 0 (a real process) builds while this process waits as rank 1: a build longer than the
    stale limit is waited for while its heartbeat beats; a builder killed outright stops the wait."""
    import subprocess
    import sys
    import time

    from deus_dist.train import cluster
    from deus_dist.train.dist import DistEnv

    monkeypatch.setattr(cluster, "HEARTBEAT_STALE_S", 1.0)
    rank1 = DistEnv(1, 1, 2, torch.device("cpu"), "n")

    def waiter(directory):
        def then():
            (directory / "read").touch()
            return (directory / "built").read_text()

        return cluster._first_then_others(directory, rank1, "t", 0, None, then)

    def builder(directory, seconds):
        directory.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(directory), str(seconds)], cwd=REPO)
        while not list(directory.glob("*.alive")):  # started (ranks arrive together, after a collective)
            time.sleep(0.1)
        return proc

    slow = builder(tmp_path / "slow", 2.5)  # 2.5 times the stale limit
    assert waiter(tmp_path / "slow") == "by rank 0"
    assert slow.wait(30) == 0
    builder(tmp_path / "killed", 600.0).kill()
    start = time.monotonic()
    with pytest.raises(UserError, match=r"rank 0 .*stopped .*heartbeat") as caught:
        waiter(tmp_path / "killed")
    assert time.monotonic() - start < 10 and str(tmp_path / "killed") in str(caught.value)


def test_nan_and_infinite_numbers_are_refused_where_options_are_parsed(tmp_path):
    from deus_dist.cli.args import parse_config
    from deus_dist.configs import TrainConfig

    for text in ("nan", "inf", "Infinity"):
        with pytest.raises(UserError, match=rf"--lr: invalid value '{text}' \(expected a finite number\)"):
            parse_config(TrainConfig, ["--lr", text], "cpt.py", "")
    (tmp_path / "c.yaml").write_text("weight_decay: .nan\n")
    with pytest.raises(UserError, match="--config key 'weight_decay': invalid value nan"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml")], "cpt.py", "")


def test_a_deepspeed_config_deepspeed_refuses_is_reported_before_data_is_packed(tmp_path, up):
    from deus_dist.cli.args import parse_config
    from deus_dist.configs import TrainConfig
    from deus_dist.train import setup as run_setup
    from deus_dist.train.data import TextPipeline

    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"]["stage"] = 7
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=2)
    argv = [
        "--model",
        up,
        "--data",
        data,
        "--ds_config",
        tmp_path / "ds.json",
        "--output_dir",
        tmp_path / "r",
    ]
    cfg = parse_config(TrainConfig, [str(a) for a in argv], "cpt.py", "")
    with pytest.raises(
        UserError, match=r"--ds_config: DeepSpeed refuses stage=7: Input should be 0, 1, 2, 3"
    ):
        run_setup.validate(cfg, 2, False, TextPipeline(), log=lambda *a: None)
    assert not (tmp_path / "r" / "data_cache").exists()


def test_a_checkpoint_without_tokenizer_is_named_by_eval_tasks(tmp_path, up, capsys):
    import shutil

    from deus_dist.cli import eval_tasks

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in up.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name.endswith("index.json"):
            shutil.copy2(f, bare / f.name)
    argv = ["--model", str(bare), "--tasks", "piqa", "--limit", "1", "--output_path", str(tmp_path / "o")]
    assert eval_tasks.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--model: {bare} has no usable tokenizer" in err and "Traceback" not in err


def test_prepare_data_refuses_a_seq_len_above_the_models_context(tmp_path, up, capsys):
    from deus_dist.cli import prepare_data

    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=2)
    argv = ["--model", str(up), "--data", str(data), "--data_cache", str(tmp_path / "c"), "--quiet"]
    assert prepare_data.main([*argv, "--seq_len", "4096"]) == 2
    assert "--seq_len 4096 exceeds the model's context of 256 tokens" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_study_report_with_no_finished_cell_is_refused(tmp_path, capsys):
    from deus_dist.cli.study import main

    assert main(["--report_only", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--report_only: no cell" in err and str(tmp_path / "s") in err
    assert not (tmp_path / "s" / "report.md").exists()


def test_study_errors_name_the_yaml_key_not_a_flag_the_study_lacks(tmp_path, capsys):
    import yaml

    from deus_dist.cli.study import main

    study = yaml.safe_load((REPO / "studies" / "default.yaml").read_text())
    study["eval"]["tasks"] = ["piqa", "nope"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["--config", str(tmp_path / "s.yaml"), "--dry_run", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "eval: tasks: unknown or unavailable task(s) nope" in err and "--tasks" not in err


def test_sft_format_that_does_not_match_the_data_names_format(tmp_path, up):
    from conftest import write_chat_jsonl
    from deus_dist.configs import SftConfig
    from deus_dist.train.chat_data import ChatPipeline

    data = write_chat_jsonl(tmp_path / "chats.jsonl", records=20)
    cfg = SftConfig(data=str(data), chat_template="chatml", seq_len=128, format="alpaca")
    pipeline = ChatPipeline()
    with pytest.raises(UserError) as caught:
        pipeline.build(pipeline.spec(cfg, up), up, tmp_path / "cache", log=lambda *a: None)
    message = str(caught.value)
    assert message.startswith("--format alpaca: ") and "'instruction' + 'output'" in message
    assert "fields found: messages" in message and "--format messages" in message


def test_unreadable_data_names_the_file_the_line_and_the_reason(tmp_path, up, capsys):
    from deus_dist.cli import prepare_data

    record = json.dumps({"text": "hello world " * 40})
    files = {
        "empty.jsonl": (b"", "is empty"),
        "binary.jsonl": (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8, "line 1 is not UTF-8 text"),
        "middle.jsonl": (f'{record}\n{record}\n{{"text": oops\n{record}\n'.encode(), "line 3 is not JSON"),
        "numbers.jsonl": (b'{"text": 5}\n{"text": 6}\n', "--text_field: 'text' in "),
    }
    for name, (content, reason) in files.items():
        (tmp_path / name).write_bytes(content)
        argv = ["--model", str(up), "--data", str(tmp_path / name), "--seq_len", "64", "--quiet"]
        assert prepare_data.main([*argv, "--data_cache", str(tmp_path / "c")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(tmp_path / name) in err and reason in err, err
    assert "holds int64 values, not strings" in err


def test_a_study_directory_may_not_hold_its_own_inputs(tmp_path, capsys):
    import shutil

    from deus_dist.cli.study import main

    config = tmp_path / "mine" / "study.yaml"
    config.parent.mkdir()
    shutil.copy2(REPO / "studies" / "default.yaml", config)
    assert main(["--config", str(config), "--dry_run", "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path} contains --config {config}" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["--config", str(config), "--dry_run", "--out", str(tmp_path / "a_file")]) == 2
    assert f"--out: {tmp_path / 'a_file'} is a file" in capsys.readouterr().err


def test_eval_ppl_writes_its_json_into_a_folder_that_does_not_exist_yet(tmp_path, up):
    """The study's evaluation job under SLURM writes CELL/eval/ppl-*.json before CELL/eval exists."""
    from deus_dist.cli import eval_ppl

    data = write_wiki_jsonl(tmp_path / "d.jsonl", articles=2)
    out = tmp_path / "cell" / "eval" / "ppl.json"
    argv = ["--model", str(up), "--data", str(data), "--seq_len", "64", "--max_tokens", "256", "--quiet"]
    assert eval_ppl.main([*argv, "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] > 0
