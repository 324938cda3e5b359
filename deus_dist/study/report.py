"""The study's answer: report.md (one table), report.json (every number) and plots, built from the
files finished cells left (``--report_only`` rebuilds them at any time)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from deus_dist.study.budget import ArmPlan, base_shape, trained_params
from deus_dist.study.cells import Cell, fused_dir, set_name
from deus_dist.study.spec import is_named_set
from deus_dist.study.stats import paired_bootstrap, t_interval, verdict


def _read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def _curve(cell: Cell) -> list[dict]:
    """The cell's training records across its stages: tokens and seconds counted from its start."""
    out, tokens, seconds = [], 0, 0.0
    for run in cell.stage_runs:
        records = _read_jsonl(run / "metrics.jsonl")
        for r in records:
            seconds += r["step_seconds"]
            out.append(
                {
                    "tokens": tokens + r["tokens"],
                    "seconds": seconds,
                    "loss": r["loss"],
                    "step_seconds": r["step_seconds"],
                    "tokens_per_s": r["tokens_per_s"],
                    "peak_memory_gb": r.get("peak_memory_gb"),
                    "planned_memory_gb": r.get("planned_memory_gb"),
                    "eval_loss": r.get("eval_loss"),
                }
            )
        if records:
            tokens += records[-1]["tokens"]
    return out


def _params(model: Path, plan: ArmPlan) -> dict:
    shape = base_shape(model)
    return {"total": shape.total_params, "trainable": trained_params(plan, shape)}


def _tasks(folder: Path) -> dict:
    done = folder / "done.json"
    if not done.is_file():
        return {}
    path = json.loads(done.read_text()).get("results")
    results = json.loads(Path(path).read_text())["results"] if path else {}
    return {t: {"acc": r.get("acc,none"), "stderr": r.get("acc_stderr,none")} for t, r in results.items()}


