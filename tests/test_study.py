"""tools/study.py: the study file, the equal-budget plan, the statistics, and tiny studies run with
the project's own tools (real DeepSpeed on the CPU, one rank per cell to stay quick)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, add_char_tokenizer, launch_env, make_tiny, write_wiki_jsonl
from deus_dist.errors import UserError
from deus_dist.study.spec import parse_study
from deus_dist.study.stats import paired_bootstrap, t_interval, verdict

STANDIN = REPO / "tests" / "slurm_standin"


def study_main(*args) -> int:
    from deus_dist.cli.study import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    base = make_tiny(root / "base")
    add_char_tokenizer(base)
    train = write_wiki_jsonl(root / "wiki.jsonl", articles=10, chars=4000)
    from deus_dist.embedded import wikipedia_split

    held = root / "held.jsonl"
    held.write_text(
        "".join(json.dumps({"text": a["text"][:3000]}) + "\n" for a in wikipedia_split("heldout")[:3])
    )
    return root, base, train, held


def study_file(tiny, arms, **over) -> Path:
    root, base, train, held = tiny
    data = {
        "base": str(base),
        "train": {
            "data": str(train),
            "seq_len": 64,
            "micro_batch": 2,
            "grad_accum": 1,
            "max_steps": 4,
            "lr": 3.0e-3,
            "warmup_steps": 0,
            "eval_batches": 1,
        },
        "budget": "tokens",
        "seeds": [0, 1],
        "eval": {"ppl": [str(held)], "ppl_tokens": 1024, "ppl_seq_len": 64},
        "baseline": "llama-pro",
        "arms": arms,
        **over,
    }
    path = root / f"study-{abs(hash(json.dumps(data, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_study_files_report_every_problem_at_once(tiny, tmp_path, capsys):
    path = study_file(
        tiny,
        [
            {"name": "a", "method": "avg", "ot_solver": "emd", "colour": "red"},
            {"name": "b", "method": "llama-pro"},
        ],
        baseline="c",
        eval={"ppl": [str(tmp_path / "missing.txt")]},
        budget="joules",
    )
    assert study_main("--config", path, "--launcher", "cloud", "--out", tmp_path / "s") == 2
    err = capsys.readouterr().err
    for needle in (
        "unknown option 'colour'",
        "arm 'a'",
        "--ot_solver: --method avg does not use it",
        "baseline 'c' is not an arm",
        "ppl set",
        "does not exist",
        "budget 'joules'",
        "--launcher: 'cloud' is not one of local, slurm",
    ):
        assert needle in err, (needle, err)
    assert not (tmp_path / "s").exists()


def test_a_budget_that_leaves_an_arm_no_steps_is_refused(tiny, tmp_path, capsys):
    arms = [
        {"name": "llama-pro", "method": "llama-pro", "num_new": 2, "train": {"max_steps": 1}},
        {
            "name": "long",
            "stages": [
                {"method": "copy", "num_new": 1, "train": {"max_steps": 100}},
                {"method": "copy", "num_new": 1, "train": {"max_steps": 1}},
            ],
        },
    ]
    assert study_main("--config", study_file(tiny, arms), "--dry_run", "--out", tmp_path / "s") == 2
    assert "budget: arm 'long' stage 2 gets 0 steps" in capsys.readouterr().err


def test_equal_budgets(tiny, tmp_path, capsys):
    """flops: top placement's cheaper steps buy it more of them, and every arm's FLOPs match the
    baseline's to within one step; a two-stage arm keeps its stages' proportions."""
    from deus_dist.configs import StudyConfig
    from deus_dist.study.run import prepare

    arms = [
        {"name": "llama-pro", "method": "llama-pro", "num_new": 3, "placement": "interleaved"},
        {"name": "top", "method": "opt-deus", "num_new": 3, "placement": "top"},
        {
            "name": "two",
            "stages": [
                {"method": "opt-deus", "num_new": 2, "train": {"max_steps": 4}},
                {"method": "opt-deus", "num_new": 2, "train": {"max_steps": 2}},
            ],
        },
    ]
    train = {"data": str(tiny[2]), "seq_len": 64, "micro_batch": 2, "max_steps": 40}
    cfg = StudyConfig(
        config=str(study_file(tiny, arms, budget="flops", train=train)), ranks=1, out=str(tmp_path / "s")
    )
    _, _, plans = prepare(cfg)
    base, top, two = plans["llama-pro"], plans["top"], plans["two"]
    assert base.steps == 40 and top.steps > 40  # backward stops at the lowest new block
    for p in (top, two):
        per_step = p.flops / p.steps
        assert abs(p.flops - base.flops) <= per_step
    assert (
        two.stages[0].steps == 2 * two.stages[1].steps
        or abs(two.stages[0].steps - 2 * two.stages[1].steps) <= 1
    )
    # the formula: a tokens budget gives every single-stage arm the baseline's steps
    cfg = StudyConfig(config=str(study_file(tiny, arms[:2])), ranks=1, out=str(tmp_path / "t"))
    _, _, plans = prepare(cfg)
    assert plans["top"].steps == plans["llama-pro"].steps == 4


def test_parameter_counts_follow_what_each_arm_trains(tiny, tmp_path):
    """The report's parameter columns: the checkpoint's own counts (the architecture's layer names,
    not a fixed prefix), and the trained count follows each arm's trainable set."""
    from transformers import AutoModelForCausalLM

    from deus_dist.configs import StudyConfig
    from deus_dist.study.budget import base_shape, trained_params
    from deus_dist.study.run import prepare

    base = tiny[1]
    model = AutoModelForCausalLM.from_pretrained(base)
    shape = base_shape(base)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params[0] == sum(p.numel() for p in model.model.layers[0].parameters())
    # --train_embeddings trains the input embeddings and the (here untied) output head
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert shape.embed_params == embeddings
    arms = [
        {"name": "llama-pro", "method": "llama-pro", "num_new": 2},
        {"name": "all", "method": "llama-pro", "num_new": 2, "train": {"trainable": "all"}},
        {"name": "emb", "method": "llama-pro", "num_new": 2, "train": {"train_embeddings": True}},
    ]
    cfg = StudyConfig(config=str(study_file(tiny, arms)), ranks=1, out=str(tmp_path / "s"))
    _, _, plans = prepare(cfg)
    new_blocks = 2 * shape.layer_params[0]
    assert trained_params(plans["llama-pro"], shape) == new_blocks
    assert trained_params(plans["all"], shape) == shape.total_params
    assert trained_params(plans["emb"], shape) == new_blocks + shape.embed_params


