"""Running a study: plan every arm's steps at equal budget, run (or submit) its cells, report."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from deus_dist.errors import Problems, UserError
from deus_dist.outputs import Input, output_problems
from deus_dist.resources import DEFAULT_STUDY, slurm_script
from deus_dist.study import cells as C
from deus_dist.study.budget import ArmPlan, assign_steps, base_shape, plan_arm
from deus_dist.study.report import write_report
from deus_dist.study.spec import LAUNCHERS, Study, is_named_set, load_study


def _base_dir(study: Study, problems: Problems) -> Path | None:
    if study.base is None:
        from deus_dist.embedded import embedded_model_dir

        return problems.attempt(lambda: embedded_model_dir(progress=False))
    from deus_dist.checkpoint.hub import resolve_model_path

    path = problems.attempt(lambda: resolve_model_path(study.base, option="base"))
    if path is not None and not (path / "config.json").is_file():
        problems.append(f"base: {study.base} is not an HF checkpoint directory (no config.json)")
        return None
    return path


def prepare(cfg, log=print):
    """(study, env, plans): everything checked before any cell starts, every problem at once."""
    import torch

    problems = Problems()
    config = cfg.config or str(DEFAULT_STUDY)
    study = problems.attempt(lambda: load_study(config))
    if cfg.launcher not in LAUNCHERS:
        problems.append(f"--launcher: {cfg.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    problems.items += cfg.problems()
    if study is None:
        problems.raise_if_any()
    if cfg.quick:
        study = quick(study)
    if cfg.only and cfg.only not in [a.name for a in study.arms]:
        problems.append(f"--only: {cfg.only!r} is not an arm ({', '.join(a.name for a in study.arms)})")
    base = _base_dir(study, problems)
    out = Path(cfg.out or Path("runs") / "study" / Path(config).stem).absolute()
    inputs = [Input("base", base), Input("--config", config), Input("train: data", study.train.get("data"))]
    inputs += [Input("eval: ppl", None if is_named_set(s) else s) for s in study.eval_ppl]
    problems.items += output_problems(out, "--out", "dir", inputs)
    problems.raise_if_any()
    cuda = torch.cuda.is_available()
    ranks = cfg.ranks or (torch.cuda.device_count() if cuda else 2)
    env = C.Env(out=out, base=base, ranks=ranks, cuda=cuda)
    shape = base_shape(base)
    plans = {}
    for arm in study.arms:
        plans[arm.name] = problems.attempt(lambda a=arm: plan_arm(study, a, shape, ranks, cuda))
    problems.raise_if_any()
    if study.budget == "seconds":
        _load_calibration(study, env, plans)
    problems.items += assign_steps(list(plans.values()), study.baseline, study.budget)
    problems.raise_if_any()
    return study, env, plans


def quick(study: Study) -> Study:
    """--quick: the first seed, and every stage at half its nominal steps (a smoke run of the study:
    its cells are other cells, never mixed with the full study's)."""
    import dataclasses

    from deus_dist.study.spec import Arm, Stage

    arms = [
        Arm(
            a.name,
            tuple(
                Stage(s.fuse, {**s.train, "max_steps": max(1, s.train["max_steps"] // 2)}) for s in a.stages
            ),
        )
        for a in study.arms
    ]
    return dataclasses.replace(study, arms=arms, seeds=study.seeds[:1])


def cells_of(study: Study, env: C.Env, plans: dict[str, ArmPlan]) -> list[C.Cell]:
    """Every arm x seed (none before a seconds budget's calibration has set the steps)."""
    return [
        C.make_cell(study, env, plan, seed)
        for plan in plans.values()
        for seed in study.seeds
        if plan.stages[0].steps > 0
    ]


def _load_calibration(study: Study, env: C.Env, plans: dict[str, ArmPlan]) -> None:
    for plan in plans.values():
        for stage, steps in C.calibration_steps(study, env, plan):
            if steps[-1].done.is_file():
                stage.seconds_per_step = C.measured_seconds(steps[-1].done)


def calibrate(study: Study, env: C.Env, plans: dict[str, ArmPlan], log=print) -> None:
    """A seconds budget: time each arm's stages once (kept: reruns reuse the measurement)."""
    for plan in plans.values():
        for step in C.shared_steps(study, env, plan)[:1]:
            C.run_step(step, env, log)
        for stage, steps in C.calibration_steps(study, env, plan):
            for step in steps:
                C.run_step(step, env, log)
            stage.seconds_per_step = C.measured_seconds(steps[-1].done)
            log(f"  calibrated {plan.name} stage {stage.index}: {stage.seconds_per_step:.2f} s/step")


def write_plan(study: Study, env: C.Env, plans: dict[str, ArmPlan], cells: list[C.Cell]) -> Path:
    env.out.mkdir(parents=True, exist_ok=True)
    plan = {
        "budget": study.budget,
        "baseline": study.baseline,
        "ranks": env.ranks,
        "base": str(env.base),
        "arms": {
            name: {
                "steps": {"stages": [s.steps for s in p.stages], "total": p.steps},
                "tokens": p.tokens,
                "flops": p.flops,
                "seconds": p.seconds,
                "stages": [
                    {
                        "fuse": s.fuse,
                        "layers": [s.layers_before, s.layers_after],
                        "new_layers": s.new_layers,
                        "nominal_steps": s.nominal_steps,
                        "steps": s.steps,
                        "tokens_per_step": s.tokens_per_step,
                        "flops_per_token": s.flops_per_token,
                        "seconds_per_step": s.seconds_per_step,
                    }
                    for s in p.stages
                ],
                "shared": [s.shell() for s in C.shared_steps(study, env, p)],
                "cells": {
                    str(c.seed): {"dir": str(c.dir), "commands": [s.shell() for s in c.steps]}
                    for c in cells
                    if c.arm == name
                },
            }
            for name, p in plans.items()
        },
    }
    path = env.out / "plan.json"
    path.write_text(json.dumps(plan, indent=1) + "\n")
    return path


def summary(study: Study, plans: dict[str, ArmPlan]) -> str:
    lines = [f"{'arm':<24} {'steps (per stage)':<20} {'tokens':>12} {'TFLOPs':>9} {'s (est.)':>9}"]
    for name, p in plans.items():
        steps = " + ".join(map(str, (s.steps for s in p.stages)))
        seconds = f"{p.seconds:.0f}" if p.seconds is not None else "-"
        mark = " *" if name == study.baseline else ""
        lines.append(f"{name + mark:<24} {steps:<20} {p.tokens:>12,} {p.flops / 1e12:>9.2f} {seconds:>9}")
    lines.append(f"(* baseline; every arm spends its {study.budget})")
    return "\n".join(lines)


def run_local(
    study: Study, env: C.Env, plans: dict[str, ArmPlan], cells: list[C.Cell], only, log=print
) -> None:
    started = time.perf_counter()
    for name, plan in plans.items():
        if only and name != only:
            continue
        log(f"arm {name}: fuse and step-0 perplexity")
        for step in C.shared_steps(study, env, plan):
            C.run_step(step, env, log)
        for cell in (c for c in cells if c.arm == name):
            if cell.done:
                log(f"  seed {cell.seed}: done ({cell.dir.name})")
                continue
            cell.write_settings()
            t0 = time.perf_counter()
            log(f"  seed {cell.seed}: {cell.dir.name}")
            for step in cell.steps:
                C.run_step(step, env, log)
            log(
                f"  seed {cell.seed}: finished in {time.perf_counter() - t0:.0f} s "
                f"({time.perf_counter() - started:.0f} s since the study started)"
            )


def submit_slurm(
    study: Study, env: C.Env, plans: dict[str, ArmPlan], cells: list[C.Cell], cfg, log=print
) -> list[str]:
    """One chain of jobs per cell with the shipped batch scripts: fuse (launchers/slurm/fuse.sbatch),
    training with a dependency on it (launchers/slurm/cpt.sbatch, which requeues on the time limit),
    evaluation; then a last job that builds the report when every cell has finished."""
    extra = cfg.sbatch_args.split() if cfg.sbatch_args else []
    jobs_dir = env.out / "slurm"
    jobs_dir.mkdir(parents=True, exist_ok=True)

    def submit(args: list[str], after: list[str]) -> str:
        dep = [f"--dependency=afterok:{':'.join(after)}"] if after else []
        cmd = ["sbatch", "--parsable", f"--output={jobs_dir}/%x-%j.out", *dep, *args]
        # the jobs start in the study directory (SLURM_SUBMIT_DIR): they need no repository
        proc = subprocess.run(cmd, cwd=env.out, capture_output=True, text=True, env=env.environ())
        if proc.returncode != 0:
            raise UserError(
                f"--launcher slurm: sbatch failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        job = proc.stdout.strip().splitlines()[-1].split(";")[0].split()[-1]
        log(f"  submitted {job}: {' '.join(args[:2])}")
        return job

    def script(name: str, steps: list[C.Step]) -> Path:
        path = jobs_dir / name
        body = "\n".join(s.shell() for s in steps)
        path.write_text(
            f"#!/bin/bash\n#SBATCH --job-name={path.stem}\n#SBATCH --nodes=1\n#SBATCH --ntasks=1\nset -euo pipefail\n{body}\n"
        )
        return path

    last_jobs = []
    for name, plan in plans.items():
        if cfg.only and name != cfg.only:
            continue
        shared = C.shared_steps(study, env, plan)
        fuse_job = (
            None
            if shared[0].done.exists()
            else submit([str(slurm_script("fuse.sbatch")), *shared[0].args], [])
        )
        ppl0 = [s for s in shared[1:] if not s.done.exists()]
        if ppl0:
            last_jobs.append(
                submit([str(script(f"ppl0-{C.slug(name)}.sbatch", ppl0))], [fuse_job] if fuse_job else [])
            )
        for cell in (c for c in cells if c.arm == name and not c.done):
            cell.write_settings()
            after = [fuse_job] if fuse_job else []
            evals = []
            for step in cell.steps:
                if step.done.exists():
                    continue
                if step.kind == "fuse":
                    after = [submit([str(slurm_script("fuse.sbatch")), *step.args], after)]
                elif step.kind in ("train", "sft"):
                    launcher = [f"--export=ALL,LAUNCHER={step.module}"] if step.kind == "sft" else []
                    args = step.args
                    i = args.index("--ds_config")  # the job's own: $DS_CONFIG, else the launcher's default
                    args = args[:i] + args[i + 2 :]
                    after = [
                        submit(
                            [*launcher, *extra, str(slurm_script("cpt.sbatch")), *args],
                            after,
                        )
                    ]
                else:
                    evals.append(step)
            if evals:
                after = [submit([str(script(f"eval-{cell.dir.name}.sbatch", evals))], after)]
            last_jobs += after
    config = cfg.config or str(DEFAULT_STUDY)
    report = C.Step(
        "report",
        C.MODULES["study"],
        ["--config", str(Path(config).absolute()), "--out", str(env.out), "--report_only"],
        env.out / "report.md",
    )
    job = submit([str(script("report.sbatch", [report]))], [j for j in last_jobs if j])
    log(f"the report is built by job {job} when every cell has finished: {env.out / 'report.md'}")
    return last_jobs + [job]


def run(cfg, log=print) -> dict | None:
    study, env, plans = prepare(cfg, log)
    if study.budget == "seconds" and any(
        s.seconds_per_step is None for p in plans.values() for s in p.stages
    ):
        if cfg.dry_run or cfg.report_only:
            log(
                "seconds budget: the stages are not calibrated yet; steps are set after a short timed run per stage"
            )
        else:
            calibrate(study, env, plans, log)
            problems = assign_steps(list(plans.values()), study.baseline, study.budget)
            if problems:
                raise UserError(problems)
    cells = cells_of(study, env, plans)
    if cfg.report_only and not any(cell.done for cell in cells):
        raise UserError(
            f"--report_only: no cell under --out {env.out} has finished yet, so there is nothing to report; "
            "run the study without --report_only first (or give the --out of a study that ran)"
        )
    path = write_plan(study, env, plans, cells)
    log(summary(study, plans))
    log(f"plan: {path}")
    if cfg.dry_run:
        for name, p in plans.items():
            log(f"arm {name}:")
            for step in C.shared_steps(study, env, p):
                log(f"  {step.shell()}")
            for cell in (c for c in cells if c.arm == name):
                log(f"  seed {cell.seed} ({cell.dir.name}):")
                for step in cell.steps:
                    log(f"    {step.shell()}")
        return None
    if cfg.report_only:
        return write_report(study, plans, cells, env, log)
    if cfg.launcher == "slurm":
        submit_slurm(study, env, plans, cells, cfg, log)
        return None
    run_local(study, env, plans, cells, cfg.only, log)
    return write_report(study, plans, cells, env, log)
