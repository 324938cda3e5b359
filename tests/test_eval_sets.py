"""Named evaluation sets (deus_dist.embedded.EVAL_SETS): each is built offline from a package the
project installs, is disjoint from the training sample, and is taken by name by tools/eval_ppl.py
and by a study's eval: ppl; the study's report gives every set its own Δ and interval, and says
so when one seed leaves it no interval over seeds."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import add_char_tokenizer, make_tiny, write_wiki_jsonl
from deus_dist.embedded import EVAL_SETS, eval_set_texts, sharegpt_split, wikipedia_split
from deus_dist.errors import UserError
from deus_dist.study.spec import parse_study

PROBE = 64
"""A probe of this many characters found in the training text would mean the sets overlap."""


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _probes(text: str) -> list[str]:
    """Three windows of a document (start, middle, end), whitespace collapsed."""
    flat = " ".join(text.split())
    if len(flat) <= PROBE:
        return [flat]
    return [flat[i : i + PROBE] for i in (0, (len(flat) - PROBE) // 2, len(flat) - PROBE)]


@pytest.mark.parametrize("name", list(EVAL_SETS))
def test_each_named_set_builds_offline_and_is_disjoint_from_the_training_sample(
    name, no_network, tmp_path, monkeypatch
):
    from deus_dist.embedded import cache_dir

    # built from the installed packages into a fresh cache, with the network refused
    shared = cache_dir() / "wikipedia-sample"
    monkeypatch.setenv("DEUS_DIST_CACHE", str(tmp_path / "cache"))
    if name != "embedded" and shared.is_dir():  # the training text here; not the set under test
        shutil.copytree(shared, tmp_path / "cache" / "wikipedia-sample")
    texts = eval_set_texts(name)
    assert texts == eval_set_texts(name)  # the same documents in the same order on every read
    assert len(texts) >= 10 and sum(map(len, texts)) > 300_000  # room for 16,384 scored tokens
    assert all(isinstance(t, str) and t.strip() for t in texts)
    train = " ".join(" ".join(a["text"] for a in wikipedia_split("train")).split())
    probes = [p for t in texts for p in _probes(t)]
    found = [p for p in probes if p in train]
    assert not found, found[:3]
    if name == "chat":  # nor any conversation sft.py trains or validates on
        sft = {
            " ".join(t["value"].split())
            for s in ("train", "heldout")
            for r in sharegpt_split(s)
            for t in r["conversations"][:1]
        }
        assert not [t for t in texts if " ".join(t.split("\n\n")[0].split()) in sft]


def test_eval_ppl_takes_every_named_set_by_name(tmp_path, no_network):
    from deus_dist.cli.eval_ppl import main

    base = make_tiny(tmp_path / "base")
    add_char_tokenizer(base)
    for name in EVAL_SETS:
        out = tmp_path / f"{name}.json"
        args = ["--model", base, "--data", name, "--seq_len", "32", "--max_tokens", "62", "--quiet"]
        assert main([str(a) for a in [*args, "--output_json", out]]) == 0
        result = json.loads(out.read_text())
        assert result["data"] == name
        assert result["source"].startswith(f"{name}: " if name != "embedded" else "the embedded Wikipedia")
        assert result["tokens"] == 62 and len(result["window_nll"]) == 2
    # the embedded set by name is the default's held-out slice, window for window
    default = tmp_path / "default.json"
    assert (
        main(
            [
                str(a)
                for a in [
                    "--model",
                    base,
                    "--seq_len",
                    "32",
                    "--max_tokens",
                    "62",
                    "--quiet",
                    "--output_json",
                    default,
                ]
            ]
        )
        == 0
    )
    assert (
        json.loads(default.read_text())["window_nll"]
        == json.loads((tmp_path / "embedded.json").read_text())["window_nll"]
    )


def test_a_study_takes_named_sets_and_refuses_unknown_or_clashing_ones(tmp_path):
    arms = [{"name": "x", "method": "copy", "num_new": 1}]
    study = parse_study({"train": {"max_steps": 2}, "eval": {"ppl": list(EVAL_SETS)}, "arms": arms})
    assert study.eval_ppl == list(EVAL_SETS)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "held.txt").write_text("text\n")
    (tmp_path / "held.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError) as err:
        parse_study(
            {
                "train": {"max_steps": 2},
                "eval": {"ppl": ["chats", str(tmp_path / "a" / "held.txt"), str(tmp_path / "held.jsonl")]},
                "arms": arms,
            }
        )
    text = str(err.value)
    assert "ppl set chats does not exist" in text and "named set: embedded, chat" in text
    assert "both called 'held'" in text


# -- the report, from the files finished cells leave ------------------------------------------------


def _fake_outputs(study, env, plans, cells, base: Path, offsets: dict, windows: int = 40) -> None:
    """What finished cells leave (metrics, final checkpoint, eval json with window losses), with
    known differences: arm ``a``'s loss on set ``s`` is the baseline's plus ``offsets[a][s]``, and
    each seed moves every arm alike by a seed effect (which the paired Δ cancels)."""
    from deus_dist.study import cells as C

    rng = np.random.default_rng(0)
    base_nll = {s: rng.normal(3.0, 0.3, windows) for s in study.eval_ppl}
    for plan in plans.values():
        fused = C.fused_dir(study, env, plan)
        fused.mkdir(parents=True, exist_ok=True)
        for s in study.eval_ppl:
            (fused / f"ppl0-{C.set_name(s)}.json").write_text(json.dumps({"perplexity": 20.0}))
    for cell in cells:
        for run in cell.stage_runs:
            shutil.copytree(base, run / "final")
            (run / "final" / "deus_manifest.json").write_text("{}")
            records = [
                {
                    "tokens": 128 * (k + 1),
                    "step_seconds": 0.5,
                    "loss": 3.0 - 0.01 * k + 0.1 * (k % 2),
                    "tokens_per_s": 256,
                }
                for k in range(12)
            ]
            records[-1]["eval_loss"] = 2.9
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        seed_effect = 0.01 * cell.seed
        for s, path in cell.evals.items():
            label = C.set_name(s)
            nll = base_nll[s] + seed_effect + offsets[cell.arm][label] + rng.normal(0, 0.002, windows)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"window_nll": nll.tolist(), "perplexity": float(np.exp(nll.mean()))}))
        assert cell.done


@pytest.fixture(scope="module")
def report_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    base = make_tiny(root / "base")
    add_char_tokenizer(base)
    train = write_wiki_jsonl(root / "wiki.jsonl", articles=2, chars=2000)
    held = root / "my-held.jsonl"
    held.write_text(json.dumps({"text": "some held-out text " * 20}) + "\n")
    return root, base, train, held


def _report(report_base, tmp_path, seeds: list[int]):
    from deus_dist.configs import StudyConfig
    from deus_dist.study.report import write_report
    from deus_dist.study.run import cells_of, prepare

    root, base, train, held = report_base
    spec = {
        "base": str(base),
        "train": {"data": str(train), "seq_len": 32, "micro_batch": 1, "max_steps": 4},
        "seeds": seeds,
        "eval": {"ppl": [str(held), "science", "code"]},
        "baseline": "llama-pro",
        "arms": [
            {"name": "llama-pro", "method": "llama-pro", "num_new": 2},
            {"name": "opt-deus", "method": "opt-deus", "num_new": 2},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    study, env, plans = prepare(StudyConfig(config=str(path), out=str(tmp_path / "study"), ranks=1))
    cells = cells_of(study, env, plans)
    offsets = {"llama-pro": {"my-held": 0.0, "science": 0.0, "code": 0.0}}
    offsets["opt-deus"] = {"my-held": 0.0, "science": -0.05, "code": 0.04}
    _fake_outputs(study, env, plans, cells, base, offsets)
    return env.out, write_report(study, plans, cells, env, log=lambda *a: None)


def test_the_report_gives_every_set_its_own_delta_and_interval(report_base, tmp_path):
    out, report = _report(report_base, tmp_path, seeds=[0, 1, 2])
    assert list(report["sets"]) == ["my-held", "science", "code"]  # names and file stems, not paths
    arm = report["arms"]["opt-deus"]["ppl"]
    verdicts = {s: arm[s]["diff"]["verdict"] for s in report["sets"]}
    assert verdicts == {"my-held": "no difference", "science": "better", "code": "worse"}
    for s in report["sets"]:
        d = arm[s]["diff"]
        assert d["low"] <= d["nats"] <= d["high"] and d["seeds"] == [0, 1, 2]
        assert arm[s]["ppl_low"] < arm[s]["ppl"] < arm[s]["ppl_high"]
    md = (out / "report.md").read_text()
    delta_table = md.split("Δ nats vs llama-pro per set")[1].split("Perplexity per set")[0]
    assert "| arm | my-held | science | code |" in delta_table
    row = next(line for line in delta_table.splitlines() if line.startswith("| opt-deus |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == 3 and all(c.count("[") == 1 for c in cells)
    assert cells[1].endswith("better") and cells[2].endswith("worse") and "no difference" in cells[0]
    assert str(report_base[3]) not in md.split("Sets:")[0]  # the path only in the list of sources
    assert "- science: SciQ" in md and f"- my-held: {report_base[3]}" in md
    assert "no seed interval" not in md
    for png in (
        "loss_vs_tokens",
        "loss_vs_seconds",
        "ppl_my-held",
        "ppl_science",
        "ppl_code",
        "delta_vs_baseline",
    ):
        assert (out / f"{png}.png").stat().st_size > 1000


def test_a_one_seed_report_says_it_has_no_seed_interval(report_base, tmp_path):
    out, report = _report(report_base, tmp_path, seeds=[0])
    md = (out / "report.md").read_text()
    entry = report["arms"]["llama-pro"]["ppl"]["science"]
    assert entry["seeds"] == 1 and entry["ppl_low"] is None
    ppl_table = md.split("Perplexity per set")[1].split("Budget:")[0]
    assert "[" not in ppl_table and ppl_table.count("no seed interval (1 seed)") == 6  # 2 arms x 3 sets
    assert "windows only" in md and "one seed, so there is no interval over seeds" in md
    assert (out / "ppl_science.png").stat().st_size > 1000


def test_smoothing_is_a_trailing_moving_average():
    from deus_dist.study.report import smooth

    assert np.allclose(smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