def test_statistics():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2 - 4.302653 * 1 / np.sqrt(3), rel=1e-5)
    assert t_interval([5.0]) == (5.0, None, None)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, size=(3, 200))
    _, lo, hi = paired_bootstrap(noise)
    assert lo < 0 < hi and verdict(lo, hi) == "no difference"
    _, lo, hi = paired_bootstrap(noise - 0.2)
    assert hi < 0 and verdict(lo, hi) == "better"
    assert verdict(*paired_bootstrap(np.zeros((2, 10)))[1:]) == "no difference"  # identical arms


@pytest.mark.slow
@pytest.mark.distributed
def test_a_study_runs_resumes_and_reports(tiny, tmp_path):
    """Two arms x two seeds with the real tools. The arms have different names and identical
    settings: they come out as "no difference" (not as a win for either); a rerun runs nothing;
    changing a setting makes new cells."""
    arms = [
        {"name": "llama-pro", "method": "llama-pro", "num_new": 2},
        {"name": "llama-pro-again", "method": "llama-pro", "num_new": 2},
    ]
    path, out = study_file(tiny, arms), tmp_path / "study"
    cmd = [
        os.sys.executable,
        str(REPO / "tools" / "study.py"),
        "--config",
        str(path),
        "--out",
        str(out),
        "--ranks",
        "1",
    ]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    held = tiny[3]
    again = report["arms"]["llama-pro-again"]["ppl"][held.stem]  # a set is named by its file's stem
    assert again["diff"]["verdict"] == "no difference" and again["diff"]["nats"] == 0.0
    base = report["arms"]["llama-pro"]
    assert base["layers"] == [8] and base["steps"] == [4] and base["seeds"] == [0, 1]
    assert (
        base["ppl"][held.stem]["ppl_low"] < base["ppl"][held.stem]["ppl"] < base["ppl"][held.stem]["ppl_high"]
    )
    assert base["step0_ppl"][held.stem] > base["ppl"][held.stem]["ppl"] > 1  # training helped
    assert 0 < base["planned_memory_gb"] < base["peak_memory_gb"]  # the plan counts tensors, RSS all
    md = (out / "report.md").read_text()
    assert "no difference" in md and "(baseline)" in md and "planned GB" in md
    for png in ("loss_vs_tokens.png", "loss_vs_seconds.png", f"ppl_{held.stem}.png", "delta_vs_baseline.png"):
        assert (out / png).stat().st_size > 1000
    plan = json.loads((out / "plan.json").read_text())
    assert (
        plan["arms"]["llama-pro"]["steps"]["total"] == 4 and plan["arms"]["llama-pro"]["tokens"] == 4 * 2 * 64
    )
    # a rerun finds every cell finished and runs nothing
    again_proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert again_proc.returncode == 0 and again_proc.stdout.count(": done (") == 4
    assert "  train:" not in again_proc.stdout and "  fuse:" not in again_proc.stdout
    # another learning rate: new cells, the old ones untouched
    cells = {p.name for p in (out / "cells").iterdir()}
    changed = study_file(
        tiny, arms[:1], seeds=[0], train={**yaml.safe_load(path.read_text())["train"], "lr": 1e-3}
    )
    subprocess.run(
        [*cmd[:3], str(changed), *cmd[4:], "--dry_run"],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    plan = json.loads((out / "plan.json").read_text())
    assert Path(plan["arms"]["llama-pro"]["cells"]["0"]["dir"]).name not in cells


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_stage_study_under_slurm_submits_chains_of_jobs(tiny, tmp_path):
    """--launcher slurm with the stand-in SLURM, a two-stage arm: fuse.sbatch, cpt.sbatch after it,
    the second stage's fuse (growing the first stage's export) and training, an evaluation job, and
    a last job that builds the report."""
    arms = [
        {
            "name": "opt-deus-2stage",
            "stages": [
                {"method": "opt-deus", "num_new": 2, "train": {"max_steps": 2}},
                {"method": "opt-deus", "num_new": 2, "train": {"max_steps": 2}},
            ],
        }
    ]
    path, out = study_file(tiny, arms, seeds=[0], baseline="opt-deus-2stage"), tmp_path / "study"
    state = tmp_path / "slurm"
    state.mkdir()
    env = launch_env()
    env.update(
        PATH=f"{STANDIN}{os.pathsep}{env['PATH']}",
        SLURM_STANDIN_DIR=str(state),
        DS_CONFIG=str(REPO / "ds_configs" / "zero3_cpu.json"),
    )
    cmd = [
        os.sys.executable,
        str(REPO / "tools" / "study.py"),
        "--config",
        str(path),
        "--out",
        str(out),
        "--launcher",
        "slurm",
        "--sbatch_args",
        "--nodes=1 --ntasks-per-node=1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # fuse, step-0 perplexity, training, stage-2 fuse, stage-2 training, evaluation, report
    assert proc.stdout.count("submitted") == 7
    manifest = json.loads(
        next((out / "cells").glob("opt-deus-2stage-s0-*/stage-2/run/final/deus_manifest.json")).read_text()
    )
    assert len(manifest["history"]) == 1 and manifest["num_layers_after"] == 10
    report = json.loads((out / "report.json").read_text())
    assert report["arms"]["opt-deus-2stage"]["layers"] == [8, 10] and report["arms"]["opt-deus-2stage"][
        "steps"
    ] == [2, 2]
    assert "opt-deus-2stage (baseline)" in (out / "report.md").read_text()


def test_study_file_parsing_keeps_arm_options(tiny):
    study = parse_study(
        {
            "train": {"max_steps": 3, "seq_len": 64},
            "arms": [
                {"name": "x", "method": "lesa", "seed": 3, "train": {"lr": 0.1}},
                {"name": "y", "stages": [{"method": "copy", "num_new": 1}], "train": {"max_steps": 5}},
            ],
        }
    )
    assert study.baseline == "x" and study.arm("x").stages[0].fuse == {"method": "lesa", "seed": 3}
    assert study.arm("x").stages[0].train == {"max_steps": 3, "seq_len": 64, "lr": 0.1}
    assert study.arm("y").stages[0].train["max_steps"] == 5
    with pytest.raises(UserError, match="'seed' is set by the study"):
        parse_study({"train": {"max_steps": 3, "seed": 1}, "arms": [{"name": "x"}]})


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_plans(path, tmp_path):
    """Each study file the project ships parses and plans (every arm gets steps) on the embedded model."""
    from deus_dist.configs import StudyConfig
    from deus_dist.study.run import prepare

    assert path.read_text().startswith("# python tools/study.py")  # it says how it is run
    study, _, plans = prepare(StudyConfig(config=str(path), out=str(tmp_path / "s")))
    assert study.baseline in plans and all(p.steps > 0 for p in plans.values())
