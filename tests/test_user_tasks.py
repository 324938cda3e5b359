"""tools/eval_tasks.py --include_path: the user's own lm-eval task definitions, next to the shipped ones.

A multiple-choice task written here (a JSONL of questions and a YAML definition) is scored on a tiny
model by the tool and by lm-eval's own command line on the same folder; the scores must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import add_char_tokenizer, lm_eval_cli, make_tiny

pytestmark = pytest.mark.slow  # lm-eval's own command line indexes every task it has (seconds)

QUESTIONS = [
    ("The sun rises in the", ["east", "west", "sea"], 0),
    ("Water freezes at zero degrees", ["Celsius", "north", "blue"], 0),
    ("A week has seven", ["days", "cats", "rivers"], 0),
    ("Paris is the capital of", ["Spain", "France", "Peru"], 1),
    ("Two plus two is", ["three", "five", "four"], 2),
    ("Bees make", ["honey", "glass", "rain"], 0),
    ("The opposite of hot is", ["loud", "cold", "tall"], 1),
    ("Fish live in", ["trees", "water", "sand"], 1),
]
TASK = """\
task: deus_user_mc
tag: deus_user_tasks
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task_folder(folder: Path) -> Path:
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (folder / "deus_user_mc.yaml").write_text(TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_tasks")
    model = make_tiny(root / "model")
    add_char_tokenizer(model)
    return model, write_task_folder(root / "my_tasks")


def _acc(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if k.startswith("acc")}


def test_user_tasks_score_as_lm_evals_own_command_line(setup, tmp_path):
    from deus_dist.cli.eval_tasks import run
    from deus_dist.configs import EvalTasksConfig

    model, folder = setup
    lines = []
    common = dict(model=str(model), device="cpu", batch_size="4", quiet=True, include_path=str(folder))
    ours = run(
        EvalTasksConfig(
            tasks="deus_user_mc,arc_easy", limit=len(QUESTIONS), output_path=str(tmp_path / "ours"), **common
        ),
        log=lines.append,
    )
    table = "\n".join(lines)
    assert "deus_user_mc     test " in table and "arc_easy" in table  # the user's next to a shipped task
    assert ours["n-samples"]["deus_user_mc"]["effective"] == len(QUESTIONS)
    theirs = lm_eval_cli(model, ["deus_user_mc"], folder, len(QUESTIONS), 4, tmp_path / "theirs")
    assert _acc(ours, "deus_user_mc") == _acc(theirs, "deus_user_mc")
    assert len(_acc(ours, "deus_user_mc")) == 4  # acc, acc_norm and their stderrs
    assert 0 < _acc(ours, "deus_user_mc")["acc_norm,none"] < 1  # a score, not a degenerate 0 or 1

    # a tag of the user's tasks expands to its tasks
    tagged = run(
        EvalTasksConfig(tasks="deus_user_tasks", output_path=str(tmp_path / "tag"), **common),
        log=lines.append,
    )
    assert "deus_user_mc" in tagged["results"] and tagged["n-samples"]["deus_user_mc"]["effective"] == len(
        QUESTIONS
    )


def test_include_path_errors_name_the_option(setup, tmp_path, capsys):
    from deus_dist.cli.eval_tasks import main
    from deus_dist.eval.tasks import resolve_tasks

    model, folder = setup
    assert resolve_tasks("piqa,deus_user_mc", include_path=folder) == ["piqa", "deus_user_mc"]
    with pytest.raises(Exception, match="unknown or unavailable task.*deus_user_mc"):
        resolve_tasks("deus_user_mc")  # without the folder, the user's task is unknown
    (tmp_path / "empty").mkdir()
    clash = write_task_folder(tmp_path / "clash")
    (clash / "deus_user_mc.yaml").write_text(
        (clash / "deus_user_mc.yaml").read_text().replace("deus_user_mc", "piqa")
    )
    for path, message in [
        (tmp_path / "missing", "is not a folder of lm-eval task definitions"),
        (tmp_path / "empty", "holds no lm-eval task definition"),
        (clash, "redefines shipped task(s) piqa"),
    ]:
        argv = [
            "--model",
            str(model),
            "--tasks",
            "piqa",
            "--include_path",
            str(path),
            "--output_path",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--include_path: {path} {message}" in err, err
    assert not (tmp_path / "o").exists()


def test_a_study_file_takes_user_tasks(setup, tmp_path):
    from deus_dist.errors import UserError
    from deus_dist.study.cells import tasks_step
    from deus_dist.study.spec import parse_study

    _, folder = setup
    spec = {"train": {"max_steps": 2}, "arms": [{"name": "a", "method": "copy", "num_new": 1}]}
    study = parse_study({**spec, "eval": {"tasks": ["deus_user_mc", "piqa"], "include_path": str(folder)}})
    assert study.eval_include_path == str(folder.resolve())
    step = tasks_step(study, tmp_path / "model", tmp_path / "out")
    assert step.args[step.args.index("--include_path") + 1] == str(folder.resolve())
    with pytest.raises(UserError, match="eval: tasks: unknown or unavailable task.*deus_user_mc"):
        parse_study({**spec, "eval": {"tasks": ["deus_user_mc"]}})
    with pytest.raises(UserError, match="eval: include_path: .* is not a folder"):
        parse_study({**spec, "eval": {"tasks": ["piqa"], "include_path": str(tmp_path / "nope")}})
