"""Cells: one arm trained and evaluated with one seed, by the project's own entry points.

Every step of a cell is a command a user would type (``tools/fuse_layers.py``, ``launchers/cpt.py``
under DeepSpeed's launcher, ``launchers/sft.py``, ``tools/eval_ppl.py``, ``tools/eval_tasks.py``),
run in its module form (``python -m deus_dist.cli.fuse``, DeepSpeed's ``--module``) so that an
installed package needs no repository. Each writes its own output atomically, so a rerun skips
what is done and continues what was cut off (cpt's ``--resume auto``). A cell's folder is named by a hash of its resolved settings:
changing any setting makes a new cell, never mixes results. The first stage's fused checkpoint is
shared by the seeds (it does not depend on the seed); later stages grow each cell's own export.

Layout under STUDY_DIR::

    plan.json                    every arm's steps, tokens and FLOPs, and each cell's commands
    fused/<arm>-<hash>/          the first stage's up-scaled model (+ fuse.json: its wall time,
                                 ppl0-<set>.json: its perplexity before any training)
    calibration/<arm>-<hash>/    seconds budget: one short timed run per stage
    data_cache/                  the packed data, shared by every cell
    cells/<arm>-s<seed>-<hash>/  settings.json, stage-K/{fused,run}, sft/, eval/
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deus_dist.atomic import write_text_atomic
from deus_dist.resources import default_ds_config
from deus_dist.study.budget import ArmPlan, StagePlan
from deus_dist.study.spec import Study, is_named_set, set_label

VERSION = 1
MODULES = {
    "fuse": "deus_dist.cli.fuse",
    "cpt.py": "deus_dist.cli.train",
    "sft.py": "deus_dist.cli.sft",
    "ppl": "deus_dist.cli.eval_ppl",
    "tasks": "deus_dist.cli.eval_tasks",
    "study": "deus_dist.cli.study",
}
"""The entry point each step runs, as ``python -m MODULE`` (tools/*.py and launchers/*.py are thin
files over these modules)."""


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def flags(options: dict) -> list[str]:
    """Options as a tool's command-line flags (booleans as --x / --no_x, lists comma-joined)."""
    out = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no_{key}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", ",".join(map(str, value))]
        else:
            out += [f"--{key}", str(value)]
    return out


def set_name(ppl_set: str) -> str:
    """The set's name in file names, reports and plots (a named set's name, or its file's stem)."""
    return set_label(ppl_set)


@dataclass
class Env:
    """Where and how commands run."""

    out: Path
    base: Path
    ranks: int
    cuda: bool

    @property
    def ds_config(self) -> Path:
        return default_ds_config(self.cuda)

    def environ(self) -> dict:
        env = dict(os.environ)
        if not self.cuda:
            env["DS_ACCELERATOR"] = "cpu"
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            env.pop(var, None)
        return env


@dataclass
class Step:
    """One command of a cell: an entry point's module, its options, and the output that says it is done."""

    kind: str
    module: str
    args: list[str]
    done: Path
    ranks: int = 1
    """More than one: the module runs under DeepSpeed's launcher (--module) with this many processes."""

    def command(self, master_port: int | None = None) -> list[str]:
        if self.ranks == 1:
            return [sys.executable, "-m", self.module, *self.args]
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.ranks)]
        if master_port is not None:
            launcher += ["--master_port", str(master_port)]
        return [*launcher, "--module", self.module, *self.args]

    def shell(self) -> str:
        return " ".join(shlex.quote(c) for c in self.command())


def tool_step(kind: str, module: str, options: dict, done: Path, ranks: int = 1) -> Step:
    """``python -m module`` with ``options`` as its flags, quiet (a cell's progress is the study's)."""
    return Step(kind, module, [*flags(options), "--quiet"], done, ranks)


@dataclass
class Cell:
    arm: str
    seed: int
    key: str
    dir: Path
    settings: dict
    steps: list[Step] = field(default_factory=list)
    stage_runs: list[Path] = field(default_factory=list)
    final: Path | None = None
    evals: dict = field(default_factory=dict)
    """ppl set -> eval json; "tasks" -> the eval_tasks output folder."""

    @property
    def done(self) -> bool:
        return all(step.done.exists() for step in self.steps)

    def write_settings(self) -> None:
        """The cell's folder, with the settings its name is the hash of (before its first step)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(self.settings, indent=1, default=str) + "\n")


def fused_dir(study: Study, env: Env, arm: ArmPlan) -> Path:
    return env.out / "fused" / f"{slug(arm.name)}-{digest([str(env.base), arm.stages[0].fuse, VERSION])}"


def fuse_step(source: Path, out: Path, options: dict) -> Step:
    return tool_step(
        "fuse",
        MODULES["fuse"],
        {"model": source, "out": out, **options},
        out / "deus_manifest.json",
    )


def train_step(env: Env, model: Path, run: Path, options: dict, seed: int, steps: int, script: str) -> Step:
    opts = {
        "ds_config": env.ds_config,
        "model": model,
        "output_dir": run,
        "seed": seed,
        "max_steps": steps,
        "data_cache": env.out / "data_cache",
        **{k: v for k, v in options.items() if k != "max_steps"},
    }
    kind = "train" if script == "cpt.py" else "sft"
    return tool_step(kind, MODULES[script], opts, run / "final" / "deus_manifest.json", env.ranks)


def ppl_step(study: Study, model: Path, ppl_set: str, out: Path) -> Step:
    opts = {
        "model": model,
        "output_json": out,
        "seq_len": study.ppl_seq_len,
        "max_tokens": study.ppl_tokens,
        "data": ppl_set if is_named_set(ppl_set) else Path(ppl_set).expanduser().resolve(),
    }
    return tool_step("ppl", MODULES["ppl"], opts, out)


def tasks_step(study: Study, model: Path, out: Path) -> Step:
    opts = {
        "model": model,
        "tasks": study.eval_tasks,
        "include_path": study.eval_include_path,
        "output_path": out,
        "limit": study.task_limit or None,
    }
    return tool_step("tasks", MODULES["tasks"], opts, out / "done.json")


def shared_steps(study: Study, env: Env, arm: ArmPlan) -> list[Step]:
    """The first stage's fuse and its perplexity before training (shared by the arm's seeds)."""
    fused = fused_dir(study, env, arm)
    steps = [fuse_step(env.base, fused, arm.stages[0].fuse)]
    steps += [ppl_step(study, fused, s, fused / f"ppl0-{set_name(s)}.json") for s in study.eval_ppl]
    return steps


def make_cell(study: Study, env: Env, arm: ArmPlan, seed: int) -> Cell:
    settings = {
        "version": VERSION,
        "base": str(env.base),
        "arm": arm.name,
        "seed": seed,
        "ranks": env.ranks,
        "stages": [{"fuse": s.fuse, "train": s.train, "steps": s.steps} for s in arm.stages],
        "sft": study.sft,
        "eval": {
            "ppl": study.eval_ppl,
            "tasks": study.eval_tasks,
            "task_limit": study.task_limit,
            "ppl_tokens": study.ppl_tokens,
            "ppl_seq_len": study.ppl_seq_len,
            # only when given, so the cells of studies without one keep their names
            **({"include_path": study.eval_include_path} if study.eval_include_path else {}),
        },
    }
    key = digest(settings)
    cell = Cell(arm.name, seed, key, env.out / "cells" / f"{slug(arm.name)}-s{seed}-{key}", settings)
    model = fused_dir(study, env, arm)
    for stage in arm.stages:
        here = cell.dir / f"stage-{stage.index}"
        if stage.index > 1:
            cell.steps.append(fuse_step(model, here / "fused", stage.fuse))
            model = here / "fused"
        run = here / "run"
        cell.steps.append(train_step(env, model, run, stage.train, seed, stage.steps, "cpt.py"))
        cell.stage_runs.append(run)
        model = run / "final"
    if study.sft:
        run = cell.dir / "sft"
        sft_steps = int(study.sft.get("max_steps") or 0)
        cell.steps.append(train_step(env, model, run, study.sft, seed, sft_steps, "sft.py"))
        model = run / "final"
    cell.final = model
    for s in study.eval_ppl:
        out = cell.dir / "eval" / f"ppl-{set_name(s)}.json"
        cell.steps.append(ppl_step(study, model, s, out))
        cell.evals[s] = out
    if study.eval_tasks:
        out = cell.dir / "eval" / "tasks"
        cell.steps.append(tasks_step(study, model, out))
        cell.evals["tasks"] = out
    return cell


def run_step(step: Step, env: Env, log=print) -> None:
    """Run one command unless its output exists; ``UserError`` if it fails (its log is kept)."""
    from deus_dist.errors import UserError
    from deus_dist.ports import free_port

    if step.done.exists():
        return
    cmd = step.command(master_port=free_port() if step.ranks > 1 else None)  # a free port per launch
    # the fuse output appears only when complete (fuse_layers.py refuses an existing one): its log goes beside it
    where = step.done.parent
    logfile = where.parent / f"{where.name}.fuse.log" if step.kind == "fuse" else where / f"{step.kind}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"  {step.kind}: {step.shell()}")
    start = time.perf_counter()
    with open(logfile, "a") as f:
        proc = subprocess.run(cmd, env=env.environ(), stdout=f, stderr=subprocess.STDOUT, cwd=env.out)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise UserError(f"study: {step.kind} failed (exit status {proc.returncode}); see {logfile}")
    if step.kind == "fuse":
        write_text_atomic(step.done.parent / "fuse.json", json.dumps({"seconds": round(seconds, 2)}) + "\n")
    if step.kind == "tasks":
        results = sorted(step.done.parent.rglob("results_*.json"))
        write_text_atomic(step.done, json.dumps({"results": str(results[-1]) if results else None}) + "\n")


CALIBRATION_STEPS = 6
"""A seconds budget times this many steps of each stage, and takes the median of the last four."""


def calibration_steps(study: Study, env: Env, arm: ArmPlan) -> list[tuple[StagePlan, list[Step]]]:
    """Per stage, the commands of its timed run: later stages grow the untrained earlier ones (the
    shapes set the time, not the weights)."""
    root = (
        env.out
        / "calibration"
        / f"{slug(arm.name)}-{digest([str(env.base), [s.fuse for s in arm.stages], VERSION])}"
    )
    out, model = [], fused_dir(study, env, arm)
    for stage in arm.stages:
        steps = []
        if stage.index > 1:
            steps.append(fuse_step(model, root / f"stage-{stage.index}" / "fused", stage.fuse))
            model = root / f"stage-{stage.index}" / "fused"
        run = root / f"stage-{stage.index}" / "run"
        timed = train_step(
            env, model, run, {**stage.train, "eval_batches": 1}, 0, CALIBRATION_STEPS, "cpt.py"
        )
        timed.args.append("--no_export")
        timed.done = run / "metrics.jsonl"
        steps.append(timed)
        out.append((stage, steps))
    return out


def measured_seconds(metrics: Path) -> float:
    """Median seconds per step of a calibration run, the first two steps (warm-up) left out."""
    import statistics

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return statistics.median(r["step_seconds"] for r in records[2:] or records)