def collect(study, plans: dict[str, ArmPlan], cells: list[Cell], env) -> dict:
    """Every number of the report, per arm, from finished cells."""
    arms = {}
    for name, plan in plans.items():
        fused = fused_dir(study, env, plan)
        fuse_json = fused / "fuse.json"
        finished = [c for c in cells if c.arm == name and c.done]
        arm = {
            "steps": [s.steps for s in plan.stages],
            "tokens": plan.tokens,
            "flops": plan.flops,
            "layers": [s.layers_after for s in plan.stages],
            "new_layers": [s.new_layers for s in plan.stages],
            "fuse_seconds": json.loads(fuse_json.read_text())["seconds"] if fuse_json.is_file() else None,
            "seeds": [c.seed for c in finished],
            "step0_ppl": {},
            "ppl": {},
            "tasks": {},
        }
        for s in study.eval_ppl:
            p0 = fused / f"ppl0-{set_name(s)}.json"
            arm["step0_ppl"][set_name(s)] = json.loads(p0.read_text())["perplexity"] if p0.is_file() else None
        if finished:
            arm["params"] = _params(finished[0].final, plan)
            curves = [_curve(c) for c in finished]
            flat = [r for c in curves for r in c]
            arm["seconds_per_step"] = statistics.median(r["step_seconds"] for r in flat)
            arm["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in flat)
            arm["peak_memory_gb"] = max((r["peak_memory_gb"] or 0) for r in flat)
            # what the memory planner gave each stage's run, as launched (train/memory_plan.py)
            planned = [r["planned_memory_gb"] for r in flat if r["planned_memory_gb"] is not None]
            arm["planned_memory_gb"] = max(planned) if planned else None
            # the FLOPs formula against the clock: predicted FLOPs over measured training seconds
            seconds = float(np.mean([c[-1]["seconds"] for c in curves if c]))
            arm["gflops_per_s"] = plan.flops / seconds / 1e9 if seconds else None
            arm["curves"] = {c.seed: curve for c, curve in zip(finished, curves, strict=True)}
            for s in study.eval_ppl:
                windows = {c.seed: json.loads(c.evals[s].read_text())["window_nll"] for c in finished}
                arm["ppl"][set_name(s)] = {"window_nll": windows}
            if study.eval_tasks:
                per_seed = [_tasks(c.evals["tasks"]) for c in finished]
                for t in per_seed[0]:
                    accs = [p[t]["acc"] for p in per_seed if t in p and p[t]["acc"] is not None]
                    errs = [p[t]["stderr"] for p in per_seed if t in p and isinstance(p[t]["stderr"], float)]
                    arm["tasks"][t] = {
                        "acc": float(np.mean(accs)) if accs else None,
                        "stderr": float(np.mean(errs)) if errs else None,
                    }
        arms[name] = arm
    _statistics(study, arms)
    sets = {set_name(s): {"source": s, "from": _origin(s)} for s in study.eval_ppl}
    return {
        "baseline": study.baseline,
        "budget": study.budget,
        "seeds": study.seeds,
        "sets": sets,
        "arms": arms,
    }


def _origin(ppl_set: str) -> str:
    from deus_dist.embedded import EVAL_SETS

    return EVAL_SETS[ppl_set][0] if is_named_set(ppl_set) else str(Path(ppl_set).expanduser().resolve())


def _statistics(study, arms: dict) -> None:
    """Per set: the mean loss over seeds with its t interval, and the paired difference to the
    baseline on the seeds both have."""
    base = arms[study.baseline]
    for arm in arms.values():
        for s, entry in arm["ppl"].items():
            per_seed = {seed: float(np.mean(w)) for seed, w in entry["window_nll"].items()}
            mean, lo, hi = t_interval(list(per_seed.values()))
            entry.update(
                seeds=len(per_seed),
                nll=mean,
                nll_low=lo,
                nll_high=hi,
                ppl=math.exp(mean),
                ppl_low=math.exp(lo) if lo is not None else None,
                ppl_high=math.exp(hi) if hi is not None else None,
            )
            base_windows = base["ppl"].get(s, {}).get("window_nll", {})
            shared = sorted(set(entry["window_nll"]) & set(base_windows))
            if arm is base or not shared:
                continue
            diff = [np.asarray(entry["window_nll"][k]) - np.asarray(base_windows[k]) for k in shared]
            d, dlo, dhi = paired_bootstrap(np.stack(diff))
            entry["diff"] = {
                "nats": d,
                "low": dlo,
                "high": dhi,
                "verdict": verdict(dlo, dhi),
                "seeds": shared,
            }


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


NO_SEED_INTERVAL = "no seed interval (1 seed)"


def _ppl_cell(step0, e: dict) -> str:
    """Step-0 and final perplexity, with the interval over seeds (or why there is none)."""
    if e.get("ppl") is None:
        return "-"
    if e.get("ppl_low") is not None:
        final = f"{e['ppl']:.2f} [{e['ppl_low']:.2f}, {e['ppl_high']:.2f}]"
    else:
        final = f"{e['ppl']:.2f}, {NO_SEED_INTERVAL}"
    return f"{_fmt(step0)} → {final}"


def _diff_cell(name: str, study, e: dict) -> str:
    if name == study.baseline:
        return "baseline"
    if "diff" not in e:
        return "-"
    d = e["diff"]
    text = f"{d['nats']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']}"
    return text if len(d["seeds"]) > 1 else f"{text} (windows only: 1 seed)"


def markdown(study, report: dict) -> str:
    arms, sets = report["arms"], list(report["sets"])
    head = ["arm", "params (total / trained)", "steps", "tokens", "TFLOPs"]
    head += [f"{t} acc" for t in study.eval_tasks]
    head += ["s/step", "GFLOP/s", "tok/s", "peak GB", "planned GB", "fuse s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, a in arms.items():
        params = a.get("params") or {}
        row = [
            name + (" (baseline)" if name == study.baseline else ""),
            f"{params.get('total', 0) / 1e6:.1f}M / {params.get('trainable', 0) / 1e6:.1f}M"
            if params
            else "-",
            " + ".join(map(str, a["steps"])),
            f"{a['tokens']:,}",
            f"{a['flops'] / 1e12:.1f}",
        ]
        for t in study.eval_tasks:
            r = a["tasks"].get(t, {})
            row.append(f"{_fmt(r.get('acc'), '.3f')} ± {_fmt(r.get('stderr'), '.3f')}" if r else "-")
        row += [
            _fmt(a.get("seconds_per_step")),
            _fmt(a.get("gflops_per_s"), ".1f"),
            _fmt(a.get("tokens_per_s"), ".0f"),
            _fmt(a.get("peak_memory_gb")),
            _fmt(a.get("planned_memory_gb")),
            _fmt(a.get("fuse_seconds"), ".1f"),
            str(len(a["seeds"])),
        ]
        lines.append("| " + " | ".join(row) + " |")
    # one column per evaluation set: every set has its own Δ and its own intervals
    delta = ["", f"Δ nats vs {study.baseline} per set [95% CI]:", ""]
    delta += ["| arm | " + " | ".join(sets) + " |", "|" + " --- |" * (len(sets) + 1)]
    several = any(len(a["seeds"]) > 1 for a in arms.values())
    ppl = ["", f"Perplexity per set, step 0 → final{' [95% CI over seeds]' if several else ''}:", ""]
    ppl += ["| arm | " + " | ".join(sets) + " |", "|" + " --- |" * (len(sets) + 1)]
    for name, a in arms.items():
        label = name + (" (baseline)" if name == study.baseline else "")
        delta.append(
            f"| {label} | " + " | ".join(_diff_cell(name, study, a["ppl"].get(s, {})) for s in sets) + " |"
        )
        ppl.append(
            f"| {label} | "
            + " | ".join(_ppl_cell(a["step0_ppl"].get(s), a["ppl"].get(s, {})) for s in sets)
            + " |"
        )
    single = [n for n, a in arms.items() if len(a["seeds"]) == 1]
    notes = [
        "",
        f"Budget: equal {study.budget} (what the baseline spends in its nominal steps). Perplexity: mean over "
        "seeds, 95% Student-t interval over seeds; Δ: the paired difference in mean NLL per token to the "
        "baseline over the same windows and seeds, 95% bootstrap interval (seeds and windows resampled); an "
        "interval containing 0 is reported as no difference. Task accuracy: mean over seeds ± lm-eval's "
        "standard error (test-set sampling). GFLOP/s: the budget's FLOPs formula over the measured training "
        "seconds; about equal across arms when the formula tracks the real cost. Peak GB: rank 0's measured peak "
        "(allocated GPU memory; on CPUs the process's peak RSS, libraries included); planned GB: the memory "
        "planner's peak per device for the same run (tools/plan_memory.py), the largest over the arm's stages: "
        "where the placement moves memory.",
    ]
    if single:
        notes += [
            "",
            f"{', '.join(single)}: one seed, so there is no interval over seeds; a Δ interval there resamples "
            "the evaluation windows only and leaves out how much another training seed would move the result.",
        ]
    notes += ["", "Sets:"] + [f"- {label}: {info['from']}" for label, info in report["sets"].items()]
    return "\n".join(lines + delta + ppl + notes) + "\n"


def smooth(y, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    y = np.asarray(y, dtype=float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plots(study, report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("tokens", "seconds"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        window, seeds = 1, set()
        for i, (name, a) in enumerate(report["arms"].items()):
            curves = list((a.get("curves") or {}).values())
            if not curves:
                continue
            seeds.add(len(curves))
            colour = f"C{i}"
            n = min(len(c) for c in curves)
            window = max(3, n // 6)
            x = np.mean([[r[axis] for r in c[:n]] for c in curves], axis=0)
            y = np.array([[r["loss"] for r in c[:n]] for c in curves])
            # per-batch loss varies far more between batches than between arms: the moving average
            # is the curve to compare; the raw mean stays faint behind it
            ax.plot(x, y.mean(axis=0), color=colour, alpha=0.3, linewidth=0.8)
            ax.plot(x, smooth(y.mean(axis=0), window), color=colour, linewidth=2, label=name)
            if len(curves) > 1:
                ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=colour, alpha=0.1)
            held = [
                (np.mean([c[k][axis] for c in curves]), np.mean([c[k]["eval_loss"] for c in curves]))
                for k in range(n)
                if all(c[k].get("eval_loss") is not None for c in curves)
            ]
            if held:
                ax.plot(*zip(*held, strict=True), "s--", color=colour, markersize=5)
        ax.set_xlabel("training tokens" if axis == "tokens" else "training seconds")
        band = "band: min-max over seeds" if max(seeds, default=1) > 1 else "1 seed: no band"
        ax.set_title(
            f"bold: {window}-step moving average; faint: per step; squares: held-out loss; {band}", fontsize=8
        )
        ax.set_ylabel("training loss (mean over seeds)")
        ax.legend()
        fig.tight_layout()
        path = out / f"loss_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for label in report["sets"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [n for n, a in report["arms"].items() if a["ppl"].get(label, {}).get("ppl") is not None]
        single = False
        for i, name in enumerate(names):
            e = report["arms"][name]["ppl"][label]
            lo, hi = e.get("ppl_low"), e.get("ppl_high")
            single |= lo is None
            err = [[e["ppl"] - lo], [hi - e["ppl"]]] if lo is not None else None
            ax.errorbar([i], [e["ppl"]], yerr=err, fmt="o", capsize=6)
        ax.set_xticks(range(len(names)), names, rotation=20)
        interval = NO_SEED_INTERVAL if single else "95% CI over seeds"
        ax.set_ylabel(f"final perplexity on {label} ({interval})")
        fig.tight_layout()
        path = out / f"ppl_{label}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    others = [n for n in report["arms"] if n != report["baseline"]]
    if others and report["sets"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sets = list(report["sets"])
        width = 0.8 / len(others)
        for i, name in enumerate(others):
            for j, label in enumerate(sets):
                d = report["arms"][name]["ppl"].get(label, {}).get("diff")
                if d is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                err = [[d["nats"] - d["low"]], [d["high"] - d["nats"]]]
                ax.errorbar(
                    [x],
                    [d["nats"]],
                    yerr=err,
                    fmt="o",
                    capsize=4,
                    color=f"C{i}",
                    label=name if j == 0 else None,
                )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_ylabel(f"Δ nats vs {report['baseline']} (95% bootstrap CI; below 0: better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "delta_vs_baseline.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(study, plans, cells, env, log=print) -> dict:
    report = collect(study, plans, cells, env)
    out = env.out
    serial = json.loads(json.dumps(report, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    (out / "report.json").write_text(json.dumps(serial, indent=1) + "\n")
    table = markdown(study, report)
    images = plots(study, report, out)
    body = f"# Study: {out.name}\n\n{table}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    (out / "report.md").write_text(body)
    log(table)
    log(f"report: {out / 'report.md'} (numbers in report.json, plots {', '.join(p.name for p in images)})")
    return report
