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
            arm["step0_ppl"][s] = json.loads(p0.read_text())["perplexity"] if p0.is_file() else None
        if finished:
            arm["params"] = _params(finished[0].final, plan)
            curves = [_curve(c) for c in finished]
            flat = [r for c in curves for r in c]
            arm["seconds_per_step"] = statistics.median(r["step_seconds"] for r in flat)
            arm["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in flat)
            arm["peak_memory_gb"] = max((r["peak_memory_gb"] or 0) for r in flat)
            # the FLOPs formula against the clock: predicted FLOPs over measured training seconds
            seconds = float(np.mean([c[-1]["seconds"] for c in curves if c]))
            arm["gflops_per_s"] = plan.flops / seconds / 1e9 if seconds else None
            arm["curves"] = {c.seed: curve for c, curve in zip(finished, curves, strict=True)}
            for s in study.eval_ppl:
                windows = {c.seed: json.loads(c.evals[s].read_text())["window_nll"] for c in finished}
                arm["ppl"][s] = {"window_nll": windows}
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
    return {"baseline": study.baseline, "budget": study.budget, "seeds": study.seeds, "arms": arms}


def _statistics(study, arms: dict) -> None:
    """Per set: the mean loss over seeds with its t interval, and the paired difference to the
    baseline on the seeds both have."""
    base = arms[study.baseline]
    for arm in arms.values():
        for s, entry in arm["ppl"].items():
            per_seed = {seed: float(np.mean(w)) for seed, w in entry["window_nll"].items()}
            mean, lo, hi = t_interval(list(per_seed.values()))
            entry.update(
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


def markdown(study, report: dict) -> str:
    arms, sets = report["arms"], study.eval_ppl
    head = ["arm", "params (total / trained)", "steps", "tokens", "TFLOPs"]
    for s in sets:
        head += [f"ppl {s} step 0", f"ppl {s} final [95% CI]", f"Δ nats vs {study.baseline} [95% CI]"]
    head += [f"{t} acc" for t in study.eval_tasks]
    head += ["s/step", "GFLOP/s", "tok/s", "peak GB", "fuse s", "seeds"]
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
        for s in sets:
            e = a["ppl"].get(s, {})
            ci = (
                f" [{_fmt(e.get('ppl_low'))}, {_fmt(e.get('ppl_high'))}]"
                if e.get("ppl_low") is not None
                else ""
            )
            row.append(_fmt(a["step0_ppl"].get(s)))
            row.append(_fmt(e.get("ppl")) + ci)
            if "diff" in e:
                d = e["diff"]
                row.append(f"{d['nats']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']}")
            else:
                row.append("baseline" if name == study.baseline else "-")
        for t in study.eval_tasks:
            r = a["tasks"].get(t, {})
            row.append(f"{_fmt(r.get('acc'), '.3f')} ± {_fmt(r.get('stderr'), '.3f')}" if r else "-")
        row += [
            _fmt(a.get("seconds_per_step")),
            _fmt(a.get("gflops_per_s"), ".1f"),
            _fmt(a.get("tokens_per_s"), ".0f"),
            _fmt(a.get("peak_memory_gb")),
            _fmt(a.get("fuse_seconds"), ".1f"),
            str(len(a["seeds"])),
        ]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        f"Budget: equal {study.budget} (what the baseline spends in its nominal steps). Perplexity: mean over "
        "seeds, 95% Student-t interval over seeds; Δ: the paired difference in mean NLL per token to the "
        "baseline over the same windows and seeds, 95% bootstrap interval (seeds and windows resampled); an "
        "interval containing 0 is reported as no difference. Task accuracy: mean over seeds ± lm-eval's "
        "standard error (test-set sampling). GFLOP/s: the budget's FLOPs formula over the measured training "
        "seconds; about equal across arms when the formula tracks the real cost.",
    ]
    return "\n".join(lines + notes) + "\n"


def plots(study, report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("tokens", "seconds"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, a in report["arms"].items():
            curves = list((a.get("curves") or {}).values())
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = np.mean([[r[axis] for r in c[:n]] for c in curves], axis=0)
            y = np.array([[r["loss"] for r in c[:n]] for c in curves])
            ax.plot(x, y.mean(axis=0), label=name)
            if len(curves) > 1:
                ax.fill_between(x, y.min(axis=0), y.max(axis=0), alpha=0.2)
        ax.set_xlabel("training tokens" if axis == "tokens" else "training seconds")
        ax.set_ylabel("training loss (mean over seeds; band: min-max)")
        ax.legend()
        fig.tight_layout()
        path = out / f"loss_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for s in study.eval_ppl:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = [n for n, a in report["arms"].items() if a["ppl"].get(s, {}).get("ppl") is not None]
        for i, name in enumerate(names):
            e = report["arms"][name]["ppl"][s]
            lo, hi = e.get("ppl_low"), e.get("ppl_high")
            err = [[e["ppl"] - lo], [hi - e["ppl"]]] if lo is not None else None
            ax.errorbar([i], [e["ppl"]], yerr=err, fmt="o", capsize=6)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel(f"final perplexity on {s} (95% CI over seeds)")
        fig.tight_layout()
        path = out / f"ppl_{set_name(s)}.png"
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
